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


UNCHANGED = {"weights": True, "optimizer_params": True, "exp_avg": True, "exp_avg_sq": True, "step": True,
             "lr": True, "scheduler_steps": True}


def check_gradient_fault_results(out: dict, dp: int, precision: str) -> None:
    """Assertions shared by the 1-process and the data-parallel gradient-fault runs (grad_nan_worker)."""
    assert out["dp"] == dp and out["precision"] == precision
    assert out["weight_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
    assert out["optimizer_param_dtypes"] == ["torch.float32"]  # fp32 weights, or fp32 main params under bf16
    assert out["num_optimizer_params"] > 0 and out["num_state_tensors"] == 3 * out["num_optimizer_params"]
    loss, grad_norm, ok = out["first"]
    assert ok is True and math.isfinite(loss) and grad_norm > 0
    assert out["first"] == out["control"][0]  # same seed, same data: the two builds start alike
    assert sorted(out["faults"]) == (["after_reduce", "hook"] if dp > 1 else ["hook"])
    for fault, per_rank in out["faults"].items():
        assert len(per_rank) == dp, fault
        for rank, r in enumerate(per_rank):
            where = f"{precision}, fault {fault!r}, rank {rank}: {r}"
            assert r["weights_finite_before"] and r["loss_finite"], where  # a fault of the gradient alone
            assert r["loss"] == out["control"][1][0], where  # the control's iteration-2 loss: the real forward
            assert r["ok"] is False and math.isnan(r["grad_norm"]), where  # skipped on every rank
            assert r["unchanged"] == UNCHANGED, where  # weights, main params, Adam moments and step, LR
        assert per_rank[out["fault_rank"]]["grads_finite_here"] is False, (fault, "the fault did not happen")
        if fault == "after_reduce":  # only the faulted rank holds a non-finite gradient; the others skip anyway
            assert all(r["grads_finite_here"] for i, r in enumerate(per_rank) if i != out["fault_rank"]), per_rank
    # the next clean iteration applies the update the control run applies (bitwise: the skips changed nothing)
    assert out["after"][2] is True and out["after"] == out["control"][1], (out["after"], out["control"])
    assert out["after_equals_control"] is True
    assert out["after_changed"] == {"weights": True, "exp_avg": True, "scheduler_steps": True,
                                    "adam_step_plus_one": True}


def test_gradient_only_fault_skips_the_update_in_one_process(tmp_path):
    """megatron backend, 1 process, fp32 and bf16 (fp32 main params): finite weights and loss, a NaN
    gradient on one weight (a tensor hook in backward): the update is skipped with weights, main params,
    Adam exp_avg / exp_avg_sq / step, LR and scheduler unchanged; the next clean iteration equals a run
    that never saw the fault."""
    torchrun(1, "tests/workers/grad_nan_worker.py", "--workdir", str(tmp_path), "--variant", "fp32",
             "--variant", "bf16")
    results = json.loads((tmp_path / "grad_nan.json").read_text())
    assert sorted(results) == ["bf16", "fp32"]
    for name, out in results.items():
        check_gradient_fault_results(out, 1, name)


def test_gradient_only_fault_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    """megatron backend, 2 data-parallel processes, fp32 and bf16 with the distributed optimizer (fp32
    main-param and Adam shards per rank): a NaN gradient on the last rank before the data-parallel
    reduction, and an inf written into one main_grad of the last rank after it (the other rank's
    gradients stay finite): both ranks skip, nothing changes on either; the next clean iteration equals a
    run that never saw the faults."""
    torchrun(2, "tests/workers/grad_nan_worker.py", "--workdir", str(tmp_path), "--variant", "fp32",
             "--variant", "bf16_distributed_optimizer")
    results = json.loads((tmp_path / "grad_nan.json").read_text())
    assert sorted(results) == ["bf16_distributed_optimizer", "fp32"]
    check_gradient_fault_results(results["fp32"], 2, "fp32")
    check_gradient_fault_results(results["bf16_distributed_optimizer"], 2, "bf16")
