"""Tokenizer training (single process or torchrun + DDP: one process per GPU with nccl, or gloo on CPU).

The MAGVITv2 recipe (Yu et al. 2023) on top of VQGAN's (Esser et al. 2021):

* reconstruction: ``l1_weight * L1 + l2_weight * L2`` through FSQ's straight-through estimator;
* optional perceptual loss with a user-supplied TorchScript feature network (off by default);
* adversarial: a 3D PatchGAN (:mod:`.gan`) with hinge or non-saturating loss, switched on at step
  ``disc_start`` when ``disc_weight > 0``; the generator term is scaled by VQGAN's adaptive weight
  (ratio of last-layer gradient norms) and D's loss gets the LeCam regularizer (Tseng et al. 2021);
* EMA of the tokenizer weights (``torch.optim.swa_utils.AveragedModel``), exported when enabled;
* linear warmup + cosine or linear schedule (both optimizers), gradient clipping;
* joint image-video training (``image_every``: every k-th step uses 1-frame videos);
* checkpoints ``save/iter_XXXXXXX/`` + ``latest_checkpointed_iteration.txt`` with model, discriminator,
  EMA, both optimizers, LeCam anchors and every rank's RNG; ``load`` resumes bitwise on CPU. Saves are
  staged and published atomically, and loads verify files and settings (see :mod:`.checkpoint`).

Data order under DDP (global-batch sampling, :class:`~.clips.ClipBank`): every rank holds all training clip
windows and a data-order generator seeded with ``seed`` alone (the same on every rank), draws the picks,
flips and image-step frames of the whole global batch ``G = batch_size x world`` each step, and trains on
its rows ``[rank * batch_size, (rank + 1) * batch_size)``. DDP averages the ranks' gradients, so with the
reconstruction and perceptual losses (means over the batch) N ranks with ``G / N`` clips each take the
same steps as 1 rank with ``G`` clips, up to fp32 summation order. The logged loss, PSNR and GAN terms and
the returned ``final_loss`` are means over the ranks (= the global batch's). What stays per rank by
design: evaluation clips (split by rank, PSNR averaged over all), LeCam's anchors (EMAs of that rank's
logits) and the adaptive GAN weight (gradient norms of that rank's losses), so with the GAN on N ranks
are no longer exactly 1 rank. Each rank still saves its own ``rng_rank{r}.pt``; their data-order states
are equal, and a resumed run takes rank 0's on every rank. ``micro_batch_size`` runs a rank's rows as
micro-batches with accumulated gradients (DDP's all-reduce after the last; :func:`micro_batches`): the same
steps again up to summation order (and, on CUDA, the rounding of kernels chosen for another batch shape),
except for the adaptive GAN weight, which is then taken per micro-batch as it is per rank. It may change
between a save and a resume.

Devices (:mod:`data_prep.device`): ``device`` "auto" puts rank r of a node on ``cuda:LOCAL_RANK`` with nccl
(DDP with ``device_ids``), or on the CPU with gloo. Weights are initialised on the CPU from the seed and
then moved, so a seed gives the same initial weights on either device; clip sampling (data order, flips)
uses a CPU generator, so the batches are the same too, and are copied to the device per step.

Precision: ``precision`` "bf16" (the default on CUDA) runs the tokenizer's encoder / decoder convolutions
and the discriminator under bf16 autocast. Kept in fp32, and why:

* FSQ quantisation (:meth:`VideoTokenizer.encode_codes` turns autocast off for it): the bounded latent is
  rounded to a grid of 5-8 levels, and bf16's 8-bit mantissa would move values across rounding boundaries;
* the losses (L1/L2, perceptual, GAN, LeCam): reconstruction and logits are cast to fp32 before them, so
  the means over a batch of 17x128x128 clips are accumulated in fp32 (the decoder's output itself is a
  bf16 convolution's: its values carry bf16 rounding, up to half a uint8 step near 1);
* parameters, gradients, optimizer states and the EMA: fp32 master weights, as in mixed-precision training
  (Micikevicius et al. 2018); bf16 has fp32's exponent range, so no loss scaling is needed;
* GroupNorm: autocast itself runs normalisation in fp32.

Checkpoints hold the same files on either device (CUDA's RNG state added on CUDA) and load onto any
device, so a run saved on GPUs can resume on CPUs and back; resume is bitwise on CPU.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from nbp_common.exit_control import ExitControl

from .checkpoint import (TrainingCheckpointError, load_training_checkpoint, publish_training_checkpoint,
                         read_latest_training_iteration, save_tokenizer, stage_training_checkpoint,
                         training_iteration_dir, training_staging_dir, write_training_file)
from .clips import ClipBank, load_clip_bank
from .config import TokenizerConfig, TrainOptions
from ..device import DataDevice, activate, autocast, choose_device, to_device
from .gan import (LeCamEMA, PatchDiscriminator3d, PerceptualLoss, adaptive_generator_weight,
                  discriminator_loss, generator_loss)
from .model import VideoTokenizer

__all__ = ["TrainOptions", "train_tokenizer", "psnr_from_mse", "evaluate_psnr", "latest_iteration"]

log = logging.getLogger(__name__)


def psnr_from_mse(mse: torch.Tensor | float) -> float:
    """PSNR in dB of signals in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    mse = float(mse)
    return float("inf") if mse <= 0 else 10.0 * math.log10(4.0 / mse)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op=None) -> list[float]:
    """Sum (or ``op``) a few floats over ranks; identity when not distributed."""
    if _dist_info()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


@torch.no_grad()
def evaluate_psnr(model: VideoTokenizer, bank: ClipBank, max_clips: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean per-clip PSNR (dB, outputs clamped to [-1, 1]) over this rank's first ``max_clips`` eval clips,
    averaged over all ranks, computed in fp32 on the model's device. Returns ``(psnr, number_of_clips)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = bank.eval_windows[:max_clips]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        clips = to_device(torch.stack([bank.clip(*w) for w in windows[i : i + batch_size]]), device)
        recon = model.decode_codes(model.encode_codes(clips)[0]).clamp(-1, 1)
        mse = (recon - clips).pow(2).flatten(1).mean(1).cpu()
        total += sum(psnr_from_mse(m) for m in mse)
        count += len(mse)
    model.train(was_training)
    total, count = _all_reduce([total, float(count)])
    return (total / count if count else float("nan")), int(count)



def warmup_steps(opts: TrainOptions) -> int:
    """Warmup length: ``ceil(warmup_ratio * train_steps)`` when ``warmup_ratio`` is set, else ``warmup_steps``."""
    if opts.warmup_ratio is not None:
        return math.ceil(opts.warmup_ratio * opts.train_steps)
    return opts.warmup_steps


def _lr_at(opts: TrainOptions, step: int, progress: float, peak: float | None = None) -> float:
    """Learning rate of step ``step`` (0-based) at decay ``progress`` in [0, 1]: linear warmup to ``peak``
    (default ``opts.lr``), then cosine or linear decay (``opts.lr_schedule``) to ``min_lr_ratio * peak``."""
    peak = opts.lr if peak is None else peak
    warmup = warmup_steps(opts)
    if step < warmup:
        return peak * (step + 1) / warmup
    if opts.lr_schedule == "linear":
        shape = 1.0 - min(1.0, progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * shape)


def per_rank_batch_size(opts: TrainOptions, world: int) -> int:
    """Clips per step on each rank: ``global_batch_size / world`` when set, else ``batch_size``.

    Raises:
        ValueError: ``global_batch_size`` is not a positive multiple of ``world``.
    """
    if opts.global_batch_size is None:
        return opts.batch_size
    if opts.global_batch_size < 1 or opts.global_batch_size % world:
        raise ValueError(f"global_batch_size {opts.global_batch_size} must be a positive multiple of the world "
                         f"size {world}")
    return opts.global_batch_size // world


def micro_batches(opts: TrainOptions, world: int) -> tuple[int, int]:
    """``(micro_batch_size, count)``: each rank runs its :func:`per_rank_batch_size` clips of a step as
    ``count`` forward and backward passes of ``micro_batch_size`` clips and steps once (gradient
    accumulation, as Megatron-LM's ``--micro-batch-size`` under ``--global-batch-size``); ``(per-rank, 1)``
    when ``micro_batch_size`` is unset.

    Raises:
        ValueError: ``micro_batch_size`` does not divide the clips per rank, or those are ill-defined
            (:func:`per_rank_batch_size`).
    """
    per_rank = per_rank_batch_size(opts, world)
    micro = opts.micro_batch_size or per_rank
    if per_rank % micro:
        source = (f"global_batch_size {opts.global_batch_size} / world size {world}" if opts.global_batch_size
                  else "batch_size")
        raise ValueError(f"micro_batch_size {micro} must divide the {per_rank} clips per rank of a step ({source})")
    return micro, per_rank // micro


def _setup_threads() -> None:
    """Split the CPU cores between local ranks unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def latest_iteration(save_dir: str | os.PathLike) -> int | None:
    """Iteration named in ``save_dir/latest_checkpointed_iteration.txt``, or ``None`` if there is none.

    Raises:
        TrainingCheckpointError: the file is garbled or names a missing directory.
    """
    return read_latest_training_iteration(save_dir)


def _same_directory(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one directory (the same file system object, so also through
    symlinks or two mount points; by resolved path when one does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _warn_foreign_checkpoints(save_dir: str) -> None:
    """Log a warning when ``save_dir``, which this run did not resume from, already names a latest checkpoint
    (or holds an unreadable latest file): this run's saves replace that pointer and any checkpoint of the same
    step (Megatron-LM's ``--save`` behaves the same); resume with ``--load`` to continue that run instead."""
    try:
        latest = latest_iteration(save_dir)
    except TrainingCheckpointError as exc:
        log.warning("--save %s holds an unreadable latest file (%s); this run's checkpoints replace it", save_dir, exc)
        return
    if latest is not None:
        log.warning("--save %s already holds checkpoints of another run (latest: step %d); this run did not resume "
                    "from it (no --load %s) and its checkpoints replace them", save_dir, latest, save_dir)


def _rank0_latest(save_dir: str) -> int | None:
    """Rank 0's reading of ``save_dir``'s latest file, the same on every rank (collective when distributed).

    Each rank reading the file itself could see different steps: on a network filesystem another node's
    cache can lag right after rank 0 replaced the file, and ranks would then resume from different steps.

    Raises:
        TrainingCheckpointError: (on every rank) the latest file is garbled or names a missing directory.
    """
    rank, world = _dist_info()
    code, error = -1.0, None
    if rank == 0:
        try:
            step = latest_iteration(save_dir)
            code = -1.0 if step is None else float(step)
        except TrainingCheckpointError as exc:
            code, error = -2.0, exc
    if world > 1:
        code = _all_reduce([code if rank == 0 else -3.0], op=dist.ReduceOp.MAX)[0]
    if code == -2.0:
        raise error or TrainingCheckpointError(f"rank 0 could not read the latest checkpoint under {save_dir}")
    return None if code < 0 else int(code)


def _run_settings(config: TokenizerConfig, opts: TrainOptions, world: int) -> dict[str, Any]:
    """Settings a training checkpoint must share with the run resuming it (``None``: not used by this run)."""
    return {
        "model": config.to_dict(),
        "codebook_size": config.codebook_size,
        "latent_shape": list(config.latent_shape(opts.num_frames, opts.resolution, opts.resolution)),
        "num_frames": opts.num_frames,
        "resolution": opts.resolution,
        "discriminator": ({"channels": opts.disc_channels, "layers": opts.disc_layers}
                          if opts.disc_weight > 0 else None),
        "ema": True if opts.ema_decay > 0 else None,
        "world_size": world,
    }


def _save_training_state(opts: TrainOptions, step: int, state: dict[str, Any], rng: dict[str, Any],
                         settings: dict[str, Any]) -> None:
    """Write ``save/iter_XXXXXXX/`` (state.pt from rank 0, rng_rank{r}.pt = ``rng`` from every rank), mark it latest.

    The files are written (and fsync-ed) in ``save/.iter_XXXXXXX.tmp/``; rank 0 adds ``manifest.json``
    (sizes, SHA-256, ``settings``), renames the directory into place and replaces the latest file atomically
    (:func:`~.checkpoint.publish_training_checkpoint`), so a crash never leaves a half checkpoint marked latest.
    """
    rank, world = _dist_info()
    if rank == 0:
        stage_training_checkpoint(opts.save, step)
    if world > 1:
        dist.barrier()
    staging = training_staging_dir(opts.save, step)
    if not staging.is_dir():
        raise RuntimeError(f"--save {opts.save} is not shared: rank {rank} does not see {staging}, which rank 0 "
                           "created (put --save on a filesystem every node sees)")
    write_training_file(rng, staging / f"rng_rank{rank}.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_training_file(state, staging / "state.pt")
        final = publish_training_checkpoint(opts.save, step, settings)
        log.info("saved training state at step %d to %s", step, final)
    if world > 1:
        dist.barrier()


def _load_training_state(load_dir: str, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(state, this rank's rng)`` of the latest checkpoint under ``load_dir``; ``None`` if none exists.

    The checkpoint is verified against its manifest and ``settings`` (see
    :func:`~.checkpoint.load_training_checkpoint`); files are read with ``torch.load(weights_only=True)``.

    Raises:
        TrainingCheckpointError: damaged checkpoint (missing / truncated / altered file, garbled latest file)
            or one written for other settings (names the checkpoint and each differing setting).
    """
    step = _rank0_latest(load_dir)
    if step is None:
        return None
    loaded = load_training_checkpoint(load_dir, _dist_info()[0], settings, step=step)
    return None if loaded is None else loaded[1:]


def _restore(module: Any, saved: dict[str, Any], what: str, folder: Path) -> None:
    """``module.load_state_dict(saved)`` with a clear error naming the checkpoint on a mismatch."""
    try:
        module.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines[:4]) + (f" (and {len(lines) - 4} more)" if len(lines) > 4 else "")
        raise TrainingCheckpointError(f"checkpoint {folder}: the saved {what} does not fit this run: "
                                      f"{detail or repr(exc)}") from exc


def _recon_grid(video: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Float ``[3, 2H, kW]`` in [0, 1]: first/middle/last frames of one clip, original above reconstruction."""
    t = video.shape[1]
    frames = sorted({0, t // 2, t - 1})
    top = torch.cat([video[:, i] for i in frames], dim=-1)
    bottom = torch.cat([recon[:, i] for i in frames], dim=-1)
    return ((torch.cat([top, bottom], dim=-2).clamp(-1, 1) + 1) / 2).detach().cpu()


def _start_process_group(opts: TrainOptions, cuda_available: bool | None = None) -> tuple[int, int, bool, DataDevice]:
    """Choose this rank's device from ``opts.device`` (:func:`data_prep.device.choose_device`; CUDA
    availability from torch unless ``cuda_available`` is given), make it current, set the thread count
    (:func:`_setup_threads`) and, under torchrun (WORLD_SIZE > 1), start a process group (nccl on CUDA,
    gloo on CPU) unless one exists.

    Returns:
        ``(rank, world size, whether this call created the group, the device choice)`` (the creator
        destroys the group at the end).

    Raises:
        ValueError: ``opts.device`` names CUDA on a machine without it, or is not a device name.
    """
    choice = choose_device(opts.device, cuda_available=cuda_available)
    activate(choice)
    _setup_threads()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created_group = world > 1 and not dist.is_initialized()
    if created_group:  # the timeout also bounds how far apart ranks may finish indexing / decoding the videos
        dist.init_process_group(choice.distributed_backend,
                                timeout=datetime.timedelta(minutes=opts.distributed_timeout_minutes))
    rank, world = _dist_info()
    return rank, world, created_group, choice


def _checked_config(opts: TrainOptions) -> TokenizerConfig:
    """The tokenizer config of ``opts.config``, once the options that do not depend on data are checked.

    Raises:
        FileNotFoundError / ValueError: missing or bad config; T not 1 + 4n or resolution not a multiple
            of the spatial stride (:meth:`TokenizerConfig.latent_shape`); unknown ``gan_loss``; ``perceptual_weight`` > 0
            without ``perceptual_network``; ``warmup_ratio`` outside [0, 1); ``crop_size`` larger than the
            resolution or not a multiple of the spatial stride.
    """
    config = TokenizerConfig.from_yaml(opts.config)
    config.latent_shape(opts.num_frames, opts.resolution, opts.resolution)
    if opts.crop_size is not None:
        if opts.crop_size > opts.resolution:
            raise ValueError(f"--crop-size {opts.crop_size} is larger than --resolution {opts.resolution}")
        try:
            config.latent_shape(opts.num_frames, opts.crop_size, opts.crop_size)
        except ValueError as exc:
            raise ValueError(f"--crop-size {opts.crop_size}: {exc}") from None
    if opts.gan_loss not in ("hinge", "non_saturating"):
        raise ValueError(f"gan_loss must be 'hinge' or 'non_saturating', got {opts.gan_loss!r}")
    if opts.perceptual_weight > 0 and not opts.perceptual_network:
        raise ValueError("perceptual_weight > 0 needs perceptual_network (a TorchScript file you supply)")
    if opts.warmup_ratio is not None and not 0 <= opts.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {opts.warmup_ratio}")
    return config


@dataclass
class _Trainables:
    """Everything one rank trains or updates, built by :meth:`build`.

    Attributes:
        model: the tokenizer; ``ddp``: the same, DDP-wrapped when world > 1 (used for the forward).
        optimizer: AdamW of the tokenizer (betas 0.9 / 0.99, ``weight_decay``).
        disc, disc_ddp, opt_d, disc_lr: the 3D PatchGAN discriminator (DDP-wrapped when world > 1), its
            AdamW and peak learning rate; ``disc`` / ``disc_ddp`` / ``opt_d`` are None without the GAN.
        lecam: LeCam's EMA anchors of this rank's discriminator logits.
        ema: EMA of the tokenizer weights (``AveragedModel``), None when ``ema_decay`` is 0.
        perceptual: the perceptual loss, None when ``perceptual_weight`` is 0.
        device: where all of them live; precision: "bf16" (autocast of the convolutions) or "fp32".
    """

    model: VideoTokenizer
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    disc: PatchDiscriminator3d | None
    disc_ddp: torch.nn.Module | None
    opt_d: torch.optim.Optimizer | None
    disc_lr: float
    lecam: LeCamEMA
    ema: AveragedModel | None
    perceptual: PerceptualLoss | None
    device: torch.device
    precision: str

    @classmethod
    def build(cls, opts: TrainOptions, config: TokenizerConfig, world: int,
              choice: DataDevice | None = None) -> _Trainables:
        """Seed torch with ``opts.seed``, then build tokenizer, discriminator, LeCam, EMA and perceptual
        loss in that order on the CPU (so a seed gives the same weights on every rank, in every run and on
        every device), move them to ``choice.device`` (default: the CPU), wrap the tokenizer and
        discriminator in DDP when ``world`` > 1 (``device_ids`` on CUDA; collective: DDP broadcasts rank
        0's weights) and create the optimizers for the moved parameters. The precision is
        ``opts.precision`` resolved for the device.

        Raises:
            FileNotFoundError: no file at ``perceptual_network``. RuntimeError: not a TorchScript archive.
        """
        choice = choice or choose_device("cpu")
        device = choice.device
        torch.manual_seed(opts.seed)
        model = VideoTokenizer(config).to(device)
        model.set_recompute(opts.recompute_granularity)
        disc = PatchDiscriminator3d(config.in_channels, opts.disc_channels, opts.disc_layers).to(device) \
            if opts.disc_weight > 0 else None
        lecam = LeCamEMA(opts.lecam_decay).to(device)
        ema = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(opts.ema_decay)) \
            if opts.ema_decay > 0 else None
        perceptual = (PerceptualLoss(opts.perceptual_network, device=device).to(device)
                      if opts.perceptual_weight > 0 else None)
        ids = dict(device_ids=[device.index]) if choice.is_cuda else {}
        ddp = DDP(model, **ids) if world > 1 else model
        disc_ddp = DDP(disc, **ids) if (world > 1 and disc is not None) else disc
        optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.99),
                                      weight_decay=opts.weight_decay)
        disc_lr = opts.disc_lr if opts.disc_lr is not None else opts.lr
        opt_d = torch.optim.AdamW(disc.parameters(), lr=disc_lr, betas=(0.9, 0.99)) if disc is not None else None
        return cls(model, ddp, optimizer, disc, disc_ddp, opt_d, disc_lr, lecam, ema, perceptual, device,
                   choice.resolve_precision(opts.precision))

    @property
    def num_params(self) -> int:
        """Number of tokenizer parameters."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last convolution weight (VQGAN's adaptive GAN weight compares gradients there)."""
        return self.model.decoder.layers[-1].conv.weight

    def exported(self, opts: TrainOptions) -> VideoTokenizer:
        """The weights to evaluate and export: the EMA when enabled and ``export_ema``, else the model."""
        return self.ema.module if (self.ema is not None and opts.export_ema) else self.model

    def shared_state(self, opts: TrainOptions, step: int, elapsed: float) -> dict[str, Any]:
        """The checkpoint's ``state.pt`` (rank 0's): step, elapsed seconds, model, optimizer, LeCam,
        options, and discriminator + its optimizer / EMA when present."""
        state = {"step": step, "elapsed": elapsed, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "lecam": self.lecam.state_dict(), "options": opts.to_dict()}
        if self.disc is not None:
            state["discriminator"] = self.disc.state_dict()
            state["disc_optimizer"] = self.opt_d.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def rank_state(self, generator: torch.Generator) -> dict[str, Any]:
        """The checkpoint's ``rng_rank{r}.pt``: the data-order ``generator`` (the same state on every rank,
        see the module docstring), torch's RNG, LeCam's anchors
        (EMAs of this rank's logits) and, on CUDA, this rank's CUDA RNG (``"cuda"``)."""
        state = {"generator": generator.get_state(), "torch": torch.get_rng_state(), "lecam": self.lecam.state_dict()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any], rng: dict[str, Any], generator: torch.Generator, folder: Path) -> int:
        """Load a checkpoint's ``state`` and this rank's ``rng`` (see :meth:`shared_state`,
        :meth:`rank_state`) into the modules, optimizers, ``generator`` and torch's RNG.

        Returns:
            the checkpoint's step.

        Raises:
            TrainingCheckpointError: a part is missing or does not fit this run (names ``folder``).
        """
        _restore(self.model, state["model"], "tokenizer", folder)
        _restore(self.optimizer, state["optimizer"], "tokenizer optimizer", folder)
        if self.disc is not None:
            if "discriminator" not in state:
                raise TrainingCheckpointError(f"checkpoint {folder} has no discriminator but disc_weight > 0")
            _restore(self.disc, state["discriminator"], "discriminator", folder)
            _restore(self.opt_d, state["disc_optimizer"], "discriminator optimizer", folder)
        if self.ema is not None:
            if "ema" not in state:
                raise TrainingCheckpointError(f"checkpoint {folder} has no EMA but ema_decay > 0")
            _restore(self.ema, state["ema"], "EMA", folder)
        # this rank's anchors (older checkpoints only hold rank 0's, in state.pt)
        _restore(self.lecam, rng.get("lecam", state["lecam"]), "LeCam anchors", folder)
        try:
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and "cuda" in rng:  # absent when saved on CPU; unused on CPU
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        except (KeyError, RuntimeError, TypeError) as exc:
            raise TrainingCheckpointError(
                f"checkpoint {folder}: unusable RNG state for rank {_dist_info()[0]}: {exc}") from exc
        return int(state["step"])


def _share_generator(generator: torch.Generator) -> bool:
    """Give every rank rank 0's data-order ``generator`` state (a broadcast; collective when distributed).

    Global-batch sampling needs the same state on every rank. Runs seed it identically and checkpoints
    save equal states, so this is a no-op for them; a checkpoint written before global-batch sampling
    (ranks seeded ``seed + 1000 * rank``) would otherwise leave the ranks drawing different global batches.

    Returns:
        True when this rank's state changed (logged as a warning by the caller).
    """
    if _dist_info()[1] == 1:
        return False
    mine = generator.get_state()
    shared = mine.clone().to(_collective_device())
    dist.broadcast(shared, src=0)
    shared = shared.cpu()
    if torch.equal(shared, mine):
        return False
    generator.set_state(shared)
    return True


def _resume(opts: TrainOptions, trainables: _Trainables, generator: torch.Generator,
            settings: dict[str, Any]) -> tuple[int, float, bool]:
    """Restore the latest checkpoint under ``opts.load`` (verified against ``settings``), if any.

    Returns:
        ``(step, elapsed seconds, loaded)`` to continue from; ``(0, 0.0, False)`` when ``opts.load`` holds no
        checkpoint (logged as a warning).

    Raises:
        TrainingCheckpointError: a damaged checkpoint or one for other settings (see
            :func:`_load_training_state`, :meth:`_Trainables.restore`).
    """
    loaded = _load_training_state(opts.load, settings)
    if loaded is None:
        log.warning("no checkpoint under %s: starting from scratch", opts.load)
        return 0, 0.0, False
    state, rng = loaded
    folder = training_iteration_dir(opts.load, int(state["step"]))
    step = trainables.restore(state, rng, generator, folder)
    if _share_generator(generator):
        log.warning("checkpoint %s: rank %d's data-order generator differs from rank 0's (saved before global-batch "
                    "sampling?): using rank 0's", folder, _dist_info()[0])
    if _dist_info()[0] == 0:
        log.info("resumed from %s at step %d", folder, step)
    return step, float(state["elapsed"]), True


@dataclass
class _StepOutcome:
    """One training step's results: the ``batch`` ([B, C, T, H, W], an image batch when ``is_image``),
    the reconstruction ``recon`` of its first micro-batch (fp32, detached; rows ``[0, m)`` of ``batch``),
    the generator's total ``loss`` and ``rec_loss`` and ``mse`` (scalar tensors, means over the batch), the
    learning rate ``lr``, and with the GAN on (``gan_on``) the generator's adversarial term
    ``g_adv``, its weight ``gan_weight`` and the discriminator's ``d_loss`` (None otherwise)."""

    batch: torch.Tensor
    recon: torch.Tensor
    is_image: bool
    lr: float
    loss: torch.Tensor
    rec_loss: torch.Tensor
    mse: torch.Tensor
    gan_on: bool
    g_adv: torch.Tensor | None = None
    gan_weight: torch.Tensor | float | None = None
    d_loss: torch.Tensor | None = None


def _train_step(opts: TrainOptions, t: _Trainables, bank: ClipBank, generator: torch.Generator, step: int,
                progress: float, batch_size: int | None = None,
                micro_batch_size: int | None = None) -> _StepOutcome:
    """Step ``step`` (0-based): set the learning rates (:func:`_lr_at` at ``progress``), draw this rank's
    ``batch_size`` clips (default ``opts.batch_size``) or ``opts.image_batch_size`` frames of the step's
    global batch from ``bank`` with ``generator`` (the same state on every rank, see the module docstring),
    update the tokenizer (reconstruction + optional perceptual and adversarial terms, clipping, EMA
    update), then, with the GAN on, the discriminator (hinge / non-saturating loss + LeCam, clipping,
    anchor update). Collective when DDP-wrapped.

    With ``micro_batch_size`` (a divisor of ``batch_size``; image steps are not split) the clips run as
    consecutive micro-batches: each one's losses, divided by their number, are back-propagated (DDP's
    all-reduce only after the last one), so the accumulated gradients are those of the mean over all the
    clips, as in one pass; LeCam's anchors move once, by the means over all of them. Per micro-batch: the
    adaptive GAN weight (its gradient-norm ratio is not a mean), like per rank under DDP.

    The batch is drawn on the CPU and copied to ``t.device``; the tokenizer and discriminator forwards run
    under :func:`data_prep.device.autocast` at ``t.precision``, and their outputs are cast to fp32 before
    every loss (see the module docstring)."""
    lr = _lr_at(opts, step, progress)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    is_image = opts.image_every > 0 and step % opts.image_every == opts.image_every - 1
    if is_image:
        batch = bank.sample_images(opts.image_batch_size, generator)
    else:
        batch = bank.sample_clips(opts.batch_size if batch_size is None else batch_size, generator,
                                  crop=opts.crop_size)
    batch = to_device(batch, t.device)
    gan_on = t.disc is not None and step >= opts.disc_start
    split = micro_batch_size if micro_batch_size and not is_image else len(batch)
    if len(batch) % split:
        raise ValueError(f"micro_batch_size {split} must divide the {len(batch)} clips of a step")
    chunks = batch.split(split)
    count = len(chunks)

    # ---- generator (tokenizer) step
    if gan_on:
        t.disc.requires_grad_(False)  # plain module (not DDP) in the G step: D's grads are not needed here
    t.optimizer.zero_grad(set_to_none=True)
    recons, terms = [], collections.defaultdict(list)
    for i, real in enumerate(chunks):
        with _accumulating(t.ddp, i < count - 1):
            with autocast(t.device, t.precision):
                recon, _ = t.ddp(real)
            recon = recon.float()
            mse = F.mse_loss(recon, real)
            rec_loss = opts.l2_weight * mse + opts.l1_weight * F.l1_loss(recon, real)
            if t.perceptual is not None:
                rec_loss = rec_loss + opts.perceptual_weight * t.perceptual(real, recon)
            loss = rec_loss
            if gan_on:
                with autocast(t.device, t.precision):
                    logits_fake = t.disc(recon)
                g_adv = generator_loss(logits_fake.float(), opts.gan_loss)
                gan_weight = opts.disc_weight * (
                    adaptive_generator_weight(rec_loss, g_adv, t.last_layer) if opts.adaptive_weight else 1.0)
                loss = rec_loss + gan_weight * g_adv
                terms["g_adv"].append(g_adv.detach())
                terms["gan_weight"].append(gan_weight)  # a float without the adaptive weight: no device copy
            (loss / count if count > 1 else loss).backward()
        recons.append(recon.detach())
        for name, value in (("loss", loss), ("rec_loss", rec_loss), ("mse", mse)):
            terms[name].append(value.detach())
    if opts.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), opts.grad_clip)
    t.optimizer.step()
    if t.ema is not None:
        t.ema.update_parameters(t.model)
    out = _StepOutcome(batch, recons[0], is_image, lr, _mean(terms["loss"]), _mean(terms["rec_loss"]),
                       _mean(terms["mse"]), gan_on)
    if gan_on:
        out.g_adv, out.gan_weight = _mean(terms["g_adv"]), _mean(terms["gan_weight"])

    # ---- discriminator step
    if gan_on:
        t.disc.requires_grad_(True)
        for group in t.opt_d.param_groups:
            group["lr"] = _lr_at(opts, step, progress, peak=t.disc_lr)
        t.opt_d.zero_grad(set_to_none=True)
        reals, fakes, d_losses = [], [], []
        for i, (real, fake) in enumerate(zip(chunks, recons)):
            with _accumulating(t.disc_ddp, i < count - 1):
                with autocast(t.device, t.precision):
                    logits = t.disc_ddp(torch.cat([real, fake]))
                logits_real, logits_fake = logits.float().chunk(2)
                d_loss = discriminator_loss(logits_real, logits_fake, opts.gan_loss)
                if opts.lecam_weight > 0:
                    d_loss = d_loss + opts.lecam_weight * t.lecam(logits_real, logits_fake)
                (d_loss / count if count > 1 else d_loss).backward()
            reals.append(logits_real.detach())
            fakes.append(logits_fake.detach())
            d_losses.append(d_loss.detach())
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(t.disc.parameters(), opts.grad_clip)
        t.opt_d.step()
        t.lecam.update(torch.cat(reals), torch.cat(fakes))
        out.d_loss = _mean(d_losses)
    return out


def _accumulating(module: torch.nn.Module, more: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` while ``more`` micro-batches of the step follow (their gradients accumulate locally
    and are all-reduced with the last one's); nothing otherwise or for a plain module."""
    if more and isinstance(module, DDP):
        return module.no_sync()
    return contextlib.nullcontext()


def _mean(values: list) -> Any:
    """The mean of a step's per-micro-batch scalars (tensors on the device or floats; the value itself for one
    micro-batch), without reading a tensor back to the host."""
    return values[0] if len(values) == 1 else sum(values) / len(values)


def _rank_means(out: _StepOutcome) -> dict[str, float]:
    """The step's logged scalars averaged over the ranks (a collective when distributed): ``loss``,
    ``rec_loss``, ``mse`` and, with the GAN on, ``g_adv``, ``gan_weight``, ``d_loss``.

    Every rank's value is a mean over its rows and every rank holds as many rows, so the mean over the ranks
    of the reconstruction terms is the global batch's mean, the value a 1-rank run with the global batch
    logs; the GAN terms are the mean of the per-rank values."""
    names = ["loss", "rec_loss", "mse"] + (["g_adv", "gan_weight", "d_loss"] if out.gan_on else [])
    values = [float(getattr(out, name)) for name in names]
    world = _dist_info()[1]
    if world > 1:
        values = [v / world for v in _all_reduce(values)]
    return dict(zip(names, values))


class _ProgressLog:
    """Rank 0's log lines and TensorBoard scalars / images of a training run (other ranks: nothing).

    Args:
        opts: ``log_interval``, ``tensorboard_dir``, ``image_log_interval`` are read.
        rank: this process's rank.
    """

    def __init__(self, opts: TrainOptions, rank: int) -> None:
        self.opts, self.enabled = opts, rank == 0
        self.writer = None
        self.start = self.last_time = time.time()
        self.last_step = 0
        if self.enabled and opts.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(opts.tensorboard_dir)

    def announce(self, t: _Trainables, bank: ClipBank, world: int, micro: tuple[int, int]) -> None:
        """The run's opening line: parameters, videos, clip windows, world, batch (``micro``: the micro-batch
        size and count of :func:`micro_batches`), GAN and EMA settings."""
        if self.enabled:
            opts = self.opts
            size, count = micro
            log.info("tokenizer: %.2fM parameters, %d videos %s, %d training clip windows (every rank), "
                     "%d evaluation clips on rank 0, world %d, %d clips per step (%d micro-batches of %d per rank), "
                     "device %s, precision %s, GAN %s, EMA %s",
                     t.num_params / 1e6, bank.num_videos, bank.names[:8] + (["..."] if bank.num_videos > 8 else []),
                     len(bank.windows),
                     len(bank.eval_windows), world, size * count * world, count, size, t.device, t.precision,
                     f"{opts.gan_loss} from step {opts.disc_start}" if t.disc is not None else "off",
                     opts.ema_decay if t.ema is not None else "off")

    def begin(self, start: float, step: int) -> None:
        """Training (re)starts at ``step``; ``start`` is the wall time the run's elapsed time counts from."""
        self.start, self.last_time, self.last_step = start, time.time(), step

    def step(self, step: int, out: _StepOutcome, means: dict[str, float], lecam: LeCamEMA) -> None:
        """After step ``step`` (1-based): at the log interval (and step 1) a line with loss, batch PSNR,
        GAN terms (``means``: :func:`_rank_means`, the global batch's), lr, steps/s and elapsed seconds,
        plus TensorBoard scalars; at ``image_log_interval`` a reconstruction grid of rank 0's first clip
        (the global batch's first)."""
        opts = self.opts
        if self.enabled and (step % opts.log_interval == 0 or step == 1):
            now = time.time()
            rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
            kind = "image" if out.is_image else "video"
            gan_text = ""
            if out.gan_on:
                gan_text = (f" | g_adv {means['g_adv']:.3f} x {means['gan_weight']:.3g}"
                            f" | d_loss {means['d_loss']:.3f}")
            log.info("step %6d | loss %.4f | psnr %.2f dB (%s batch)%s | lr %.2e | %.2f steps/s | %.0fs",
                     step, means["loss"], psnr_from_mse(means["mse"]), kind, gan_text, out.lr, rate,
                     now - self.start)
            if self.writer:
                w = self.writer
                w.add_scalar("train/loss", means["loss"], step)
                w.add_scalar("train/rec_loss", means["rec_loss"], step)
                w.add_scalar(f"train/psnr_{kind}", psnr_from_mse(means["mse"]), step)
                w.add_scalar("train/lr", out.lr, step)
                w.add_scalar("train/steps_per_s", rate, step)
                if out.gan_on:
                    w.add_scalar("train/g_adv", means["g_adv"], step)
                    w.add_scalar("train/gan_weight", means["gan_weight"], step)
                    w.add_scalar("train/d_loss", means["d_loss"], step)
                    w.add_scalar("train/lecam_ema_real", float(lecam.ema_real), step)
                    w.add_scalar("train/lecam_ema_fake", float(lecam.ema_fake), step)
            self.last_time, self.last_step = now, step
        if self.writer and opts.image_log_interval and step % opts.image_log_interval == 0:
            self.writer.add_image(f"recon/{'image' if out.is_image else 'video'}",
                                  _recon_grid(out.batch[0], out.recon[0]), step)

    def final(self, step: int, seconds: float, psnr: float, n_eval: int) -> None:
        """The closing line and the ``eval/psnr`` scalar; closes TensorBoard."""
        if self.enabled:
            log.info("final: %d steps in %.0fs (%.2f steps/s), reconstruction PSNR %.2f dB on %d %s clips",
                     step, seconds, step / max(seconds, 1e-9), psnr, n_eval,
                     "held-back" if self.opts.holdout_fraction > 0 else "(seen footage)")
            if self.writer:
                self.writer.add_scalar("eval/psnr", psnr, step)
        self.close()

    def close(self) -> None:
        """Flush and close TensorBoard (nothing without it)."""
        if self.writer:
            self.writer.close()
            self.writer = None


def check_options(opts: TrainOptions, world: int) -> tuple[int, int]:
    """Refuse option combinations before any work; returns :func:`micro_batches` ``(size, count)``.

    Raises:
        ValueError: ``exit_signal_handler`` without ``save`` (the state saved on the signal is what a
            requeued job resumes from), or a batch that does not split into micro-batches over ``world``
            ranks (:func:`micro_batches`).
    """
    if opts.exit_signal_handler and not opts.save:
        raise ValueError("exit_signal_handler needs save: on the signal the training state is saved there, and a "
                         "requeued job resumes from it with load")
    return micro_batches(opts, world)


def train_tokenizer(opts: TrainOptions) -> dict[str, Any]:
    """Train a :class:`VideoTokenizer` on clips of the videos under ``opts.data`` and save it (rank 0).

    Runs on ``opts.device`` (auto: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU) at
    ``opts.precision``. Under torchrun (WORLD_SIZE > 1) a process group (nccl on CUDA, gloo on CPU) is
    created and the tokenizer and discriminator are wrapped in DDP; every rank draws the same global batch
    of ``batch_size x world`` clips from all training windows and trains on its rows, so N ranks equal one
    rank with the global batch (see the module docstring); only rank 0 writes the tokenizer, the training
    state's shared part and TensorBoard. Stops after ``train_steps``, ``max_minutes`` (agreed across
    ranks) or ``exit_interval`` steps. With ``exit_signal_handler``, SIGTERM / SIGUSR1 to any rank from the
    start on (:class:`nbp_common.exit_control.ExitControl`) stops every rank after the same step: the
    training state is saved into ``save`` and the run returns without evaluating or exporting.

    Returns:
        ``{"steps", "seconds", "final_loss", "psnr", "eval_clips", "parameters", "output", "device",
        "precision"}`` (``final_loss``: the last step's loss, mean over ranks; ``psnr`` of the exported
        weights: the EMA when enabled, over every rank's evaluation clips); after an exit signal
        ``{"steps", "seconds", "final_loss", "stopped", "save", "device", "precision"}`` (``stopped``: why).

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: missing config, data directory or perceptual
            network, bad config or options, no usable video, T not 1 + 4n, resolution not a multiple of 8.
        TrainingCheckpointError (a ValueError): ``load`` names a damaged checkpoint or one written for other
            settings (model config, codebook size, latent shape, discriminator, EMA, world size); raised
            before the first step, naming the checkpoint and each differing value.
    """
    control = ExitControl(signal_handler=opts.exit_signal_handler).install()  # from the start, as in Megatron-LM
    try:
        return _train(opts, control)
    finally:
        control.restore()


def _train(opts: TrainOptions, control: ExitControl) -> dict[str, Any]:
    """:func:`train_tokenizer` with its signal handler installed (``control``)."""
    rank, world, created_group, choice = _start_process_group(opts)
    config = _checked_config(opts)
    micro = check_options(opts, world)
    batch_size = micro[0] * micro[1]  # clips per step on this rank (per_rank_batch_size)
    trainables = _Trainables.build(opts, config, world, choice)
    bank = load_clip_bank(opts.data, opts.resolution, opts.num_frames, opts.frame_stride, rank, world,
                          holdout_fraction=opts.holdout_fraction, clip_source=opts.clip_source,
                          num_workers=opts.num_workers)
    generator = torch.Generator().manual_seed(opts.seed)  # data order: the same on every rank (global batch)
    settings = _run_settings(config, opts, world)
    step, elapsed_before, resumed = _resume(opts, trainables, generator, settings) if opts.load else (0, 0.0, False)
    progress_log = _ProgressLog(opts, rank)
    progress_log.announce(trainables, bank, world, micro)

    # the step whose state --save already holds: only a run resumed from --save itself (a requeued job that had
    # finished) may skip the final save; a new run into a --save holding another run's checkpoints replaces them.
    # Agreed over the ranks (paths may resolve differently on other nodes): a save is collective.
    resumed_from_save = bool(opts.save and resumed and _same_directory(opts.load, opts.save))
    resumed_from_save = _all_reduce([float(resumed_from_save)], op=dist.ReduceOp.MIN)[0] > 0
    last_saved = step if resumed_from_save else None
    if opts.save and not resumed_from_save and rank == 0:
        _warn_foreign_checkpoints(opts.save)

    def save_state(at_step: int, elapsed: float) -> None:
        nonlocal last_saved
        _save_training_state(opts, at_step, trainables.shared_state(opts, at_step, elapsed),
                             trainables.rank_state(generator), settings)
        last_saved = at_step

    start = time.time() - elapsed_before
    first_step, loss_value = step, float("nan")
    progress_log.begin(start, step)
    budget = opts.max_minutes * 60 if opts.max_minutes else None
    control.device = trainables.device  # its all-reduce: a CUDA tensor under nccl
    stopped = None
    trainables.model.train()
    while step < opts.train_steps:
        elapsed = _all_reduce([time.time() - start], op=dist.ReduceOp.MAX if world > 1 else None)[0]
        if budget is not None and elapsed >= budget:
            break
        if opts.exit_interval and step - first_step >= opts.exit_interval:
            break
        progress = max(step / opts.train_steps, elapsed / budget if budget else 0.0)
        out = _train_step(opts, trainables, bank, generator, step, progress, batch_size, micro[0])
        step += 1
        means = _rank_means(out)
        loss_value = means["loss"]
        progress_log.step(step, out, means, trainables.lecam)
        if opts.save and opts.save_interval and step % opts.save_interval == 0:
            save_state(step, time.time() - start)
        reason = control.check()  # collective when enabled: the same answer on every rank
        if reason is not None and step < opts.train_steps:  # after the last step: finish (evaluate, export)
            stopped = control.describe(reason)
            break
    seconds = time.time() - start
    if opts.save and last_saved != step:  # known on every rank alike: no rank re-reads the latest file here
        save_state(step, seconds)
    if stopped is not None:
        if rank == 0:
            log.info("%s: stopped after step %d, training state saved in %s; not exported (resume with --load)",
                     stopped, step, opts.save)
        result = {"steps": step, "seconds": round(seconds, 1), "final_loss": loss_value, "stopped": stopped,
                  "save": opts.save, "device": str(trainables.device), "precision": trainables.precision}
        progress_log.close()
        bank.close()
        _leave(world, created_group)
        return result
    export = trainables.exported(opts)
    psnr, n_eval = evaluate_psnr(export, bank, opts.eval_clips)
    result = {"steps": step, "seconds": round(seconds, 1), "final_loss": loss_value, "psnr": psnr,
              "eval_clips": n_eval, "parameters": trainables.num_params, "output": opts.output,
              "device": str(trainables.device), "precision": trainables.precision}
    progress_log.final(step, seconds, psnr, n_eval)
    if rank == 0:
        metadata = {"train": opts.to_dict(), "result": {k: result[k] for k in ("steps", "psnr", "eval_clips")},
                    "videos": bank.names, "weights": "ema" if export is not trainables.model else "raw"}
        save_tokenizer(export, opts.output, extra_metadata=metadata)
        log.info("saved tokenizer to %s", opts.output)
    bank.close()
    _leave(world, created_group)
    return result


def _leave(world: int, created_group: bool) -> None:
    """Wait for every rank (rank 0 may still be writing), then end the process group if this run made it."""
    if world > 1:
        dist.barrier()
    if created_group:
        dist.destroy_process_group()
