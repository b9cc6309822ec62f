"""The model form of a micro-batch (:class:`LayoutBatch`) and the input corruption of the official NBP
release (:func:`corrupt_video_tokens`), shared by every token layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayoutBatch:
    """One micro-batch in model form (all tensors [B, S], S the layout's sequence length: N - L for frame
    prediction, P + N for the hybrid layout).

    Attributes:
        tokens: int64 input ids.
        labels: int64 target ids (the token each position predicts).
        loss_mask: float32, 1.0 where the target counts in the loss.
        position_ids: int64 learned absolute position of each input token.
        block_ids: int64 block id of each input token (see megatron_nbp.masks).
        grid_position_ids: int64 [3, B, S] (t, h, w) coordinates for 3D RoPE (megatron_nbp.layouts.order).
        key_padding: bool [B, S], True at padded condition positions; None when nothing is padded.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    block_ids: torch.Tensor
    grid_position_ids: torch.Tensor
    key_padding: torch.Tensor | None = None


def corrupt_video_tokens(tokens: torch.Tensor, pkeep: float, video_token_offset: int, vocab_size: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The official release's ``pkeep`` augmentation: each input *video* token is kept with probability
    ``pkeep`` and otherwise replaced by a random id drawn from the whole model vocabulary (as
    ``torch.randint_like(z_indices, vocab_size)`` there). Targets are not touched.

    Args:
        tokens: int64 [B, S] model input ids; video tokens are those >= ``video_token_offset``.
        pkeep: keep probability in (0, 1]; 1 returns ``tokens`` unchanged.
        video_token_offset: first model id of the video codes (``TokenLayout.video_token_offset``).
        vocab_size: model vocabulary (unpadded, special + condition + video ids).
        generator: RNG (default: torch's global one, which megatron seeds alike on TP partners).

    Returns:
        int64 [B, S] input ids.
    """
    if pkeep >= 1.0:
        return tokens
    video = tokens >= video_token_offset
    replace = (torch.rand(tokens.shape, generator=generator) >= pkeep) & video
    random_ids = torch.randint(0, vocab_size, tokens.shape, generator=generator)
    return torch.where(replace, random_ids, tokens)
