"""Block-causal core attention for megatron-core's SelfAttention (the dense-mask / CPU path).

This is the reference kernel: torch SDPA with the dense boolean mask built by
:mod:`megatron_nbp.masks` from the layout's block ids. It slots into a megatron layer spec as
``core_attention`` (see :mod:`megatron_nbp.model.spec`), replacing megatron's DotProductAttention
(whose softmax path allocates from a CUDA-only global buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


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
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
