"""Build the NBP decoder as a megatron-core GPTModel for the current parallel rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nbp.config import ModelConfig, TrainingConfig
from megatron_nbp.device import DevicePlan, device_plan
from megatron_nbp.model.embeddings import ConditionVideoPositionEmbedding
from megatron_nbp.model.spec import nbp_layer_spec


PARAMS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def transformer_config(model: ModelConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       precision: str = "fp32", *, plan: DevicePlan | None = None,
                       train: TrainingConfig | None = None, sequence_parallel: bool = False) -> TransformerConfig:
    """megatron-core TransformerConfig for ``model`` (LayerNorm or RMSNorm, GELU or SwiGLU, biases or not).

    Args:
        precision: "fp32", "bf16" or "fp16": ``params_dtype`` / ``pipeline_dtype`` and megatron's
            ``bf16`` / ``fp16`` flags (Megatron-LM's ``--bf16`` / ``--fp16``).
        plan: the process's device plan (default :func:`megatron_nbp.device.device_plan`): CPU
            initialization only on a CPU plan; synchronous p2p only on CUDA.
        train: recompute settings (``recompute_granularity`` / ``_method`` / ``_num_layers``;
            selective = megatron's ``core_attn`` module); None = no recompute.
        sequence_parallel: megatron's sequence parallelism (NBPConfig.validate checks the spec allows it).

    Fusions stay off (they need apex / TE kernels the local spec does not use); the same settings on
    CPU and GPU keep the two comparable.

    Raises:
        KeyError: an unknown precision.
    """
    plan = plan or device_plan()
    rope = model.position_embedding_type == "rope3d"
    dtype = PARAMS_DTYPES[precision]
    recompute = {}
    if train is not None and train.recompute_granularity:
        recompute = dict(recompute_granularity=train.recompute_granularity, recompute_method=train.recompute_method,
                         recompute_num_layers=train.recompute_num_layers)
        if train.recompute_granularity == "selective":
            recompute["recompute_modules"] = ["core_attn"]
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
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu_initialization=plan.use_cpu_initialization,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_sync=plan.is_cuda,
        normalization=model.normalization,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        mrope_section=model.mrope_section if rope else None,
        **recompute,
    )


def build_gpt_model(model: ModelConfig, tensor_parallel: int | None = None,
                    pipeline_parallel: int | None = None, precision: str = "fp32", *,
                    plan: DevicePlan | None = None, train: TrainingConfig | None = None,
                    sequence_parallel: bool = False) -> GPTModel:
    """The GPTModel stage owned by this rank (pre/post process from the pipeline position), its weights
    in ``precision`` on ``plan.device`` (Megatron-LM builds on ``torch.cuda.current_device()`` and moves
    what megatron's layers leave on the host, e.g. torch norms, with ``.cuda()``; so do we).

    megatron's parallel_state must be initialised (see megatron_nbp.parallel). Sizes default to it;
    ``precision`` / ``plan`` / ``train`` / ``sequence_parallel`` as in :func:`transformer_config`.

    Returns:
        GPTModel with a vocabulary padded to a multiple of make_vocab_size_divisible_by (any TP) and
        either learned absolute positions in separate condition / video tables
        (:class:`ConditionVideoPositionEmbedding`, parameters ``embedding.position_embeddings.condition``
        / ``.video``; initialised normal(0, init_method_std) or, with ``position_embedding_init`` zeros,
        to zeros as the official release) or 3D RoPE (megatron's multimodal rotary embedding over (t, h, w)). Its forward
        takes input_ids, position_ids (learned: int64 [B, S]; rope3d: int64 [3, B, S], see
        megatron_nbp.layouts) and attention_mask (dense backend: bool [B, 1, S, S], True = masked;
        flex backend: a BlockMask; see megatron_nbp.model.attention.ATTENTION_BACKENDS); with labels it
        returns the per-token cross entropy [B, S] (fp32), without them logits [S, B, V/TP]
        (or [B, S, V] gathered when ``parallel_output=False``).
    """
    tp = tensor_parallel or parallel_state.get_tensor_model_parallel_world_size()
    pp = pipeline_parallel or parallel_state.get_pipeline_model_parallel_world_size()
    plan = plan or device_plan()
    config = transformer_config(model, tp, pp, precision, plan=plan, train=train, sequence_parallel=sequence_parallel)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=nbp_layer_spec(model.attention_backend, model.normalization, model.transformer_impl),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.position_table_size,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="mrope" if model.position_embedding_type == "rope3d" else "learned_absolute",
        rotary_base=model.rotary_base,
        parallel_output=True,
    )
    if gpt.pre_process and model.position_embedding_type == "learned_absolute":
        p = model.num_prefix_tokens
        with torch.no_grad():
            init = torch.nn.init.zeros_ if model.position_embedding_init == "zeros" else config.embedding_init_method
            gpt.embedding.position_embeddings = ConditionVideoPositionEmbedding(
                p, model.position_table_size - p, model.hidden_size, init
            ).to(dtype=config.params_dtype)
    if plan.is_cuda:  # torch norms and the position tables above were created on the host
        gpt.cuda(plan.device)
    return gpt
