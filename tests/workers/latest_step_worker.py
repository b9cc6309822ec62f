"""Worker of tests/distributed/test_tokenizer_latest_step.py (2 gloo ranks under torchrun): rank 1 reads a stale
latest file (its own copy of the save directory names another step); every rank prints what
``data_prep.tokenizer.train._rank0_latest`` gives it into ``ROOT/rank{r}.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from data_prep.tokenizer import train
from data_prep.tokenizer.checkpoint import TrainingCheckpointError


def main() -> None:
    root = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # rank 0 reads save/ (latest: 7); rank 1 would read stale/ (latest: 5) if it read the file itself
    real = train.latest_iteration
    train.latest_iteration = lambda save_dir: real(root / "stale" if rank == 1 else save_dir)
    out = {"rank": rank, "latest": train._rank0_latest(str(root / "save")),
           "missing": train._rank0_latest(str(root / "none"))}
    try:
        train._rank0_latest(str(root / "garbled"))
        out["garbled"] = "no error"
    except TrainingCheckpointError as exc:
        out["garbled"] = "rank 0" if rank != 0 else str(exc)[-60:]
    (root / f"rank{rank}.json").write_text(json.dumps(out))  # a file each: the ranks share one stdout
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
