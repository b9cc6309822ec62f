"""Build the NBP decoder as a megatron-core GPTModel for the current parallel rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nbp.config import ModelConfig
from megatron_nbp.model.embeddings import ConditionVideoPositionEmbedding
from megatron_nbp.model.spec import nbp_layer_spec


def transformer_config(model: ModelConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron-core TransformerConfig for ``model`` (LayerNorm or RMSNorm, GELU or SwiGLU, biases or not).

    Fusions are off and initialisation is on CPU when CUDA is absent (FACTS.md: the fused kernels
    are CUDA-only); on GPU the same settings are used so that CPU and GPU runs are comparable.
    """
    on_gpu = torch.cuda.is_available()
    rope = model.position_embedding_type == "rope3d"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.layernorm_epsilon,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_sync=on_gpu,
        normalization=model.normalization,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        mrope_section=model.mrope_section if rope else None,
    )


def build_gpt_model(model: ModelConfig, tensor_parallel: int | None = None,
                    pipeline_parallel: int | None = None,
                    params_dtype: torch.dtype = torch.float32) -> GPTModel:
    """The GPTModel stage owned by this rank (pre/post process from the pipeline position).

    megatron's parallel_state must be initialised (see megatron_nbp.parallel). Sizes default to it.

    Returns:
        GPTModel with a vocabulary padded to a multiple of make_vocab_size_divisible_by (any TP) and
        either learned absolute positions in separate condition / video tables
        (:class:`ConditionVideoPositionEmbedding`, parameters ``embedding.position_embeddings.condition``
        / ``.video``) or 3D RoPE (megatron's multimodal rotary embedding over (t, h, w)). Its forward
        takes input_ids, position_ids (learned: int64 [B, S]; rope3d: int64 [3, B, S], see
        megatron_nbp.layouts) and attention_mask (dense backend: bool [B, 1, S, S], True = masked;
        flex backend: a BlockMask; see megatron_nbp.model.attention.ATTENTION_BACKENDS); with labels it
        returns the per-token cross entropy [B, S] (fp32), without them logits [S, B, V/TP]
        (or [B, S, V] gathered when ``parallel_output=False``).
    """
    tp = tensor_parallel or parallel_state.get_tensor_model_parallel_world_size()
    pp = pipeline_parallel or parallel_state.get_pipeline_model_parallel_world_size()
    config = transformer_config(model, tp, pp, params_dtype)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=nbp_layer_spec(model.attention_backend, model.normalization, model.transformer_impl),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.position_table_size,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type="mrope" if model.position_embedding_type == "rope3d" else "learned_absolute",
        rotary_base=model.rotary_base,
        parallel_output=True,
    )
    if gpt.pre_process and model.position_embedding_type == "learned_absolute":
        p = model.num_prefix_tokens
        with torch.no_grad():
            gpt.embedding.position_embeddings = ConditionVideoPositionEmbedding(
                p, model.position_table_size - p, model.hidden_size, config.embedding_init_method
            ).to(dtype=params_dtype, device=gpt.embedding.word_embeddings.weight.device)
    return gpt
