"""Frame prediction (K600): no prefix, block size L (the NBP paper; official NBP release)::

    tokens    = video[:, :-L]           position i holds video token i
    labels    = video[:, L:]            position i predicts token i + L (the same slot one block later)
    block_ids = i // L                  attention: block_id[key] <= block_id[query]
    loss_mask = 1 everywhere            (every target is a video token)

Video token k is in block order (megatron_nbp.layouts.order). With L = 1 this is next-token prediction
(the NTP baseline) through the same code. Positions: ``position_ids`` are 0 .. S-1 (the video-stream
table); the 3D RoPE coordinates of video token z_k are its (t_k, h_k, w_k).

Generation: the first ``c`` latent frames (c*H*W tokens) are prefilled; the logits of the prompt's last
block predict the next block, and every later pass feeds the L tokens just sampled: (N - cHW) / L forward
passes (48 for 5x16x16, L = 16, c = 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_nbp.layouts.base import TokenLayout
from megatron_nbp.layouts.batch import LayoutBatch
from megatron_nbp.layouts.order import video_order
from megatron_nbp.layouts.plan import DecodeStep, GenerationPlan


def frame_prediction_grid_positions(latent_shape: tuple[int, int, int],
                                    block_shape: tuple[int, int, int]) -> torch.Tensor:
    """3D RoPE coordinates of the S = N - L frame-prediction inputs (video tokens 0 .. N-L-1 in block
    order): int64 [3, S]."""
    n, L = math.prod(latent_shape), math.prod(block_shape)
    return video_order(n, L, latent_shape, block_shape)[1][:, :-L]


def frame_prediction_block_ids(seq_length: int, block_size: int) -> torch.Tensor:
    """Block id of each of ``seq_length`` positions: int64 [S], ``i // block_size``."""
    return torch.arange(seq_length) // block_size


def frame_prediction_batch(video_tokens: torch.Tensor, block_size: int,
                           latent_shape: tuple[int, int, int] | None = None,
                           block_shape: tuple[int, int, int] | None = None) -> LayoutBatch:
    """Frame-prediction layout of a batch of clips.

    Args:
        video_tokens: int [B, N] video token ids of whole clips, flattened (t, h, w).
        block_size: L, tokens per block; must divide N.
        latent_shape: (T', H', W') for the 3D RoPE coordinates (default: (1, 1, N), a 1-D sequence).
        block_shape: (bt, bh, bw) with product L: the clip is reordered block-major
            (megatron_nbp.layouts.order); default: the input order.

    Returns:
        LayoutBatch with S = N - L.

    Raises:
        ValueError: if the input is not 2-D or L does not divide N.
    """
    if video_tokens.dim() != 2:
        raise ValueError(f"video_tokens must be [B, N], got shape {tuple(video_tokens.shape)}")
    batch, n = video_tokens.shape
    if block_size < 1 or n % block_size or n <= block_size:
        raise ValueError(f"block size {block_size} must divide the clip length {n} and be smaller")
    order, grid = video_order(n, block_size, latent_shape, block_shape)
    video_tokens = video_tokens.long() if order is None else video_tokens.long()[:, order]
    seq = n - block_size
    positions = torch.arange(seq).expand(batch, seq)
    return LayoutBatch(
        tokens=video_tokens[:, :-block_size].contiguous(),
        labels=video_tokens[:, block_size:].contiguous(),
        loss_mask=torch.ones(batch, seq, dtype=torch.float32),
        position_ids=positions.contiguous(),
        block_ids=frame_prediction_block_ids(seq, block_size).expand(batch, seq).contiguous(),
        grid_position_ids=grid[:, None, :seq].expand(3, batch, seq).contiguous(),
    )


@dataclass(frozen=True)
class FramePredictionLayout(TokenLayout):
    """Frame prediction (module docstring): S = N - L, no condition, video ids = codes. NTP is this
    layout with block shape (1, 1, 1)."""

    name = "frame_prediction"

    @classmethod
    def from_config(cls, config: Any) -> "FramePredictionLayout":
        return cls(config.latent_shape, config.block_shape, config.vocab_size)

    @property
    def seq_length(self) -> int:
        """S = N - L: the clip minus its last block."""
        return self.num_video_tokens - self.block_size

    def block_ids(self) -> torch.Tensor:
        return frame_prediction_block_ids(self.seq_length, self.block_size)

    def grid_position_ids(self) -> torch.Tensor:
        return frame_prediction_grid_positions(self.latent_shape, self.block_shape)

    def batch(self, video_tokens: torch.Tensor, condition: torch.Tensor | None = None,
              condition_padding: torch.Tensor | None = None) -> LayoutBatch:
        """:func:`frame_prediction_batch` of the clips in the layout's block order.

        Raises:
            ValueError: a condition (frame prediction has none), or what frame_prediction_batch raises.
        """
        if condition is not None or condition_padding is not None:
            raise ValueError("the frame_prediction layout takes no condition")
        return frame_prediction_batch(video_tokens, self.block_size, self.latent_shape, self.block_shape)

    def prompt_problems(self, condition_frames: int) -> list[str]:
        """A prompt of whole latent frames must also be whole blocks: a multiple of the block's frames."""
        if condition_frames % self.block_shape[0]:
            return [f"condition_frames={condition_frames} must be a multiple of the block's "
                    f"{self.block_shape[0]} frames (block_shape {self.block_shape})"]
        return []

    def prompt_in_block_order(self, prompt: torch.Tensor) -> torch.Tensor:
        """The first tokens of clips, (t, h, w)-major, in block order: int [B, p] -> int [B, p].

        Raises:
            ValueError: a prompt shorter than the clip that is not a whole number of blocks.
        """
        order = self.block_order().to(prompt.device)
        plen = prompt.shape[1]
        if plen < self.num_video_tokens and not bool((order[:plen] < plen).all()):
            raise ValueError(f"a prompt of {plen} tokens is not a whole number of blocks of shape "
                             f"{list(self.block_shape)}")
        return prompt[:, order[:plen]] if plen < self.num_video_tokens else prompt

    def generation_plan(self, prompt_length: int | None = None) -> GenerationPlan:
        """Prefill the prompt (its last block's L logits give the next block), then one pass per block,
        each feeding the block just sampled: (N - prompt_length) / L passes.

        Raises:
            ValueError: no prompt length, or one that is not a positive multiple of L at most S.
        """
        L, seq = self.block_size, self.seq_length
        if prompt_length is None or prompt_length % L or not 0 < prompt_length <= seq:
            raise ValueError(f"prompt length {prompt_length} must be a positive multiple of the block size "
                             f"{L}, at most {seq}")
        steps = [DecodeStep(0, given=prompt_length, num_logits=L)]
        steps += [DecodeStep(start, fed=L, num_logits=L) for start in range(prompt_length, seq, L)]
        return self._plan(steps)
