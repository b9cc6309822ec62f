"""Megatron-style iteration log lines and TensorBoard scalars for the training loop: loss, learning rate,
grad norm, time per iteration, tokens/s, model TFLOP/s per GPU, MFU and peak GPU memory; the validation
loss and perplexity, training-time sample videos / images; the same to Weights & Biases with
``--wandb-project`` (:class:`WandbWriter`, the optional extra ``megatron-nbp[wandb]``)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_nbp.config import ConfigError, NBPConfig
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


class WandbWriter:
    """Weights & Biases as a second writer beside TensorBoard's SummaryWriter (the same ``add_scalar``
    calls, so the same tags and values): ``wandb.init(project, name, dir, config)`` at construction,
    ``wandb.log({tag: value}, step=iteration)`` per scalar, ``wandb.Video`` / ``wandb.Image`` for samples.

    Args:
        cfg: the run's config (``wandb_project``, ``wandb_exp_name``, ``wandb_save_dir``; the whole
            config is stored as the W&B run's config).

    Raises:
        ConfigError: the wandb package is not installed (the optional extra ``megatron-nbp[wandb]``).
    """

    def __init__(self, cfg: NBPConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"--wandb-project {cfg.wandb_project} needs the wandb package: "
                              "pip install 'megatron-nbp[wandb]'") from None
        self.wandb = wandb
        if cfg.wandb_save_dir:
            Path(cfg.wandb_save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, dir=cfg.wandb_save_dir,
                              config=cfg.to_dict())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar at iteration ``step``."""
        self.wandb.log({tag: value}, step=step)

    def add_video(self, tag: str, frames, step: int, fps: int = 4) -> None:
        """Log a uint8 [T, H, W, 3] clip (wandb.Video takes [T, C, H, W])."""
        self.wandb.log({tag: self.wandb.Video(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), fps=fps)},
                       step=step)

    def add_image(self, tag: str, image, step: int) -> None:
        """Log a uint8 [H, W, 3] image."""
        self.wandb.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        """Finish the W&B run."""
        self.wandb.finish()


def gif_summary(tag: str, frames: np.ndarray, fps: int = 4):
    """A TensorBoard image summary holding ``frames`` (uint8 [T, H, W, 3]) as an animated GIF, the record
    ``SummaryWriter.add_video`` writes, encoded with Pillow (add_video needs moviepy for it)."""
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


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
        self.wandb = WandbWriter(cfg) if enabled and cfg.wandb_project else None

    def throughput(self, seconds: float) -> dict[str, float]:
        """tokens/s (whole job), model TFLOP/s per GPU and MFU (fraction, nan without a known peak) of an
        iteration that took ``seconds``."""
        t = self.cfg.train
        seconds = max(seconds, 1e-9)
        tflops = self.flops_per_iteration / seconds / self.world_size / 1e12
        return {"tokens_per_s": t.global_batch_size * self.cfg.model.seq_length / seconds, "tflops_per_gpu": tflops,
                "mfu": tflops / self.peak_tflops if self.peak_tflops else float("nan")}

    def _scalars(self, loss: float, lr: float, grad_norm: float, seconds: float, rates: dict[str, float],
                 memory_gib: tuple[float, float] | None) -> list[tuple[str, float]]:
        """(tag, value) of one iteration's scalars, the same for every writer."""
        scalars = [("lm-loss", loss), ("learning-rate", lr), ("grad-norm", grad_norm), ("iteration-time", seconds),
                   ("tokens-per-second", rates["tokens_per_s"]), ("tflops-per-gpu", rates["tflops_per_gpu"])]
        if self.peak_tflops:
            scalars.append(("mfu", rates["mfu"]))
        if memory_gib is not None:
            scalars += [("mem-max-allocated-gib", memory_gib[0]), ("mem-max-reserved-gib", memory_gib[1])]
        return scalars

    def log_validation(self, iteration: int, loss: float, perplexity: float) -> None:
        """Megatron-LM's validation line (``validation loss at iteration N | lm loss value: X | lm loss PPL:
        Y |``, between dashed rules) and its TensorBoard / W&B tags ``lm loss validation`` and ``lm loss
        validation ppl`` at step ``iteration``. Loss in nats per video token."""
        if not self.enabled:
            return
        for writer in (self.writer, self.wandb):
            if writer is not None:
                writer.add_scalar("lm loss validation", loss, iteration)
                writer.add_scalar("lm loss validation ppl", perplexity, iteration)
        line = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {perplexity:.6E} |"
        rule = "-" * len(line)
        print(f"{rule}\n{line}\n{rule}", flush=True)

    def log_video(self, tag: str, frames: np.ndarray, iteration: int, fps: int = 4) -> None:
        """A uint8 [T, H, W, 3] clip at step ``iteration``: TensorBoard ``add_video`` when moviepy is
        installed, else the same animated-GIF image record encoded with Pillow (:func:`gif_summary`); W&B
        ``wandb.Video``."""
        if not self.enabled:
            return
        if self.writer is not None:
            try:
                import moviepy  # noqa: F401  (add_video writes nothing without it)

                self.writer.add_video(tag, torch.from_numpy(frames).permute(0, 3, 1, 2)[None], iteration, fps=fps)
            except ImportError:
                self.writer._get_file_writer().add_summary(gif_summary(tag, frames, fps), iteration)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.add_video(tag, frames, iteration, fps)

    def log_image(self, tag: str, image: np.ndarray, iteration: int) -> None:
        """A uint8 [H, W, 3] image at step ``iteration`` (TensorBoard ``add_image``, W&B ``wandb.Image``)."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_image(tag, image, iteration, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.add_image(tag, image, iteration)

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
            for name, value in self._scalars(loss, lr, grad_norm, seconds, rates, memory_gib):
                self.writer.add_scalar(name, value, iteration)
        if self.wandb is not None:
            for name, value in self._scalars(loss, lr, grad_norm, seconds, rates, memory_gib):
                self.wandb.add_scalar(name, value, iteration)
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
        """Flush TensorBoard, finish the W&B run."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
