"""The interface every NBP token layout implements (:class:`TokenLayout`).

A token layout turns clips of video tokens (and a condition) into the model's input sequence: it fixes
the sequence length, the condition prefix, the model ids of special, condition and video tokens, the
block id and position of every input position, the micro-batch construction, what a shard sample must
carry, the configuration and manifest checks that depend on it, the attention FLOPs and the forward
passes of generation. The attention rule itself lives in megatron_nbp.masks
(``block_id[key] <= block_id[query]``, padded keys never attended); a layout only assigns block ids.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from megatron_nbp.layouts.batch import LayoutBatch
from megatron_nbp.layouts.order import block_major_order
from megatron_nbp.layouts.plan import GenerationPlan


@dataclass(frozen=True)
class TokenLayout(ABC):
    """One NBP token layout of one model shape (immutable; build it with
    :func:`megatron_nbp.layouts.token_layout` or ``ModelConfig.token_layout``).

    Attributes:
        latent_shape: (T', H', W') latent tokens per clip, flattened (t, h, w)-major.
        block_shape: (bt, bh, bw) tokens per block, L = bt * bh * bw.
        vocab_size: video codes (the tokenizer codebook); model ids add :attr:`video_token_offset`.

    Class attributes:
        name: the value of ``model.layout`` that selects the layout.
        conditional: True when the layout generates from a condition prefix (class or text), False when
            it continues a prompt of video tokens.
        legacy_num_prefix_tokens: condition positions of an inference checkpoint of format 1, which did not
            store them.
    """

    name: ClassVar[str]
    conditional: ClassVar[bool] = False
    legacy_num_prefix_tokens: ClassVar[int] = 0

    latent_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    vocab_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_shape", tuple(int(x) for x in self.latent_shape))
        object.__setattr__(self, "block_shape", tuple(int(x) for x in self.block_shape))

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> "TokenLayout":
        """The layout of a ``megatron_nbp.config.ModelConfig`` (read from its fields)."""

    # ------------------------------------------------------------------ sizes and ids
    @property
    def block_size(self) -> int:
        """L, tokens per block."""
        return math.prod(self.block_shape)

    @property
    def num_video_tokens(self) -> int:
        """N, video tokens per clip."""
        return math.prod(self.latent_shape)

    @property
    @abstractmethod
    def seq_length(self) -> int:
        """S, model input positions per sample."""

    @property
    def num_prefix_tokens(self) -> int:
        """P, condition positions at the start of the input (0 without a condition)."""
        return 0

    @property
    def condition_vocab_size(self) -> int:
        """Number of condition ids (class labels or text ids, plus the null condition); 0 without one."""
        return 0

    @property
    def null_condition_id(self) -> int | None:
        """Condition id of the learned null condition (classifier-free guidance), or None."""
        return None

    @property
    def video_token_offset(self) -> int:
        """Model id of video code 0 (special and condition ids come first)."""
        return 0

    @property
    def total_vocab_size(self) -> int:
        """Model vocabulary before padding: special + condition + video ids."""
        return self.video_token_offset + self.vocab_size

    @property
    def condition_key(self) -> str | None:
        """Metadata key of a shard sample's condition ("label" or "text_ids"); None: no condition."""
        return None

    # ------------------------------------------------------------------ positions
    def block_order(self) -> torch.Tensor:
        """int64 [N] block-major order of the clip (megatron_nbp.layouts.order.block_major_order)."""
        return block_major_order(self.latent_shape, self.block_shape)

    def to_raster_order(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole clips from block order back to (t, h, w) order: int [B, N] -> int [B, N]."""
        order = self.block_order().to(tokens.device)
        return torch.empty_like(tokens).index_copy_(1, order, tokens)

    @abstractmethod
    def block_ids(self) -> torch.Tensor:
        """int64 [S] block id of every input position (non-decreasing)."""

    def position_ids(self) -> torch.Tensor:
        """int64 [S] learned absolute position of every input position, 0 .. S-1 (the model splits them
        into its condition and video-stream tables at P)."""
        return torch.arange(self.seq_length)

    @abstractmethod
    def grid_position_ids(self) -> torch.Tensor:
        """int64 [3, S] (t, h, w) 3D RoPE coordinates of every input position."""

    def positions(self, rope: bool) -> torch.Tensor:
        """:meth:`grid_position_ids` with ``rope`` (3D RoPE), else :meth:`position_ids`."""
        return self.grid_position_ids() if rope else self.position_ids()

    # ------------------------------------------------------------------ training data
    @abstractmethod
    def batch(self, video_tokens: torch.Tensor, condition: torch.Tensor | None = None,
              condition_padding: torch.Tensor | None = None) -> LayoutBatch:
        """A micro-batch in model form.

        Args:
            video_tokens: int [B, N] video codes of whole clips, (t, h, w)-major.
            condition: int [B, P] condition ids (conditional layouts only).
            condition_padding: bool [B, P], True at padded condition positions.

        Returns:
            LayoutBatch with tensors [B, S].

        Raises:
            ValueError: shapes or ids that do not fit the layout.
        """

    def sample_condition(self, condition: Any) -> Any:
        """A shard sample's condition (its metadata under :attr:`condition_key`) in the form
        :meth:`condition_batch` takes; None for a layout without a condition (whatever is given).

        Raises:
            ValueError: a condition the model cannot take (the message names it).
        """
        return None

    def condition_batch(self, conditions: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Condition ids int64 [B, P] and padding bool [B, P] of the samples' conditions (as returned by
        :meth:`sample_condition`); None for a layout without a condition.

        Raises:
            ValueError: an invalid condition.
        """
        return None

    def random_batch(self, batch_size: int, generator: torch.Generator | None = None) -> LayoutBatch:
        """A micro-batch of uniformly random clips (and conditions, unpadded), e.g. for memory or speed
        measurements: video codes are drawn first, as ``torch.randint(0, vocab_size, (B, N))``."""
        video = torch.randint(0, self.vocab_size, (batch_size, self.num_video_tokens), generator=generator)
        return self.batch(video)

    # ------------------------------------------------------------------ checks
    def config_problems(self) -> list[str]:
        """Reasons the layout's own configuration is invalid (``NBPConfig.validate`` lists them)."""
        return []

    def prompt_problems(self, condition_frames: int) -> list[str]:
        """Reasons ``condition_frames`` latent frames cannot be a generation prompt (block shape tiling
        already checked)."""
        return []

    def manifest_problems(self, manifest: dict) -> list[str]:
        """Reasons a token-shard manifest (data_prep.shards) does not fit the layout's conditions."""
        return []

    # ------------------------------------------------------------------ FLOPs and generation
    def attention_pairs(self) -> int:
        """(query, key) pairs the block-causal mask allows in one sample, no padding (megatron_nbp.flops)."""
        counts = self.block_ids().bincount()
        # positions are sorted by block id: a query sees every position whose block id is <= its own
        return int((counts * counts.cumsum(0)).sum())

    @abstractmethod
    def generation_plan(self, prompt_length: int | None = None) -> GenerationPlan:
        """The forward passes that generate one clip with a KV cache (megatron_nbp.layouts.plan).

        Args:
            prompt_length: video tokens given (frame prediction: a positive multiple of L, at most S);
                conditional layouts take None (their prompt is the condition).

        Raises:
            ValueError: a prompt length the layout cannot start from.
        """

    def _plan(self, steps: list) -> GenerationPlan:
        return GenerationPlan(tuple(steps), self.block_ids(), self.position_ids(), self.grid_position_ids())
