"""Reconstruction training of the video tokenizer (single process or torchrun + DDP/gloo on CPU).

First stage of the MAGVITv2 recipe (Yu et al. 2023): L1 + L2 reconstruction through FSQ's
straight-through estimator; the perceptual / GAN losses come later. Joint image-video training
(images as 1-frame videos) is optional via ``image_every``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from .checkpoint import save_tokenizer
from .clips import ClipBank, load_clip_bank
from .config import TokenizerConfig
from .model import VideoTokenizer

__all__ = ["TrainOptions", "train_tokenizer", "psnr_from_mse", "evaluate_psnr"]

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Options of :func:`train_tokenizer` (CLI flags of ``launchers/train_tokenizer.py``).

    ``lr`` follows a linear warmup over ``warmup_steps`` then a cosine decay to ``min_lr_ratio * lr``;
    the decay's progress is the larger of step / train_steps and elapsed / max_minutes, so a run cut by
    the time limit still ends at a low learning rate. ``image_every`` k > 0: every k-th step trains on
    ``image_batch_size`` single frames (1-frame videos) instead of clips.
    """

    config: str
    data: str
    output: str
    resolution: int = 64
    num_frames: int = 17
    frame_stride: int = 1
    train_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    image_every: int = 0
    image_batch_size: int = 16
    seed: int = 1234
    log_interval: int = 10
    tensorboard_dir: str | None = None
    eval_clips: int = 128

    @classmethod
    def yaml_defaults(cls, config_path: str | os.PathLike) -> dict[str, Any]:
        """The ``train:`` section of a tokenizer YAML (option defaults); ``{}`` if absent.

        Raises:
            ValueError: unknown keys in the section.
        """
        with Path(config_path).open() as handle:
            data = yaml.safe_load(handle) or {}
        section = data.get("train", {}) if isinstance(data, dict) else {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown keys in the train: section of {config_path}: {unknown}")
        return section


def psnr_from_mse(mse: torch.Tensor | float) -> float:
    """PSNR in dB of signals in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    mse = float(mse)
    return float("inf") if mse <= 0 else 10.0 * math.log10(4.0 / mse)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: list[float], op=None) -> list[float]:
    """Sum (or ``op``) a few floats over ranks; identity when not distributed."""
    if _dist_info()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


@torch.no_grad()
def evaluate_psnr(model: VideoTokenizer, bank: ClipBank, max_clips: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean per-clip PSNR (dB, outputs clamped to [-1, 1]) over this rank's first ``max_clips`` eval clips,
    averaged over all ranks. Returns ``(psnr, number_of_clips)``."""
    was_training = model.training
    model.eval()
    windows = bank.eval_windows[:max_clips]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        clips = torch.stack([bank.clip(*w) for w in windows[i : i + batch_size]])
        recon = model.decode_codes(model.encode_codes(clips)[0]).clamp(-1, 1)
        mse = (recon - clips).pow(2).flatten(1).mean(1)
        total += sum(psnr_from_mse(m) for m in mse)
        count += len(mse)
    model.train(was_training)
    total, count = _all_reduce([total, float(count)])
    return (total / count if count else float("nan")), int(count)


def _lr_at(opts: TrainOptions, step: int, progress: float) -> float:
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


def _setup_threads() -> None:
    """Split the CPU cores between local ranks unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def train_tokenizer(opts: TrainOptions) -> dict[str, Any]:
    """Train a :class:`VideoTokenizer` on clips of the videos under ``opts.data`` and save it (rank 0).

    Under torchrun (WORLD_SIZE > 1) a gloo process group is created and the model is wrapped in DDP;
    each rank draws from its own disjoint share of clip windows; only rank 0 writes the checkpoint and
    TensorBoard. Stops after ``train_steps`` or ``max_minutes`` (whichever first, agreed across ranks).

    Returns:
        ``{"steps", "seconds", "final_loss", "psnr", "eval_clips", "parameters", "output"}``.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: missing config or data directory, bad config,
            no usable video, T not 1 + 4n, resolution not a
            multiple of 8.
    """
    _setup_threads()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created_group = world > 1 and not dist.is_initialized()
    if created_group:
        dist.init_process_group("gloo")
    rank, world = _dist_info()
    config = TokenizerConfig.from_yaml(opts.config)
    VideoTokenizer.latent_shape(opts.num_frames, opts.resolution, opts.resolution)

    torch.manual_seed(opts.seed)
    model = VideoTokenizer(config)
    num_params = sum(p.numel() for p in model.parameters())
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    bank = load_clip_bank(opts.data, opts.resolution, opts.num_frames, opts.frame_stride, rank, world)
    generator = torch.Generator().manual_seed(opts.seed + 1000 * rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=opts.weight_decay)
    writer = None
    if rank == 0:
        log.info("tokenizer: %.2fM parameters, %d videos %s, %d clip windows on rank 0, world %d",
                 num_params / 1e6, len(bank.videos), bank.names, len(bank.windows), world)
        if opts.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(opts.tensorboard_dir)

    start = time.time()
    last_time, last_step, loss_value, step = start, 0, float("nan"), 0
    budget = opts.max_minutes * 60 if opts.max_minutes else None
    model.train()
    while step < opts.train_steps:
        elapsed = _all_reduce([time.time() - start], op=dist.ReduceOp.MAX if world > 1 else None)[0]
        if budget is not None and elapsed >= budget:
            break
        progress = max(step / opts.train_steps, elapsed / budget if budget else 0.0)
        lr = _lr_at(opts, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        is_image = opts.image_every > 0 and step % opts.image_every == opts.image_every - 1
        if is_image:
            batch = bank.sample_images(opts.image_batch_size, generator)
        else:
            batch = bank.sample_clips(opts.batch_size, generator)
        recon, _ = ddp(batch)
        mse = F.mse_loss(recon, batch)
        loss = opts.l2_weight * mse + opts.l1_weight * F.l1_loss(recon, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optimizer.step()
        step += 1
        loss_value = float(loss.detach())
        if rank == 0 and (step % opts.log_interval == 0 or step == 1):
            now = time.time()
            rate = (step - last_step) / max(now - last_time, 1e-9)
            kind = "image" if is_image else "video"
            log.info("step %6d | loss %.4f | psnr %.2f dB (%s batch) | lr %.2e | %.2f steps/s | %.0fs",
                     step, loss_value, psnr_from_mse(mse.detach()), kind, lr, rate, now - start)
            if writer:
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar(f"train/psnr_{kind}", psnr_from_mse(mse.detach()), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/steps_per_s", rate, step)
            last_time, last_step = now, step
    seconds = time.time() - start
    psnr, n_eval = evaluate_psnr(model, bank, opts.eval_clips)
    result = {"steps": step, "seconds": round(seconds, 1), "final_loss": loss_value, "psnr": psnr,
              "eval_clips": n_eval, "parameters": num_params, "output": opts.output}
    if rank == 0:
        log.info("final: %d steps in %.0fs (%.2f steps/s), reconstruction PSNR %.2f dB on %d clips",
                 step, seconds, step / max(seconds, 1e-9), psnr, n_eval)
        if writer:
            writer.add_scalar("eval/psnr", psnr, step)
            writer.close()
        metadata = {"train": asdict(opts), "result": {k: result[k] for k in ("steps", "psnr", "eval_clips")},
                    "videos": bank.names}
        save_tokenizer(model, opts.output, extra_metadata=metadata)
        log.info("saved tokenizer to %s", opts.output)
    if world > 1:
        dist.barrier()
    if created_group:
        dist.destroy_process_group()
    return result
