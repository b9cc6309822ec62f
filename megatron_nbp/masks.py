"""The block-causal attention rule: the one place it is written down.

Every NBP token layout (frame prediction, the class-conditional hybrid, NTP) is described by a
per-position *block id*; a query may attend to a key iff ``block_id[key] <= block_id[query]`` and the
key is not padding (DESIGN.md, "Token sequences"). Tokens in the same block see each other
(bidirectional), blocks see all earlier blocks (causal). With block id = position this is plain causal
attention (NTP).
"""

from __future__ import annotations

import torch


def block_causal_allowed(
    query_block_ids: torch.Tensor,
    key_block_ids: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean "may attend" matrix of the block-causal rule.

    Args:
        query_block_ids: int64 [..., Sq] block id of each query position.
        key_block_ids: int64 [..., Sk] block id of each key (default: the query ids, self-attention).
        key_padding: bool [..., Sk], True where the key is padding (never attended).

    Returns:
        bool [..., Sq, Sk], True where attention is allowed.
    """
    if key_block_ids is None:
        key_block_ids = query_block_ids
    allowed = key_block_ids.unsqueeze(-2) <= query_block_ids.unsqueeze(-1)
    if key_padding is not None:
        allowed = allowed & ~key_padding.unsqueeze(-2)
    return allowed


def block_causal_attention_mask(block_ids: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Dense mask in megatron-core's convention (True = masked out), ready for its attention layers.

    Args:
        block_ids: int64 [B, S] (or [S]) block ids.
        key_padding: optional bool [B, S], True at padding keys.

    Returns:
        bool [B, 1, S, S] (or [1, 1, S, S]) where True means "do not attend".
    """
    if block_ids.dim() == 1:
        block_ids = block_ids.unsqueeze(0)
    return ~block_causal_allowed(block_ids, key_padding=key_padding).unsqueeze(1)
