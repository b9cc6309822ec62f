#!/usr/bin/env python
"""Training throughput of the real training path: ms per iteration, tokens/s, model TFLOP/s per GPU, MFU,
peak memory and the first iteration (compilation included), for a config, several backends /
precisions and several micro-batch sizes, as one table.

    python bench/train_throughput.py                                    # CPU: tiny config, 2 sizes
    python bench/train_throughput.py --config configs/model/nbp_xl.yaml --config configs/data/k600.yaml \
        --modes megatron-bf16 zero1-bf16 zero2-bf16 --micro-batch-sizes 4 8 12 16 --iters 10 --warmup 3

Each row is one run of ``launchers/pretrain_nbp.py`` (under ``torchrun --nproc-per-node --nproc``) on
synthetic token shards written through the real shard format (data_prep.synthetic), with one
micro-batch per data-parallel rank per iteration (global batch = micro-batch x DP) unless
``--global-batch-size`` is given. Figures are read back from the run's TensorBoard scalars, which the
trainer writes every iteration: the median of ``iteration-time`` over the ``--iters`` iterations after
``--warmup``, ``tflops-per-gpu`` / ``mfu`` (megatron_nbp.flops) and ``mem-max-allocated-gib`` /
``mem-max-reserved-gib`` (CUDA only). A run that fails (e.g. out of memory) is a row with its reason.

``--profile`` adds two iterations after the timed ones, recorded by torch.profiler (the trainer's
``--profile --use-pytorch-profiler``, megatron_nbp.training.profiling), and prints each run's summary after
the table: wall time per iteration, the fraction of it the GPU was busy, the operators and kernels taking
the most time; the traces stay in ``--workdir``.

Modes: ``megatron-bf16``, ``megatron-fp16``, ``megatron-fp32`` (megatron DDP + megatron optimizer),
``zero1-bf16`` .. ``zero3-bf16`` and ``zero1-fp32`` .. (DeepSpeed ZeRO, ``--backend deepspeed``). Extra
trainer flags go after ``--`` (e.g. ``-- --recompute-granularity full --recompute-method uniform
--recompute-num-layers 1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_nbp.process_utils import free_port
from megatron_nbp.training_log import read_scalars

REPO = Path(__file__).resolve().parents[1]
PROFILED = 2  # iterations recorded by --profile, after the timed ones
CPU_CONFIG = ["configs/tiny_frame_prediction.yaml"]


def mode_flags(mode: str) -> list[str]:
    """Trainer flags of a mode name (module docstring).

    Raises:
        ValueError: an unknown mode.
    """
    backend, _, precision = mode.partition("-")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"mode {mode!r}: precision must be bf16, fp16 or fp32")
    if backend == "megatron":
        return [f"--{precision}"]
    if backend in ("zero1", "zero2", "zero3"):
        return ["--backend", "deepspeed", "--zero-stage", backend[-1], f"--{precision}"]
    raise ValueError(f"mode {mode!r}: backend must be megatron or zero1/zero2/zero3")


def write_data(cfg_paths: list[str], root: Path, num_clips: int) -> Path:
    """Synthetic shards matching the config's latent shape and vocabulary; returns their folder."""
    from data_prep.synthetic import write_synthetic_shards
    from megatron_nbp.config import NBPConfig

    model = NBPConfig.from_yaml(cfg_paths).model
    out = root / "data"
    write_synthetic_shards(out, num_clips=num_clips, clips_per_shard=max(1, num_clips // 4),
                           latent_shape=model.latent_shape, vocab=model.vocab_size)
    return out


def failure_reason(output: str) -> str:
    """One line saying why a run failed (out of memory, or its last error line)."""
    if "out of memory" in output.lower():
        return "out of memory"
    lines = [line.strip() for line in output.splitlines() if "Error" in line or "error:" in line]
    return (lines[-1] if lines else output.strip().splitlines()[-1] if output.strip() else "failed")[:160]


def run_one(args, mode: str, mbs: int, data: Path, root: Path) -> dict:
    """One trainer run; returns its row."""
    timed_end = args.warmup + args.iters
    iters = timed_end + (PROFILED if args.profile else 0)
    tb = root / f"tb_{mode}_{mbs}"
    profile = (["--profile", "--use-pytorch-profiler", "--profile-step-start", str(timed_end),
                "--profile-step-end", str(iters)] if args.profile else [])
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", f"--master-port={port}",
           "launchers/pretrain_nbp.py", *sum((["--config", c] for c in args.config), []), "--data", str(data),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(args.global_batch_size or mbs * args.dp),
           "--train-iters", str(iters), "--lr-warmup-iters", "0", "--log-interval", str(iters),
           "--tensorboard-dir", str(tb), "--tp", str(args.tp), "--pp", str(args.pp),
           *mode_flags(mode), *profile, *args.extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    row = {"mode": mode, "mbs": mbs}
    if proc.returncode != 0:
        return {**row, "status": failure_reason(proc.stdout + proc.stderr)}
    scalars = {tag: read_scalars(tb, tag) for tag in ("iteration-time", "tokens-per-second", "tflops-per-gpu",
                                                      "mfu", "mem-max-allocated-gib", "mem-max-reserved-gib")}
    times = scalars.get("iteration-time", {})
    timed = [times[i] for i in sorted(times) if args.warmup < i <= timed_end]
    if not timed:
        return {**row, "status": "no timed iterations in TensorBoard"}
    median = statistics.median(timed)
    pick = {i: v for i, v in times.items() if args.warmup < i <= timed_end}
    at_median = min(pick, key=lambda i: abs(pick[i] - median))
    row.update(status="ok", first_s=times.get(1, float("nan")), ms=1000 * median,
               tokens_per_s=scalars["tokens-per-second"][at_median], tflops=scalars["tflops-per-gpu"][at_median],
               mfu=scalars.get("mfu", {}).get(at_median), mem=scalars.get("mem-max-allocated-gib", {}).get(iters),
               reserved=scalars.get("mem-max-reserved-gib", {}).get(iters))
    if args.profile:
        summary = tb / f"profile_rank0_iters{timed_end + 1}-{iters}.txt"
        row["profile"] = summary.read_text() if summary.is_file() else f"no summary written ({summary})"
    return row


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help=f"YAML config(s), layered (default {CPU_CONFIG[0]})")
    p.add_argument("--modes", nargs="+", default=None,
                   help="default: megatron-fp32 megatron-bf16 zero1-bf16 zero2-bf16 zero3-bf16")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--global-batch-size", type=int, help="default: micro-batch x DP (one micro-batch per rank)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation, allocator)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--workdir", type=Path, help="where shards and TensorBoard logs go (default: a temp folder)")
    p.add_argument("--profile", action="store_true",
                   help=f"record {PROFILED} more iterations with torch.profiler and print each run's summary")
    args = p.parse_args(argv)
    args.extra = extra
    args.config = args.config or CPU_CONFIG
    args.modes = args.modes or ["megatron-fp32", "megatron-bf16", "zero1-bf16", "zero2-bf16", "zero3-bf16"]
    args.dp = args.nproc // (args.tp * args.pp)
    for mode in args.modes:
        mode_flags(mode)  # refuse a bad mode before any run
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = write_data(args.config, root, num_clips=max(64, 4 * max(args.micro_batch_sizes) * args.dp))
        print(f"# training throughput | {' + '.join(args.config)} | {device} | {args.nproc} process(es), "
              f"TP {args.tp} PP {args.pp} DP {args.dp} | torch {torch.__version__} | median of {args.iters} "
              f"iterations after {args.warmup} | extra flags: {' '.join(extra) or 'none'}")
        print("| mode | micro-batch | first iteration s | ms/iteration | tokens/s | TFLOP/s/GPU | MFU | "
              "peak allocated GiB | peak reserved GiB | status |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        profiles = []
        for mode in args.modes:
            for mbs in args.micro_batch_sizes:
                r = run_one(args, mode, mbs, data, root)
                if "profile" in r:
                    profiles.append((mode, mbs, r["profile"]))
                if r["status"] != "ok":
                    print(f"| {mode} | {mbs} | | | | | | | | {r['status']} |", flush=True)
                    continue
                mfu = None if r["mfu"] is None else 100 * r["mfu"]
                print(f"| {mode} | {mbs} | {r['first_s']:.1f} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                      f"{r['tflops']:.3g} | {fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | {fmt(r['mem'], '.2f')} | "
                      f"{fmt(r['reserved'], '.2f')} | ok |", flush=True)
        for mode, mbs, text in profiles:
            first = args.warmup + args.iters + 1
            print(f"\n### profile: {mode}, micro-batch {mbs}, iterations {first}-{first + PROFILED - 1} "
                  f"(torch.profiler; traces in --workdir)\n```\n{text.rstrip()}\n```")


if __name__ == "__main__":
    main()
