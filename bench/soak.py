#!/usr/bin/env python
"""Bounded soak: train TP2 x PP2 on CPU, SIGKILL the whole job (agent and every rank) at a random moment,
resume with --load, repeat N times; then compare every iteration's loss with one uninterrupted run.

    python bench/soak.py --kills 3 --train-iters 12             # synthetic shards, tiny test model

Reports, per kill: the iteration reached when killed, the checkpoint resumed from (iterations lost =
reached - resumed), and at the end the number of iterations whose loss differs from the uninterrupted
run (bitwise on CPU: 0 is the only good answer).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from data_prep.synthetic import write_synthetic_shards
from megatron_nbp.process_utils import free_port, kill_process_tree
from megatron_nbp.training_log import read_scalars

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")

CONFIG = "tests/configs/tiny_test.yaml"


def command(data: Path, tb: Path, iters: int, ckpt: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}",
           "launchers/pretrain_nbp.py", "--tp", "2", "--pp", "2", "--config", CONFIG, "--data", str(data),
           "--train-iters", str(iters), "--tensorboard-dir", str(tb), "--hidden-dropout", "0.1"]
    if ckpt:
        cmd += ["--save", str(ckpt), "--save-interval", "1", "--load", str(ckpt)]
    return cmd


def latest(ckpt: Path) -> int:
    f = ckpt / "latest_checkpointed_iteration.txt"
    return int(f.read_text()) if f.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--train-iters", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_shards(root / "data", num_clips=64, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
        subprocess.run(command(root / "data", root / "tb_ref", args.train_iters, None), cwd=REPO, env=env,
                       check=True, capture_output=True)
        reference = read_scalars(root / "tb_ref")
        ckpt, rows, cycle = root / "ckpt", [], 0
        while latest(ckpt) < args.train_iters:
            tb = root / f"tb_{cycle}"
            proc = subprocess.Popen(command(root / "data", tb, args.train_iters, ckpt), cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            start = latest(ckpt)
            if cycle < args.kills:
                span = max(1, (args.train_iters - start) // (args.kills - cycle + 1))  # leave room for later kills
                target = rng.randint(start + 1, start + span)
                while latest(ckpt) < target and proc.poll() is None:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.5))
                reached = max(read_scalars(tb), default=start) if tb.exists() else start
                kill_process_tree(proc)
                rows.append((cycle, start, reached, latest(ckpt)))
            else:
                proc.wait()
                rows.append((cycle, start, args.train_iters, latest(ckpt)))
            cycle += 1
        resumed = {}
        for c in range(cycle):
            resumed.update(read_scalars(root / f"tb_{c}"))  # later cycles overwrite re-run iterations
        diverged = [i for i in reference if resumed.get(i) != reference[i]]
    print("| cycle | resumed from | reached | checkpoint after | iterations lost |")
    print("|---|---|---|---|---|")
    for cycle, start, reached, after in rows:
        print(f"| {cycle} | {start} | {reached} | {after} | {max(0, reached - after)} |")
    print(f"\n{len(rows) - 1} kills; iterations whose loss differs from the uninterrupted run: {len(diverged)} "
          f"of {len(reference)} {diverged if diverged else ''}")
    sys.exit(1 if diverged else 0)


if __name__ == "__main__":
    main()
