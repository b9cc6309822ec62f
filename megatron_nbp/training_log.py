"""Megatron-style iteration log lines and TensorBoard scalars for the training loop: loss, learning rate,
grad norm, time per iteration, tokens/s, model TFLOP/s per GPU, MFU and peak GPU memory."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nbp.config import NBPConfig
from megatron_nbp.device import DevicePlan
from megatron_nbp.flops import peak_tflops, training_flops_per_iteration

GIB = 2 ** 30


def peak_memory_gib(plan: DevicePlan) -> tuple[float, float] | None:
    """(max memory allocated, max memory reserved) in GiB since the start, the largest over all ranks
    (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``; a MAX all-reduce, so every rank must
    call it). None on CPU, where the caching allocator does not exist."""
    if not plan.is_cuda:
        return None
    stats = torch.tensor([torch.cuda.max_memory_allocated(plan.device), torch.cuda.max_memory_reserved(plan.device)],
                         dtype=torch.float64, device=plan.device)
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    allocated, reserved = stats.tolist()
    return allocated / GIB, reserved / GIB


def _figure(value: float) -> str:
    """One decimal from 10 up (GPU figures), three significant digits below (CPU runs)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def read_scalars(logdir: str | Path, tag: str = "lm-loss") -> dict[int, float]:
    """The TensorBoard scalar ``tag`` a run wrote to ``logdir``: {iteration: value} ({} if absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


class TrainingLogger:
    """Prints a Megatron-LM-style line every ``log_interval`` iterations and writes TensorBoard
    scalars every iteration: lm-loss, learning-rate, grad-norm, iteration-time (s), tokens-per-second,
    tflops-per-gpu (model FLOPs, megatron_nbp.flops), mfu (when the GPU's peak is known) and, at the
    logging interval on CUDA, mem-max-allocated-gib / mem-max-reserved-gib.

    Args:
        cfg: the run config (log interval, global batch, model shape, tensorboard_dir, peak_tflops).
        enabled: False on ranks that do not log (all but the last).
        plan: the device plan (the GPU's name selects the MFU peak); None = CPU.
        world_size: number of GPUs (processes) sharing the iteration's FLOPs.
    """

    def __init__(self, cfg: NBPConfig, enabled: bool, plan: DevicePlan | None = None, world_size: int = 1) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.writer = None
        self.skipped = 0
        self.nan = 0
        self.world_size = world_size
        self.flops_per_iteration = training_flops_per_iteration(cfg.model, cfg.train.global_batch_size)
        name = torch.cuda.get_device_name(plan.device) if plan is not None and plan.is_cuda else None
        self.peak_tflops = peak_tflops(name, cfg.train.peak_tflops)
        self._window: list[tuple[float, float]] = []
        if enabled and cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.tensorboard_dir)

    def throughput(self, seconds: float) -> dict[str, float]:
        """tokens/s (whole job), model TFLOP/s per GPU and MFU (fraction, nan without a known peak) of an
        iteration that took ``seconds``."""
        t = self.cfg.train
        seconds = max(seconds, 1e-9)
        tflops = self.flops_per_iteration / seconds / self.world_size / 1e12
        return {"tokens_per_s": t.global_batch_size * self.cfg.model.seq_length / seconds, "tflops_per_gpu": tflops,
                "mfu": tflops / self.peak_tflops if self.peak_tflops else float("nan")}

    def log(self, iteration: int, loss: float, lr: float, grad_norm: float, update_ok: bool,
            seconds: float, consumed_samples: int, memory_gib: tuple[float, float] | None = None) -> None:
        """Record one iteration (loss in nats per video token, seconds of wall time, memory from
        :func:`peak_memory_gib` at logging iterations)."""
        if not self.enabled:
            return
        self.skipped += 0 if update_ok else 1
        self.nan += 1 if math.isnan(loss) or math.isinf(loss) else 0
        t = self.cfg.train
        rates = self.throughput(seconds)
        self._window.append((loss, seconds))
        if self.writer is not None:
            scalars = [("lm-loss", loss), ("learning-rate", lr), ("grad-norm", grad_norm), ("iteration-time", seconds),
                       ("tokens-per-second", rates["tokens_per_s"]), ("tflops-per-gpu", rates["tflops_per_gpu"])]
            if self.peak_tflops:
                scalars.append(("mfu", rates["mfu"]))
            if memory_gib is not None:
                scalars += [("mem-max-allocated-gib", memory_gib[0]), ("mem-max-reserved-gib", memory_gib[1])]
            for name, value in scalars:
                self.writer.add_scalar(name, value, iteration)
        if iteration % t.log_interval == 0 or iteration == t.train_iters:
            losses = [l for l, _ in self._window]
            ms = 1000.0 * sum(s for _, s in self._window) / len(self._window)
            self._window.clear()
            rates = self.throughput(ms / 1000.0)
            mfu = f" MFU: {100 * rates['mfu']:.1f}% |" if self.peak_tflops else ""
            memory = (f" mem max allocated / reserved (GiB): {memory_gib[0]:.2f} / {memory_gib[1]:.2f} |"
                      if memory_gib is not None else "")
            print(
                f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{t.train_iters:8d} |"
                f" consumed samples: {consumed_samples:12d} |"
                f" elapsed time per iteration (ms): {ms:.1f} |"
                f" throughput per GPU (TFLOP/s/GPU): {_figure(rates['tflops_per_gpu'])} |{mfu}"
                f" learning rate: {lr:.6E} |"
                f" global batch size: {t.global_batch_size:5d} |"
                f" lm loss: {sum(losses) / len(losses):.6E} |"
                f" grad norm: {grad_norm:.3f} |"
                f" number of skipped iterations: {self.skipped:3d} |"
                f" number of nan iterations: {self.nan:3d} |"
                f" tokens per second: {rates['tokens_per_s']:.1f} |{memory}",
                flush=True,
            )

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()
