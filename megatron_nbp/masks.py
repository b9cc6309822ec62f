"""The block-causal attention rule: the one place it is written down.

Every NBP token layout (frame prediction, the class-conditional hybrid, NTP) is described by a
per-position *block id*; a query may attend to a key iff ``block_id[key] <= block_id[query]`` and the
key is not padding (docs/design.md, "The attention rule"). Tokens in the same block see each other
(bidirectional), blocks see all earlier blocks (causal). With block id = position this is plain causal
attention (NTP).

Padding (text conditions shorter than P): a padded key is never attended. A padded *query* also
attends to itself, so that its softmax row is never empty (an all-masked row gives NaN, which would
reach every later token through 0 x NaN in the attention product); its output is never used (no
loss, masked as a key), so this changes nothing else.
"""

from __future__ import annotations

import torch


def may_attend(query_block: torch.Tensor, key_block: torch.Tensor) -> torch.Tensor:
    """The rule itself, elementwise (broadcasting): a key is visible iff its block is not later."""
    return key_block <= query_block


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
    self_attention = key_block_ids is None
    if key_block_ids is None:
        key_block_ids = query_block_ids
    allowed = may_attend(query_block_ids.unsqueeze(-1), key_block_ids.unsqueeze(-2))
    if key_padding is not None:
        allowed = allowed & ~key_padding.unsqueeze(-2)
        if self_attention:  # a padded query sees itself (see the module docstring)
            eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
            allowed = allowed | (eye & key_padding.unsqueeze(-1))
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


def block_causal_block_mask(block_ids: torch.Tensor, key_padding: torch.Tensor | None = None,
                            device: str | torch.device | None = None):
    """FlexAttention BlockMask of the same rule: no dense S x S tensor; fully masked tiles are skipped.

    Args:
        block_ids: int64 [B, S] block ids (B = 1 without padding broadcasts over any batch: the mask
            function then ignores the batch index flex_attention calls it with).
        key_padding: optional bool [B, S], True at padding keys.
        device: where the BlockMask lives (default: that of ``block_ids``).

    Returns:
        torch.nn.attention.flex_attention.BlockMask for [B, heads (broadcast), S, S].
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = device or block_ids.device
    ids = block_ids.to(device)
    pad = None if key_padding is None else key_padding.to(device)
    batch, seq = ids.shape
    if batch == 1 and pad is None:  # shared by every sample: mask_mod is called with the real batch index
        shared = ids[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return may_attend(shared[q_idx], shared[kv_idx])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            allowed = may_attend(ids[b, q_idx], ids[b, kv_idx])
            if pad is None:
                return allowed
            return (allowed & ~pad[b, kv_idx]) | (pad[b, q_idx] & (q_idx == kv_idx))

    # compiled construction (CUDA) evaluates mask_mod tile by tile instead of materialising S x S
    compile_it = torch.device(device).type == "cuda"
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=device, _compile=compile_it)
