"""Block-causal core attention modules for megatron-core's SelfAttention.

Two kernels of the one rule in :mod:`megatron_nbp.masks`, each slotting into a megatron layer spec as
``core_attention`` (see :mod:`megatron_nbp.model.spec`):

- ``BlockCausalSDPAttention``: torch SDPA under a dense boolean mask, the CPU path and the reference
  (replaces megatron's DotProductAttention, whose softmax allocates from a CUDA-only buffer);
- ``BlockCausalFlexAttention``: FlexAttention with a cached BlockMask (no dense S x S tensor, fully
  masked tiles skipped), compiled on GPU (the fused path), eager on CPU.

``ATTENTION_BACKENDS`` maps a config name to (core attention class, mask builder); the training step
builds the mask once per layout with the builder and passes it through GPTModel as ``attention_mask``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_nbp.masks import block_causal_attention_mask, block_causal_block_mask


class BlockCausalSDPAttention(MegatronModule):
    """Scaled dot-product attention under a dense block-causal mask.

    Args (megatron core_attention builder contract):
        config: TransformerConfig (num_attention_heads, kv_channels, num_query_groups, attention_dropout).
        layer_number, attn_mask_type, attention_type, cp_comm_type: accepted for the contract.
        attention_dropout: overrides config.attention_dropout.
        softmax_scale: default 1/sqrt(head dim).
        pg_collection: process groups; its ``tp`` group sets the heads per partition.

    Forward:
        query [sq, b, np, hn], key/value [sk, b, ng, hn] (np, ng: heads / query groups of this TP
        partition), attention_mask bool [b or 1, 1, sq, sk] with True = masked (megatron convention).
        Returns the context [sq, b, np * hn] in the input dtype.

    Raises:
        ValueError: if no attention mask is given (NBP attention is never implicitly causal).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        if config.context_parallel_size != 1:
            raise ValueError("BlockCausalSDPAttention does not support context parallelism")
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is None:
            raise ValueError("block-causal attention needs the layout's attention mask; got None")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias are not supported")
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.num_heads != self.num_groups:
            rep = self.num_heads // self.num_groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        # attention dropout differs across TP ranks (different heads): megatron's model-parallel RNG
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


_compiled_flex = None


def _flex_kernel():
    """flex_attention, compiled on CUDA (fused kernel), eager elsewhere (CPU compile has no backward)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class BlockCausalFlexAttention(BlockCausalSDPAttention):
    """FlexAttention under a BlockMask built from the layout's block ids (the fused block-causal path).

    Same contract as :class:`BlockCausalSDPAttention`, except ``attention_mask`` is a
    ``torch.nn.attention.flex_attention.BlockMask`` (see :func:`megatron_nbp.masks.block_causal_block_mask`).

    Raises:
        ValueError: attention dropout > 0 (FlexAttention has none; the NBP release trains with 0),
            or a mask that is not a BlockMask.
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        if self.dropout_p:
            raise ValueError(f"flex attention has no attention dropout; got {self.dropout_p} (set attention_dropout: 0)")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from torch.nn.attention.flex_attention import BlockMask

        if not isinstance(attention_mask, BlockMask):
            raise ValueError(f"flex attention needs a BlockMask, got {type(attention_mask).__name__}")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias are not supported")
        sq, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        context = _flex_kernel()(q, k, v, block_mask=attention_mask, scale=self.softmax_scale,
                                 enable_gqa=self.num_heads != self.num_groups)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


def _dense_mask(block_ids: torch.Tensor, key_padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    return block_causal_attention_mask(block_ids, key_padding).to(device or block_ids.device)


ATTENTION_BACKENDS = {
    "dense": (BlockCausalSDPAttention, _dense_mask),
    "flex": (BlockCausalFlexAttention, block_causal_block_mask),
}
