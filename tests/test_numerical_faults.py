"""Non-finite loss or gradient: the update is skipped (weights, optimizer and LR schedule unchanged),
logged and counted; max_skipped_iterations in a row save a checkpoint and abort with a clear message."""

import json
import math

from tests.dist_utils import torchrun


def test_nan_skips_the_update_and_too_many_abort_with_a_checkpoint(tmp_path):
    torchrun(1, "tests/workers/nan_worker.py", "--workdir", str(tmp_path))
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["first_ok"] is True
    assert out["skipped_ok"] is False and out["skipped_loss"] != out["skipped_loss"]  # nan loss reported
    assert out["weights_unchanged"] and out["lr_unchanged"]
    assert out["aborted"] and "3 consecutive iterations with a non-finite loss or gradient" in out["aborted"]
    assert "saved the last good weights" in out["aborted"]
    assert out["latest"] == 5  # resumed at 2, three skipped iterations, checkpoint at 5


def test_deepspeed_nan_skips_the_update_on_every_rank_and_too_many_abort_with_a_checkpoint(tmp_path):
    """train.backend: deepspeed, ZeRO-2 and ZeRO-3, TP1 x DP2: an inf weight, an inf loss with finite
    gradients on one rank, a NaN gradient with finite losses on the other rank: each skips the update on
    both ranks (weights, fp32 master, Adam moments, LR schedule unchanged; DeepSpeed counts the skip)."""
    torchrun(2, "tests/workers/ds_nan_worker.py", "--workdir", str(tmp_path), "--stage", "2", "--stage", "3")
    results = json.loads((tmp_path / "result.json").read_text())
    assert sorted(results) == ["2", "3"]
    for stage, out in results.items():
        loss, grad_norm, ok = out["first"]
        assert ok is True and math.isfinite(loss) and grad_norm > 0, (stage, out["first"])
        assert out["counters_after_first"] == [1, 0, 1], stage  # DeepSpeed global / skipped steps, scheduler steps
        for fault, r in out["faults"].items():
            assert r["ok"] is False and math.isnan(r["grad_norm"]), (stage, fault, r)
        assert math.isnan(out["faults"]["inf_weight"]["loss"]) and out["faults"]["inf_loss_rank1"]["loss"] == math.inf
        assert math.isfinite(out["faults"]["nan_grad_rank0"]["loss"]), (stage, out["faults"])
        assert out["ranks_agree"], stage
        assert out["unchanged"] == {"weight": True, "master": True, "exp_avg": True, "exp_avg_sq": True}, stage
        assert out["num_state_tensors"] >= 1 and out["lr_unchanged"], stage
        assert out["counters_after_faults"] == [4, 3, 1], stage  # steps counted, skips counted, LR schedule held
        # the first step ran at lr 0 (warmup) and the skips changed nothing: same weights, same data, same numbers
        assert out["good_after"] == [loss, grad_norm, True] and out["changed_after_good"], stage
        assert out["counters_after_good"] == [5, 3, 2], stage
        assert out["aborted"] and "3 consecutive iterations with a non-finite loss or gradient" in out["aborted"]
        assert f"saved the last good weights to {tmp_path / f'zero{stage}' / 'ckpt' / 'global_step5'}" in out["aborted"]
        assert out["latest"] == "global_step5", stage  # resumed at 2, three skipped iterations, checkpoint at 5
        assert out["counters_end"] == [8, 6, 2], stage
