"""Worker for tests/test_publish_crash.py: crash a checkpoint writer at each step of publishing.

For each writer W asked for (``megatron``: launchers/pretrain_nbp.py, megatron backend, TP2;
``deepspeed``: the same launcher, ZeRO-2 over DP2; ``tokenizer``: launchers/train_tokenizer.py, DDP over
2 ranks), every run saving a checkpoint after each of its ITERS iterations, in ``WORK/W``:

1. an uninterrupted reference run (``reference/``);
2. a chain of runs of the same command with ``--load`` into ``ckpt/``: run k's rank 0 exits hard
   (``os._exit(CRASH_EXIT)``: no cleanup, no exit handlers) at crash point k while it publishes the
   checkpoint of iteration ``CRASH_AT``; the directory as that crash left it is copied to
   ``<point>/after_crash/`` and run k + 1 restarts from it. A last run without crash (``final/``) trains
   to the end, for comparison with the reference. Logs: ``<run>/logs/rank{r}.log``, TensorBoard:
   ``<run>/tb/``.

The crash is produced by wrapping, inside the forked ranks only, the calls publishing goes through:
``os.replace`` (the rename of the staging directory, the replacement of the latest pointer, DeepSpeed's
metadata file) and the tokenizer's ``publish_training_checkpoint``. Each wrapper appends the step it
saw to ``<point>/events.txt`` before and after the real call, so the test checks the order of the
steps and that the crash happened exactly where asked. The ranks are forked from this process
(tests.dist_utils.fork_job): the imports are paid once, not once per run. Nothing heavy is imported at
the top of this module: megatron's checkpoint writer spawns a helper process that imports it again.

Crash points, in chain order: ``before_publish`` (tokenizer: every file written, before the manifest),
``before_meta`` (DeepSpeed: engine files and RNG files written, before ``nbp_checkpoint.json``),
``before_rename`` (all data written), ``after_rename`` (published directory, pointer not updated),
``orphan_before_rename`` (from that state: the re-save of the same iteration crashes right before its
rename, after the orphan directory was moved aside and deleted), ``before_pointer`` (the pointer's
temporary file written, before it replaces the pointer), ``after_pointer``.

Writes ``WORK/results.json``: per writer, per run in order, the crash point, the exit status of every
rank and the seconds it took.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from tests.dist_utils import CRASH_EXIT, fork_job

CRASH_AT = 2
ITERS = 3
NPROC = 2
CHAIN = ["before_rename", "after_rename", "orphan_before_rename", "before_pointer", "after_pointer"]
POINTS = {"megatron": CHAIN, "deepspeed": ["before_meta", *CHAIN], "tokenizer": ["before_publish", *CHAIN]}


CLI_MODULES = {"pretrain_nbp": "megatron_nbp.cli.pretrain", "convert_checkpoint": "megatron_nbp.cli.convert",
               "train_tokenizer": "data_prep.cli.train_tokenizer"}


def _launcher(name: str):
    """The module behind ``launchers/<name>.py`` (its ``main`` is the job)."""
    return importlib.import_module(CLI_MODULES[name])


class Writer:
    """How to run one writer's launcher and recognise the steps of publishing iteration ``CRASH_AT``."""

    def __init__(self, name: str, data: Path, config: Path | None):
        self.name, self.data, self.config = name, data, config
        # what the ranks need, imported here, before the fork
        if name == "tokenizer":
            import data_prep.tokenizer.train  # noqa: F401
        else:
            import megatron_nbp.training  # noqa: F401 (both backends)
        self.launcher = _launcher("train_tokenizer" if name == "tokenizer" else "pretrain_nbp")
        # the published directory of CRASH_AT, its staging name, the pointer file and what it then holds
        if name == "deepspeed":
            self.final, self.pointer, self.pointer_text = f"global_step{CRASH_AT}", "latest", f"global_step{CRASH_AT}"
        else:
            self.final, self.pointer, self.pointer_text = f"iter_{CRASH_AT:07d}", "latest_checkpointed_iteration.txt", \
                str(CRASH_AT)
        self.staging = f".{self.final}.tmp" if name == "tokenizer" else f"{self.final}.tmp"

    def argv(self, ckpt: Path, tb: Path, load: bool) -> list[str]:
        """The launcher's command line: ITERS iterations, a checkpoint after each."""
        if self.name == "tokenizer":
            args = ["--config", str(self.config), "--data", str(self.data),
                    "--output", str(ckpt.parent / "tok.safetensors"), "--resolution", "16", "--num-frames", "5",
                    "--train-steps", str(ITERS), "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "1",
                    "--seed", "3", "--log-interval", "1", "--eval-clips", "1",
                    "--image-every", "2", "--image-batch-size", "2", "--disc-weight", "0.5", "--disc-start", "1",
                    "--disc-channels", "4", "--disc-layers", "2", "--lecam-weight", "0.1", "--ema-decay", "0.8",
                    "--save", str(ckpt), "--save-interval", "1", "--tensorboard-dir", str(tb)]
        else:
            args = ["--config", "tests/configs/tiny_test.yaml", "--data", str(self.data), "--train-iters", str(ITERS),
                    "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--save", str(ckpt),
                    "--save-interval", "1", "--tensorboard-dir", str(tb)]
            args += ["--tp", "2"] if self.name == "megatron" else ["--backend", "deepspeed", "--zero-stage", "2"]
        return args + (["--load", str(ckpt)] if load else [])

    def classify(self, src, dst) -> str | None:
        """Which step of publishing iteration CRASH_AT an ``os.replace(src, dst)`` is, if any."""
        src, dst = Path(src), Path(dst)
        if dst.name == self.final and src.name == self.staging:
            return "rename"
        if src.name == self.final:
            return "aside"  # an orphan of the same iteration moved out of the way (publish_directory)
        if dst.name == self.pointer and src.is_file() and src.read_text().strip() == self.pointer_text:
            return "pointer"
        if dst.name == "nbp_checkpoint.json" and dst.parent.name == self.staging:
            return "meta"
        return None

    def run(self, argv: list[str], point: str | None, events: Path | None, log_dir: Path) -> list[int]:
        """Fork the job's ranks with the crash (if any) armed on rank 0; returns each rank's exit status."""
        writer = self

        def target(rank: int) -> None:
            if point is not None:
                writer.arm(point, events, rank)
            os.environ.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
            code = writer.launcher.main(argv)
            if code:
                raise SystemExit(code)

        return fork_job(NPROC, target, log_dir, timeout=600)

    def arm(self, point: str, events: Path, rank: int) -> None:
        """Install the wrappers in this (forked) rank: log the publishing steps, exit hard at ``point``."""
        writer = self
        real_replace = os.replace
        crash_at = point.removeprefix("orphan_")

        def step(when: str, kind: str) -> None:
            with open(events, "a") as f:
                f.write(f"rank{rank} {when}_{kind}\n")
            if rank == 0 and f"{when}_{kind}" == crash_at:
                with open(events, "a") as f:
                    f.write(f"rank{rank} crash {point}\n")
                sys.stdout.flush()  # the run's own log only; nothing of the checkpoint is touched
                sys.stderr.flush()
                os._exit(CRASH_EXIT)

        def replace(src, dst, *args, **kwargs):
            kind = writer.classify(src, dst)
            if kind:
                step("before", kind)
            real_replace(src, dst, *args, **kwargs)
            if kind:
                step("after", kind)

        os.replace = replace
        if self.name == "tokenizer":
            import data_prep.tokenizer.train as train

            real_publish = train.publish_training_checkpoint

            def publish(save_dir, step_number, settings):
                if step_number == CRASH_AT:
                    step("before", "publish")
                return real_publish(save_dir, step_number, settings)

            train.publish_training_checkpoint = publish


def run_chain(writer: Writer, work: Path) -> list[dict]:
    """The reference run, the chain of crashed runs and the final run of one writer (module doc)."""
    results = []

    def run(name: str, argv: list[str], point: str | None) -> None:
        events = work / name / "events.txt"
        events.parent.mkdir(parents=True, exist_ok=True)
        events.touch()
        start = time.perf_counter()
        status = writer.run(argv, point, events, work / name / "logs")
        results.append({"name": name, "point": point, "status": status,
                        "seconds": round(time.perf_counter() - start, 2)})

    run("reference", writer.argv(work / "reference" / "ckpt", work / "reference" / "tb", False), None)
    ckpt = work / "ckpt"
    for point in POINTS[writer.name]:
        run(point, writer.argv(ckpt, work / point / "tb", True), point)
        shutil.copytree(ckpt, work / point / "after_crash", symlinks=True)
    run("final", writer.argv(ckpt, work / "final" / "tb", True), None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writers", required=True, help=f"comma-separated, of {sorted(POINTS)}")
    parser.add_argument("--work", required=True, help="one folder per writer is made in it")
    parser.add_argument("--tokens", help="token shards (megatron, deepspeed)")
    parser.add_argument("--videos", help="videos (tokenizer)")
    parser.add_argument("--tokenizer-config", help="tokenizer model YAML")
    args = parser.parse_args()
    os.chdir(REPO)
    work = Path(args.work)
    results = {}
    for name in args.writers.split(","):
        data = Path(args.videos if name == "tokenizer" else args.tokens)
        writer = Writer(name, data, Path(args.tokenizer_config) if args.tokenizer_config else None)
        results[name] = run_chain(writer, work / name)
        (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
