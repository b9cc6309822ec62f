"""Worker for tests/test_safe_loading.py: real checkpoints of every writer, then a training ``--load`` of
each copy in which the test planted a payload.

1. Writes, with the real launchers and 2 forked ranks each (tests.dist_utils.fork_job, the imports paid
   once): ``ROOT/megatron`` (megatron backend, TP2, 3 iterations), ``ROOT/zero2`` and ``ROOT/zero3``
   (DeepSpeed ZeRO-2 / ZeRO-3 over DP2, 3 iterations) and ``ROOT/tokenizer`` (tokenizer trainer, DDP over
   2 ranks, 2 steps); their data is ``ROOT/tokens``, ``ROOT/videos`` and ``ROOT/tokenizer.yaml``.
2. Calls ``tests.faults.test_safe_loading.plant_payloads(ROOT)`` (the test decides what is poisoned and how) and,
   for every variant it returns, runs that backend's training launcher with ``--load`` on it, 2 ranks, as
   many iterations as were saved (a successful load then exits without training).

Writes ``ROOT/loads.json``: per variant id, the exit status of every rank, the ranks' output and whether
the payload ran (its marker file appeared; the marker is then removed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from tests.dist_utils import fork_job, read_logs

CONFIG = "tests/configs/tiny_test.yaml"
TRAINING = {"megatron": ["--tp", "2"], "zero2": ["--backend", "deepspeed", "--zero-stage", "2"],
            "zero3": ["--backend", "deepspeed", "--zero-stage", "3"]}


CLI_MODULES = {"pretrain_nbp": "megatron_nbp.cli.pretrain", "convert_checkpoint": "megatron_nbp.cli.convert",
               "train_tokenizer": "data_prep.cli.train_tokenizer"}


def _launcher(name: str):
    """The module behind ``launchers/<name>.py`` (its ``main`` is the job)."""
    return importlib.import_module(CLI_MODULES[name])


def argv(root: Path, kind: str, save: Path | None = None, load: Path | None = None) -> list[str]:
    """The launcher's command line for ``kind`` (megatron, zero2, zero3, tokenizer)."""
    if kind == "tokenizer":
        out = (save or load).parent / f"{(save or load).name}_export.safetensors"
        args = ["--config", str(root / "tokenizer.yaml"), "--data", str(root / "videos"), "--output", str(out),
                "--resolution", "16", "--num-frames", "5", "--train-steps", "2", "--batch-size", "1",
                "--warmup-steps", "1", "--eval-clips", "1", "--disc-weight", "0.5", "--disc-start", "1",
                "--disc-channels", "4", "--disc-layers", "2", "--ema-decay", "0.8"]
    else:
        args = ["--config", CONFIG, "--data", str(root / "tokens"), "--train-iters", "3", *TRAINING[kind]]
    return args + (["--save", str(save)] if save else []) + (["--load", str(load)] if load else [])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    os.chdir(REPO)
    root = Path(args.root)
    pretrain, tokenizer = _launcher("pretrain_nbp"), _launcher("train_tokenizer")
    import data_prep.tokenizer.train  # noqa: F401 - everything the ranks need, imported before the fork
    import megatron_nbp.training  # noqa: F401 (both backends)
    from tests.faults.test_safe_loading import plant_payloads

    def job(kind: str, command: list[str], logs: Path) -> list[int]:
        def target(rank: int) -> None:
            os.environ.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
            code = (tokenizer if kind == "tokenizer" else pretrain).main(command)
            if code:
                raise SystemExit(code)

        return fork_job(2, target, logs, timeout=600)

    for kind in ("megatron", "zero2", "zero3", "tokenizer"):
        status = job(kind, argv(root, kind, save=root / kind), root / "logs" / f"save_{kind}")
        if status != [0, 0]:
            raise SystemExit(f"saving {kind} failed {status}:\n{read_logs(root / 'logs' / f'save_{kind}')[-4000:]}")
    loads = {}
    for variant in plant_payloads(root):
        logs = root / "logs" / variant["id"]
        status = job(variant["kind"], argv(root, variant["kind"], load=Path(variant["load_dir"])), logs)
        marker = Path(variant["marker"]) if variant["marker"] else None
        ran = bool(marker and marker.exists())
        if ran:
            marker.unlink()  # the converter's turn comes later, in the test: it must start clean
        loads[variant["id"]] = {"status": status, "output": read_logs(logs), "payload_ran": ran}
    (root / "loads.json").write_text(json.dumps(loads, indent=1))


if __name__ == "__main__":
    main()
