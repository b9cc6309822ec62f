"""Megatron layer specs for the NBP decoder (megatron-core ModuleSpec).

The spec is megatron's local GPT layer spec with one substitution, the core attention, so that the
kernel can be swapped (dense SDPA on CPU; fused FlexAttention on GPU in a later variant) without
forking the model.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_nbp.model.attention import ATTENTION_BACKENDS


def nbp_local_layer_spec(attention_backend: str = "dense", normalization: str = "LayerNorm") -> ModuleSpec:
    """Local (no Transformer Engine) GPT layer spec with block-causal core attention.

    Args:
        attention_backend: key of ``ATTENTION_BACKENDS`` ("dense" SDPA or "flex" FlexAttention).
        normalization: "LayerNorm" or "RMSNorm" (megatron's torch norm wrapper).

    Returns:
        ModuleSpec of a TransformerLayer: norm -> SelfAttention(ColumnParallel QKV, block-causal core
        attention, RowParallel proj) -> norm -> MLP (GELU or SwiGLU per TransformerConfig), as
        megatron-core builds it.
    """
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.submodules.core_attention = ATTENTION_BACKENDS[attention_backend][0]
    return spec
