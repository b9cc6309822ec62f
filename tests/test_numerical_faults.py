"""Non-finite loss or gradient: the update is skipped (weights, optimizer and LR schedule unchanged),
logged and counted; max_skipped_iterations in a row save a checkpoint and abort with a clear message."""

import json

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
