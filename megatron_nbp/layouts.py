"""NBP token layouts: turn clips of video tokens into model inputs, targets, loss mask, positions and
block ids (DESIGN.md, "Token sequences"; official NBP release).

Frame prediction (K600), no prefix, block size L::

    tokens    = video[:, :-L]           position i holds video token i
    labels    = video[:, L:]            position i predicts token i + L (the same slot one block later)
    block_ids = i // L                  attention: block_id[key] <= block_id[query]
    loss_mask = 1 everywhere            (every target is a video token)

With L = 1 this is next-token prediction (the NTP baseline) through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayoutBatch:
    """One micro-batch in model form (all tensors [B, S], S = N - L for frame prediction).

    Attributes:
        tokens: int64 input ids.
        labels: int64 target ids (the token each position predicts).
        loss_mask: float32, 1.0 where the target counts in the loss.
        position_ids: int64 learned absolute position of each input token.
        block_ids: int64 block id of each input token (see megatron_nbp.masks).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    block_ids: torch.Tensor


def frame_prediction_block_ids(seq_length: int, block_size: int) -> torch.Tensor:
    """Block id of each of ``seq_length`` positions: int64 [S], ``i // block_size``."""
    return torch.arange(seq_length) // block_size


def frame_prediction_batch(video_tokens: torch.Tensor, block_size: int) -> LayoutBatch:
    """Frame-prediction layout of a batch of clips.

    Args:
        video_tokens: int [B, N] video token ids of whole clips, flattened (t, h, w).
        block_size: L, tokens per block; must divide N.

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
    video_tokens = video_tokens.long()
    seq = n - block_size
    positions = torch.arange(seq).expand(batch, seq)
    return LayoutBatch(
        tokens=video_tokens[:, :-block_size].contiguous(),
        labels=video_tokens[:, block_size:].contiguous(),
        loss_mask=torch.ones(batch, seq, dtype=torch.float32),
        position_ids=positions.contiguous(),
        block_ids=frame_prediction_block_ids(seq, block_size).expand(batch, seq).contiguous(),
    )
