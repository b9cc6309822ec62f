"""Configuration of the MAGVITv2-style video tokenizer (Yu et al. 2023; NBP, Ren et al. 2025): the model's
hyper-parameters (:class:`TokenizerConfig`) and the training options (:class:`TrainOptions`)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from nbp_common.config import ConfigError, TypedConfig, cli_flags

from .layers import ACTIVATIONS, PAD_MODES

__all__ = ["TokenizerConfig", "TrainOptions", "SPATIAL_STRIDE", "TEMPORAL_STRIDE"]

SPATIAL_STRIDE = 8  # three 2x spatial downsamples (the default and MAGVITv2's; spatial_downsample can drop some)
TEMPORAL_STRIDE = 4  # two 2x causal temporal downsamples; the first frame stays alone


@dataclass
class TokenizerConfig:
    """Hyper-parameters of :class:`VideoTokenizer`.

    The encoder has ``len(channel_multipliers) == 4`` resolution levels with ``num_res_blocks`` residual
    units each (level i has ``base_channels * channel_multipliers[i]`` channels) and a 2x spatial
    downsample between consecutive levels (total stride 8); ``temporal_downsample[i]`` says whether the
    i-th downsample also halves time causally (exactly two do: stride 4, T = 1 + 4n -> 1 + n).
    ``num_mid_blocks`` extra residual units run at the lowest resolution. The decoder mirrors all of it.
    ``spatial_downsample[i]`` says whether the i-th downsample halves height and width (default: all three,
    stride 8, MAGVITv2's; dropping one gives stride 4, four times the tokens per frame: the CPU demo's
    choice, where a small model at 64x64 keeps far more of the scene).
    MAGVITv2 / NBP: base 128, multipliers [1, 2, 2, 4], 4 residual units, 4 mid units,
    temporal_downsample [False, True, True], FSQ levels [8, 8, 8, 5, 5, 5].

    Three switches select the exact math of the official NBP release (see ``official_import.py``);
    the defaults are this project's cheaper choices:
    ``activation`` "silu" | "swish_learned" (per-channel learned Swish slope, official),
    ``spatial_pad_mode`` "zeros" | "replicate" (official), ``decoder_upsample`` "next" (upsampling conv
    emits the next level's channels) | "current" (emits the current level's channels and the next level's
    first residual unit changes the width, official).

    Raises (from :meth:`validate`, run on construction):
        ValueError: a field with an invalid value (names the field and the rule).
    """

    base_channels: int = 128
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 4
    num_mid_blocks: int = 4
    levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    in_channels: int = 3
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    spatial_downsample: list[bool] = field(default_factory=lambda: [True, True, True])
    norm_groups: int = 32
    pad_mode: str = "replicate"
    spatial_pad_mode: str = "zeros"
    activation: str = "silu"
    decoder_upsample: str = "next"

    def __post_init__(self) -> None:
        self.channel_multipliers = [int(m) for m in self.channel_multipliers]
        self.levels = [int(level) for level in self.levels]
        self.temporal_downsample = [bool(flag) for flag in self.temporal_downsample]
        self.spatial_downsample = [bool(flag) for flag in self.spatial_downsample]
        self.validate()

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent token along height and width: 2 ** (number of spatial downsamples)."""
        return 2 ** sum(self.spatial_downsample)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid ``(T', H', W') = (1 + (T-1)/4, H/s, W/s)`` of a ``T x H x W`` video, s = spatial_stride.

        Raises:
            ValueError: T is not 1 + 4n (n >= 0), or H / W is not a positive multiple of s.
        """
        if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(
                f"number of frames must be 1 + {TEMPORAL_STRIDE}n (1, 5, 9, 13, 17, ...), got {num_frames}"
            )
        stride = self.spatial_stride
        for name, size in (("height", height), ("width", width)):
            if size < stride or size % stride:
                raise ValueError(f"{name} must be a positive multiple of the spatial stride {stride}, got {size}")
        return (1 + (num_frames - 1) // TEMPORAL_STRIDE, height // stride, width // stride)

    @property
    def codebook_size(self) -> int:
        """Number of FSQ codes, prod(levels)."""
        return math.prod(self.levels)

    @property
    def level_channels(self) -> list[int]:
        """Channels of each resolution level, ``base_channels * multiplier``."""
        return [self.base_channels * m for m in self.channel_multipliers]

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one."""
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}")
        if len(self.channel_multipliers) != 4 or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(
                "channel_multipliers must hold 4 positive ints (4 levels, 3 spatial 2x downsamples = "
                f"stride {SPATIAL_STRIDE}), got {self.channel_multipliers}"
            )
        if len(self.temporal_downsample) != 3 or sum(self.temporal_downsample) != 2:
            raise ValueError(
                "temporal_downsample must hold 3 flags (one per downsample) with exactly two True "
                f"(temporal stride {TEMPORAL_STRIDE}), got {self.temporal_downsample}"
            )
        if len(self.spatial_downsample) != 3 or not any(self.spatial_downsample):
            raise ValueError(
                "spatial_downsample must hold 3 flags (one per downsample), at least one True, got "
                f"{self.spatial_downsample}"
            )
        if self.num_res_blocks < 1 or self.num_mid_blocks < 0:
            raise ValueError(
                f"num_res_blocks must be >= 1 and num_mid_blocks >= 0, got "
                f"{self.num_res_blocks}, {self.num_mid_blocks}"
            )
        if not self.levels or any(level < 2 for level in self.levels):
            raise ValueError(f"levels (FSQ) must be a non-empty list of ints >= 2, got {self.levels}")
        if self.norm_groups < 1 or any(c % self.norm_groups for c in self.level_channels):
            raise ValueError(
                f"norm_groups={self.norm_groups} must divide every level's channel count {self.level_channels}"
            )
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if self.spatial_pad_mode not in PAD_MODES:
            raise ValueError(f"spatial_pad_mode must be one of {PAD_MODES}, got {self.spatial_pad_mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.decoder_upsample not in ("next", "current"):
            raise ValueError(f"decoder_upsample must be 'next' or 'current', got {self.decoder_upsample!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serializable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        """Build from a dict; unknown keys raise ``ValueError`` (catches typos in YAML files)."""
        if not isinstance(data, dict):
            raise ValueError(f"tokenizer config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tokenizer config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TokenizerConfig":
        """Read a YAML file; the fields may sit at top level or under a ``model:`` key.

        Raises:
            FileNotFoundError: missing file. ValueError: unknown keys or invalid values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer config not found: {path}")
        with path.open() as handle:
            data = yaml.safe_load(handle) or {}
        if isinstance(data, dict) and "model" in data:
            data = data["model"]
        return cls.from_dict(data)


class TrainOptions(TypedConfig):
    """Options of :func:`data_prep.tokenizer.train.train_tokenizer`; each field is a flag of
    ``launchers/train_tokenizer.py`` (data_prep.cli.train_tokenizer derives them), and the ``train:``
    section of the tokenizer YAML may set any of them (:meth:`yaml_defaults`).

    ``lr`` follows a linear warmup over ``warmup_steps`` (or ``warmup_ratio * train_steps`` when
    ``warmup_ratio`` is set) then a cosine (``lr_schedule`` "cosine") or linear ("linear") decay to
    ``min_lr_ratio * lr``; the decay's progress is the larger of step / train_steps and elapsed /
    max_minutes, so a run cut by the time limit still ends at a low learning rate. The optimizer is AdamW
    (betas 0.9 / 0.99); with ``weight_decay`` 0 it is Adam. ``batch_size`` is per rank;
    ``global_batch_size`` (when set) replaces it by global / world size. ``micro_batch_size`` splits a rank's
    clips of a step into micro-batches with accumulated gradients (memory for activations is per
    micro-batch; image steps are not split).

    Device: ``device`` "auto" = ``cuda:LOCAL_RANK`` when CUDA is available (nccl between ranks), else the
    CPU (gloo); ``precision`` "auto" = bf16 autocast on CUDA, fp32 on CPU (see
    :mod:`data_prep.tokenizer.train` for which parts stay fp32). ``image_every`` k > 0: every k-th step trains on
    ``image_batch_size`` single frames (1-frame videos) instead of clips.

    GAN: on when ``disc_weight > 0``, from step ``disc_start``; ``gan_loss`` "hinge" | "non_saturating";
    ``adaptive_weight`` scales the generator term by VQGAN's gradient-norm ratio (times ``disc_weight``);
    ``lecam_weight`` > 0 adds LeCam. ``ema_decay`` > 0 keeps an EMA of the tokenizer (exported if
    ``export_ema``). ``perceptual_network``: path of a TorchScript feature network (used when
    ``perceptual_weight`` > 0). ``save``/``save_interval``/``load``/``exit_interval``/``exit_signal_handler``
    as in Megatron.
    ``holdout_fraction``: tail of every video kept out of training for the final evaluation.

    Raises (construction, assignment):
        nbp_common.config.ConfigError: a value of the wrong type or an unknown option, named.
    """

    config: str = Field(description="tokenizer YAML (model: and optional train: sections)")
    data: str = Field(description="directory of videos (searched recursively)")
    output: str = Field(description="checkpoint to write (.safetensors)")
    resolution: int = Field(64, description="square crop size in pixels (multiple of 8)")
    crop_size: int | None = Field(None, description="train on random crop_size x crop_size squares of the "
                                                    "resolution x resolution frames (4x the clips per step at "
                                                    "half the side; the evaluation uses whole frames); unset = "
                                                    "whole frames")
    clip_source: Literal["memory", "stream"] = Field(
        "memory", description="memory: decode every video once and keep the frames (every rank; small datasets); "
                              "stream: keep frame counts only and decode each drawn clip from its file (any "
                              "dataset size; the same clips where containers count their frames right)")
    num_workers: int = Field(0, ge=0, description="processes that decode clips with clip_source stream (and count "
                                                  "frames at start); 0: the training process itself")
    num_frames: int = Field(17, description="frames per clip, 1 + 4n (e.g. 17)")
    frame_stride: int = Field(1, description="step between sampled frames")
    train_steps: int = Field(1000, description="optimizer steps", json_schema_extra=cli_flags("--train-iters"))
    max_minutes: float | None = Field(None, description="stop after this wall time (minutes); unset = no limit")
    batch_size: int = Field(4, description="clips per step per rank")
    lr: float = Field(2e-3, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.05, description="the cosine decay ends at this fraction of the peak learning "
                                                  "rate")
    warmup_steps: int = Field(20, description="linear warmup steps")
    warmup_ratio: float | None = Field(None, description="warmup over this fraction of train_steps (replaces "
                                                         "warmup_steps when set)")
    lr_schedule: Literal["cosine", "linear"] = Field("cosine", description="decay after the warmup: cosine or "
                                                                            "linear, to min_lr_ratio x lr")
    global_batch_size: int | None = Field(None, description="clips per step over all ranks; replaces batch_size by "
                                                            "global / world size (must divide)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="clips per forward and backward pass on each rank (Megatron-LM's flag): a rank's "
                                "clips of a step run as several micro-batches whose gradients are accumulated "
                                "before the optimizer steps (must divide them; the adaptive GAN weight is then "
                                "taken per micro-batch); unset: all of them at once")
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda "
                                            "or cuda:N")
    distributed_timeout_minutes: float = Field(
        60.0, gt=0, description="how long a rank waits for the others in a collective (Megatron-LM's flag): it "
                                "also bounds how far apart the ranks may finish indexing or decoding the videos")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 covers the convolutions of the "
                            "tokenizer and discriminator (FSQ, losses, optimizer and EMA stay fp32)")
    recompute_granularity: Literal["full"] | None = Field(
        None, description="full: keep only each residual block's input and recompute the block in the backward "
                          "pass (about a third more compute; the 370M layout stores ~2 instead of ~19 GiB of "
                          "activations per 17x128x128 clip in bf16); unset: store every activation")
    weight_decay: float = Field(0.0, description="AdamW weight decay of the tokenizer")
    grad_clip: float = Field(1.0, description="gradient clipping by global L2 norm (tokenizer and discriminator)")
    l1_weight: float = Field(1.0, description="weight of the L1 reconstruction loss")
    l2_weight: float = Field(1.0, description="weight of the L2 reconstruction loss")
    image_every: int = Field(0, description="every k-th step trains on single frames (0: never)")
    image_batch_size: int = Field(16, description="frames per image step per rank")
    seed: int = Field(1234, description="random seed (model init and clip sampling)")
    log_interval: int = Field(10, description="log every N steps")
    tensorboard_dir: str | None = Field(None, description="write TensorBoard scalars here (rank 0)")
    eval_clips: int = Field(128, description="non-overlapping clips per rank for the final PSNR")
    holdout_fraction: float = Field(
        0.0, description="tail fraction of every video held back from training, used for the final PSNR")
    gan_loss: Literal["hinge", "non_saturating"] = Field("hinge", description="GAN loss")
    disc_weight: float = Field(0.0, description="weight of the generator's adversarial term (0: no GAN)")
    disc_start: int = Field(0, description="step at which the discriminator and the GAN term start")
    disc_lr: float | None = Field(None, description="discriminator peak learning rate (unset: lr)")
    disc_channels: int = Field(64, description="width of the 3D PatchGAN's first layer")
    disc_layers: int = Field(3, description="stride-2 layers of the 3D PatchGAN")
    adaptive_weight: bool = Field(
        True, description="scale the adversarial term by VQGAN's adaptive gradient-norm ratio (--no-adaptive-weight: "
                          "use disc_weight as is)")
    lecam_weight: float = Field(0.0, description="LeCam regularization weight (0: off)")
    lecam_decay: float = Field(0.999, description="decay of LeCam's EMA anchors")
    perceptual_weight: float = Field(0.0, description="perceptual loss weight (needs perceptual_network)")
    perceptual_network: str | None = Field(
        None, description="TorchScript feature network you supply (nothing is downloaded)")
    ema_decay: float = Field(0.0, description="EMA decay of the tokenizer weights (0: off)")
    export_ema: bool = Field(True, description="export the EMA weights when an EMA is kept (--no-export-ema: the "
                                               "raw weights)")
    save: str | None = Field(None, description="directory for resumable training checkpoints (iter_XXXXXXX/); "
                                               "a run not resumed from it replaces its checkpoints (warned)")
    save_interval: int = Field(0, description="save the training state every N steps (0: only at the end, with "
                                              "save)")
    load: str | None = Field(None, description="resume from the latest checkpoint in this directory")
    exit_interval: int = Field(0, description="stop after N steps in this run, then save (0: no limit)")
    exit_signal_handler: bool = Field(
        False, description="on SIGTERM or SIGUSR1 (to any rank) every rank finishes its step, the training state "
                           "is saved into save and the run exits with status 0 without exporting the tokenizer, "
                           "so a requeued job resumes with load (Megatron-LM's flag; needs save)")
    image_log_interval: int = Field(0, description="TensorBoard original/reconstruction images every N steps "
                                                   "(0: never)")

    @classmethod
    def yaml_defaults(cls, config_path: str | os.PathLike) -> dict[str, Any]:
        """The ``train:`` section of a tokenizer YAML (option defaults); ``{}`` if absent.

        Raises:
            ConfigError: unknown keys in the section (a ``ValueError``).
        """
        with Path(config_path).open() as handle:
            data = yaml.safe_load(handle) or {}
        section = data.get("train", {}) if isinstance(data, dict) else {}
        unknown = sorted(set(section) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"invalid configuration: unknown keys in the train: section of {config_path}: "
                              f"{unknown}")
        return section
