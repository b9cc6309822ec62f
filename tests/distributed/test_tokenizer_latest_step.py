"""Tokenizer training under torchrun decides from rank 0's reading of the latest-checkpoint file alone: a rank
whose view of ``--save`` / ``--load`` is stale (another node's network-filesystem cache right after rank 0
replaced the file) must not resume from another step than rank 0 (2 gloo ranks; rank 1 is made to read a save
directory naming step 5 while rank 0's names step 7)."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.tokenizer.checkpoint import TRAIN_LATEST_FILE, training_iteration_dir
from tests.dist_utils import torchrun


def _save_dir(root: Path, step: int | None, text: str | None = None) -> Path:
    root.mkdir(parents=True)
    if step is not None:
        training_iteration_dir(root, step).mkdir(parents=True)
    if text is not None:
        (root / TRAIN_LATEST_FILE).write_text(text)
    return root


def test_every_rank_gets_rank_0s_latest_step(tmp_path):
    _save_dir(tmp_path / "save", 7, "7\n")
    _save_dir(tmp_path / "stale", 5, "5\n")
    _save_dir(tmp_path / "none", None)
    _save_dir(tmp_path / "garbled", None, "not a step\n")
    torchrun(2, "tests/workers/latest_step_worker.py", str(tmp_path), timeout=120)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["latest"] == 7, r  # rank 1's own reading would be 5
        assert r["missing"] is None, r
    assert "does not hold an iteration number" in results[0]["garbled"]
    assert results[1]["garbled"] == "rank 0"  # rank 1 raises too (no rank waits on a collective)
