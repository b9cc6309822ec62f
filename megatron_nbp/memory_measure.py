"""Measured peak memory of one real training step on CPU (fp32, one process, TP = PP = DP = 1), to hold
the memory plan (megatron_nbp.memory_plan) against; ``bench/memory_check.py`` prints the comparison.

A child process (``python -m megatron_nbp.memory_measure --child ...``) imports everything and starts a
world of one, resets its peak RSS (Linux ``/proc/self/clear_refs``), then builds the model, megatron DDP
and the megatron optimizer (megatron_nbp.training.build_training_state) and runs one micro-batch forward /
backward / optimizer step (train_step) on a random micro-batch of the model's token layout
(``TokenLayout.random_batch``). Measured = peak RSS after the step minus the RSS before building
(VmHWM - VmRSS); estimated = megatron_nbp.memory_plan for the same config in fp32. glibc's dynamic mmap
threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS, as a GPU caching
allocator's ``max_memory_allocated`` would count them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def load_config(configs: list[str], overrides: dict | None = None):
    """NBPConfig from layered YAML files and {"section.key": value} overrides."""
    from megatron_nbp.config import NBPConfig

    return NBPConfig.from_yaml(configs, overrides)


def parse_set(items: list[str]) -> dict:
    """["model.activation=swiglu", ...] -> {"model.activation": "swiglu"} (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def child(configs: list[str], micro_batch_size: int, overrides: dict | None = None) -> dict:
    """Run in the measuring process: returns {"baseline": bytes, "peak": bytes, "measured": bytes}."""
    import torch

    from megatron_nbp.parallel import destroy_parallel, initialize_parallel
    from megatron_nbp.training import build_training_state, train_step

    cfg = load_config(configs, {**(overrides or {}), "train.micro_batch_size": micro_batch_size,
                                "train.global_batch_size": micro_batch_size})
    torch.set_num_threads(1)
    initialize_parallel(1, 1, seed=cfg.train.seed)
    batch = cfg.model.token_layout.random_batch(micro_batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _proc_status_kib("VmRSS") * 1024
    state = build_training_state(cfg)
    train_step(state, iter([batch]), cfg, num_microbatches=1)
    peak = _proc_status_kib("VmHWM") * 1024
    destroy_parallel()
    return {"baseline": baseline, "peak": peak, "measured": peak - baseline}


def measure(configs: list[str], micro_batch_size: int, overrides: dict | None = None, timeout: int = 600) -> dict:
    """Measure in a fresh subprocess (see module doc); returns the child's dict."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [sys.executable, "-m", "megatron_nbp.memory_measure", "--child", "--micro-batch-size", str(micro_batch_size)]
    for c in configs:
        args += ["--config", c]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate(configs: list[str], micro_batch_size: int, overrides: dict | None = None) -> int:
    """The memory plan's per-GPU bytes for the same run: fp32, no recompute, TP = PP = DP = 1, one
    micro-batch, plain DDP (ZeRO 0)."""
    from megatron_nbp.memory_plan import ParallelPlan, plan_memory

    cfg = load_config(configs, overrides)
    plan = ParallelPlan(micro_batch_size=micro_batch_size, global_batch_size=micro_batch_size, precision="fp32")
    return plan_memory(cfg, plan).peak.total


def main(argv=None) -> None:
    """``--child``: measure and print the child's JSON (the subprocess side of :func:`measure`)."""
    p = argparse.ArgumentParser(description="one measured training step (the child process of measure())")
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--child", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(child(a.config, a.micro_batch_size, parse_set(a.set))))


if __name__ == "__main__":
    main()
