"""Configuration of the MAGVITv2-style video tokenizer (Yu et al. 2023; NBP, Ren et al. 2025)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .layers import ACTIVATIONS, PAD_MODES

__all__ = ["TokenizerConfig", "SPATIAL_STRIDE", "TEMPORAL_STRIDE"]

SPATIAL_STRIDE = 8  # three 2x spatial downsamples
TEMPORAL_STRIDE = 4  # two 2x causal temporal downsamples; the first frame stays alone


@dataclass
class TokenizerConfig:
    """Hyper-parameters of :class:`VideoTokenizer`.

    The encoder has ``len(channel_multipliers) == 4`` resolution levels with ``num_res_blocks`` residual
    units each (level i has ``base_channels * channel_multipliers[i]`` channels) and a 2x spatial
    downsample between consecutive levels (total stride 8); ``temporal_downsample[i]`` says whether the
    i-th downsample also halves time causally (exactly two do: stride 4, T = 1 + 4n -> 1 + n).
    ``num_mid_blocks`` extra residual units run at the lowest resolution. The decoder mirrors all of it.
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
    norm_groups: int = 32
    pad_mode: str = "replicate"
    spatial_pad_mode: str = "zeros"
    activation: str = "silu"
    decoder_upsample: str = "next"

    def __post_init__(self) -> None:
        self.channel_multipliers = [int(m) for m in self.channel_multipliers]
        self.levels = [int(level) for level in self.levels]
        self.temporal_downsample = [bool(flag) for flag in self.temporal_downsample]
        self.validate()

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
