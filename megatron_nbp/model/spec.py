"""Megatron layer specs for the NBP decoder (megatron-core ModuleSpec).

Both specs are megatron's own GPT layer specs with one substitution, the core attention, so that the
block-causal kernel (dense SDPA on CPU and as the reference; fused FlexAttention on GPU) can be swapped
without forking the model:

- ``local``: megatron's torch-only layers (``get_gpt_layer_local_spec``); runs everywhere.
- ``transformer_engine``: Transformer Engine linear layers with the norm fused into QKV / fc1
  (``get_gpt_layer_with_transformer_engine_spec``); GPU only, needs ``transformer-engine``.

The local spec saves its norms under the TE names (megatron's ``sharded_state_dict_keys_map``), so
checkpoints of either spec load into the other, and conversion (which builds the local spec) reads both.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_nbp.model.attention import ATTENTION_BACKENDS

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def transformer_engine_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports (it needs a CUDA build)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError / RuntimeError from a broken CUDA extension
        return False
    return True


def nbp_layer_spec(attention_backend: str = "dense", normalization: str = "LayerNorm",
                   transformer_impl: str = "local") -> ModuleSpec:
    """GPT layer spec with block-causal core attention.

    Args:
        attention_backend: key of ``ATTENTION_BACKENDS`` ("dense" SDPA or "flex" FlexAttention).
        normalization: "LayerNorm" or "RMSNorm".
        transformer_impl: "local" (megatron's torch layers) or "transformer_engine" (TE layers).

    Returns:
        ModuleSpec of a TransformerLayer: norm -> SelfAttention(ColumnParallel QKV, block-causal core
        attention, RowParallel proj) -> norm -> MLP (GELU or SwiGLU per TransformerConfig), as
        megatron-core builds it.

    Raises:
        ValueError: unknown ``transformer_impl``.
        RuntimeError: "transformer_engine" without an importable Transformer Engine.
    """
    if transformer_impl == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(normalization=normalization)
    elif transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError("transformer_impl 'transformer_engine' needs transformer-engine on a CUDA "
                               "machine (pip install -r requirements-gpu.txt); use 'local' on CPU")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()  # norms follow config.normalization
    else:
        raise ValueError(f"transformer_impl {transformer_impl!r} not in {TRANSFORMER_IMPLS}")
    spec.submodules.self_attention.submodules.core_attention = ATTENTION_BACKENDS[attention_backend][0]
    return spec

