"""Typed configuration of a training run: layered YAML files + Megatron-style command-line overrides,
validated before any work.

A config file has these sections, each a :class:`nbp_common.config.TypedConfig` below::

    model:  ModelConfig      # transformer shape and the NBP layout (block size, latent shape)
    train:  TrainingConfig   # batch sizes, optimiser, schedule, intervals
    parallel: ParallelConfig # tensor / pipeline parallel sizes
    deepspeed: DeepSpeedConfig # ZeRO stage and offload, used when train.backend is "deepspeed"

plus the top-level paths ``data``, ``save``, ``load``, ``tensorboard_dir``. Types are checked when the
config is read (an int field refuses ``"2"``, a choice field anything outside its choices, a misspelt
key is refused; see :mod:`nbp_common.config`); every cross-field check that can be made without a
process group is made in :meth:`NBPConfig.validate`, so a bad config is refused with the offending
values before torch.distributed or any allocation starts. Each field's ``description`` is its
documentation and the ``--help`` text of its flag (megatron_nbp.cli.pretrain derives the flags).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from megatron_nbp.data_path import parse_data_path
from nbp_common.config import ConfigError, TypedConfig, cli_flags

__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "TrainingConfig", "DeepSpeedConfig", "NBPConfig"]


class ModelConfig(TypedConfig):
    """Decoder shape and NBP layout (Megatron-LM's argument names where they exist).

    Derived sizes (block size, sequence length, vocabulary layout, padded vocabulary) are properties.
    ``ffn_hidden_size`` left unset becomes 4 x ``hidden_size`` when the config is built.
    """

    num_layers: int = Field(4, description="transformer layers")
    hidden_size: int = Field(128, description="transformer hidden size")
    num_attention_heads: int = Field(4, description="attention heads")
    ffn_hidden_size: int | None = Field(
        None, description="MLP hidden size (SwiGLU: the width of each of its two halves); unset = 4 x hidden_size")
    vocab_size: int = Field(64000, description="video token ids, the tokenizer codebook (64,000 FSQ codes "
                                               "[8,8,8,5,5,5])")
    latent_shape: tuple[int, int, int] = Field(
        (5, 8, 8), description="(T', H', W') latent tokens per clip, flattened t-major then rows then columns")
    block_shape: tuple[int, int, int] = Field(
        (1, 1, 8), description="(t, h, w) tokens per NBP block; must tile latent_shape. (1, 1, W') = one row (the "
                               "paper's default); other shapes (1x4x4, 2x1x8, ...) reorder clips block-major "
                               "(megatron_nbp.layouts.block_major_order)")
    layout: Literal["frame_prediction", "hybrid"] = Field(
        "frame_prediction", description="token layout: frame_prediction (K600-style, no prefix) or hybrid "
                                        "(class- or text-conditional, UCF-101-style: condition block, BOV, first "
                                        "block token by token, MBOS)")
    condition_frames: int = Field(2, description="latent frames given at inference for frame prediction")
    hidden_dropout: float = Field(0.0, description="dropout after the attention and MLP blocks")
    attention_dropout: float = Field(0.0, description="dropout of the attention probabilities")
    layernorm_epsilon: float = Field(1e-5, description="epsilon of LayerNorm / RMSNorm")
    init_method_std: float = Field(0.02, description="standard deviation of the normal weight initialisation")
    make_vocab_size_divisible_by: int = Field(
        128, description="vocabulary padding unit (independent of TP, see ModelConfig.padded_vocab_size)")
    attention_backend: Literal["dense", "flex"] = Field(
        "dense", description="block-causal attention kernel: dense (SDPA + dense block-causal mask; CPU path and "
                             "reference) or flex (FlexAttention + cached BlockMask; compiled on GPU, no S x S "
                             "tensor)")
    normalization: Literal["LayerNorm", "RMSNorm"] = Field(
        "LayerNorm", description="LayerNorm (GPT style, the paper's) or RMSNorm")
    activation: Literal["gelu", "swiglu"] = Field(
        "gelu", description="gelu (4h MLP, the paper's) or swiglu (gated, LLaMA style; fc1 is 2 x ffn wide)")
    add_bias_linear: bool = Field(True, description="biases in the linear layers (GPT style True; LLaMA style "
                                                    "False)")
    condition_type: Literal["class", "text"] = Field(
        "class", description="hybrid only: class (one label token, ids from condition_labels) or text (up to P text "
                             "ids from a user-supplied tokenizer, padded; padding is masked as keys)")
    condition_labels: list[str] | None = Field(
        None, description="hybrid + class: the class names, in id order (condition id = index here)")
    text_vocab_size: int | None = Field(
        None, description="hybrid + text: size of the text tokenizer's vocabulary (the condition ids)")
    num_condition_tokens: int = Field(
        1, description="hybrid only: P, condition tokens per sample (1 for a class label, the maximum text length "
                       "for text; shorter texts are padded, longer ones truncated)")
    position_embedding_type: Literal["learned_absolute", "rope3d"] = Field(
        "learned_absolute", description="learned_absolute (the paper's: separate learned tables for the condition "
                                        "positions and the video-stream positions) or rope3d (rotary embedding "
                                        "over (t, h, w) coordinates, megatron-core's multimodal RoPE; no position "
                                        "table)")
    rotary_base: int = Field(10000, description="RoPE base period (rope3d)")
    null_condition: bool = Field(
        False, description="hybrid only: reserve the last condition id as the learned 'no condition' embedding (all "
                           "P positions, unpadded), trained with train.p_drop_cond and sampled against by "
                           "classifier-free guidance")
    transformer_impl: Literal["local", "transformer_engine"] = Field(
        "local", description="layer spec: local (megatron's torch layers; CPU and GPU) or transformer_engine (TE "
                             "linear layers with fused norms + the same block-causal attention; GPU only)")
    max_position_embeddings: int | None = Field(
        None, description="rows of the learned position tables, condition + video stream (Megatron-LM's "
                          "--max-position-embeddings); unset = exactly the layout's sequence length. A layout "
                          "whose sequence is longer than the table is refused")
    # --- output head and position-table initialisation (the official release's choices) ----------
    untie_embeddings_and_output_weights: bool = Field(
        False, description="give the output layer its own weights (no bias) instead of the word embedding's "
                           "(Megatron-LM's --untie-embeddings-and-output-weights; the official NBP release's head). "
                           "Unset = tied, megatron's default. Checkpoints and converted files of either kind load; "
                           "older ones stored the inverse, share_embeddings_and_output_weights, which is still read")
    position_embedding_init: Literal["normal", "zeros"] = Field(
        "normal", description="learned_absolute: initial values of the position tables: normal (init_method_std, "
                              "megatron's) or zeros (the official release's)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_tied_flag(cls, data: Any) -> Any:
        """Read the key older configs, checkpoints and converted files stored,
        ``share_embeddings_and_output_weights`` (megatron-core's name), as its inverse
        ``untie_embeddings_and_output_weights``; both given must agree."""
        if isinstance(data, dict) and "share_embeddings_and_output_weights" in data:
            data = dict(data)
            untie = not data.pop("share_embeddings_and_output_weights")
            if data.setdefault("untie_embeddings_and_output_weights", untie) != untie:
                raise ValueError("share_embeddings_and_output_weights and untie_embeddings_and_output_weights "
                                 "contradict each other")
        return data

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """megatron-core's name for the tied head (GPTModel's argument): ``not untie_embeddings_and_output_weights``."""
        return not self.untie_embeddings_and_output_weights

    @model_validator(mode="after")
    def _default_ffn_hidden_size(self) -> "ModelConfig":
        """Megatron-LM's default MLP width, 4 x hidden_size, when none is given."""
        if self.ffn_hidden_size is None:
            self.__dict__["ffn_hidden_size"] = 4 * self.hidden_size  # no re-validation: it is an int
        return self

    @property
    def block_size(self) -> int:
        """Tokens per block, L = t * h * w (the token layout's)."""
        return self.token_layout.block_size

    @property
    def num_video_tokens(self) -> int:
        """Tokens per clip, N = T' * H' * W' (the token layout's)."""
        return self.token_layout.num_video_tokens

    @property
    def token_layout(self):
        """The token layout object of this config (megatron_nbp.layouts.TokenLayout), built from its fields.

        Raises:
            ValueError: ``layout`` is not a known layout name.
        """
        from megatron_nbp.layouts import token_layout

        return token_layout(self)

    @property
    def seq_length(self) -> int:
        """Model input length: the clip minus its last block (N - L) for frame prediction; the
        condition plus the clip (P + N) for the hybrid layout (whose special tokens make up L)."""
        return self.token_layout.seq_length

    @property
    def num_prefix_tokens(self) -> int:
        """P, condition positions at the start of the input (0 for frame prediction)."""
        return self.token_layout.num_prefix_tokens

    @property
    def condition_vocab_size(self) -> int:
        """Number of condition ids (class labels or text ids); 0 without a condition."""
        return self.token_layout.condition_vocab_size

    @property
    def null_condition_id(self) -> int | None:
        """Condition id of the learned null condition (the last one), or None without it."""
        return self.token_layout.null_condition_id

    @property
    def position_table_size(self) -> int:
        """Rows of the learned position tables (condition + video stream): ``max_position_embeddings``
        if set, else ``seq_length``."""
        return self.max_position_embeddings or self.seq_length

    @property
    def kv_channels(self) -> int:
        """Head dimension, hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """rope3d: rotary frequencies given to (t, h, w); they sum to head_dim / 2 (megatron-core's
        ``mrope_section``). Height and width get a third each, time the rest."""
        half = self.kv_channels // 2
        return [half - 2 * (half // 3), half // 3, half // 3]

    @property
    def video_token_offset(self) -> int:
        """First model id of the video tokens: 0 for frame prediction; L special tokens (BOV = 0,
        MBOS_i = i) + the condition vocabulary for the hybrid layout, as in the official release."""
        return self.token_layout.video_token_offset

    @property
    def total_vocab_size(self) -> int:
        """Model vocabulary before padding: special + condition + video ids."""
        return self.video_token_offset + self.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded to a multiple of ``make_vocab_size_divisible_by``.

        Unlike Megatron-LM (multiple of divisible_by x TP), the padding does not depend on the tensor
        parallel size, so a checkpoint loads under any TP (validation checks TP divides it)."""
        unit = self.make_vocab_size_divisible_by
        return int(math.ceil(self.total_vocab_size / unit) * unit)



class ParallelConfig(TypedConfig):
    """Megatron parallel layout: world size = TP x PP x DP."""

    tensor_model_parallel_size: int = Field(1, description="tensor model parallel size (TP)",
                                            json_schema_extra=cli_flags("--tp"))
    pipeline_model_parallel_size: int = Field(1, description="pipeline model parallel size (PP)",
                                              json_schema_extra=cli_flags("--pp"))
    sequence_parallel: bool = Field(
        False, description="Megatron's sequence parallelism (norms, dropouts and residuals split over the sequence "
                           "across the TP group); needs TP > 1, a sequence length divisible by TP and "
                           "transformer_impl transformer_engine (the local spec's torch norms do not support it)")


class TrainingConfig(TypedConfig):
    """Optimisation and bookkeeping (Megatron-LM argument names). Schedules count iterations."""

    micro_batch_size: int = Field(2, description="samples per micro-batch per data-parallel rank")
    global_batch_size: int = Field(8, description="samples per iteration over all data-parallel ranks "
                                                  "(micro-batch x DP x gradient accumulation)")
    train_iters: int = Field(100, description="training iterations")
    lr: float = Field(1e-3, description="peak learning rate (Adam)")
    min_lr: float = Field(1e-4, description="learning rate at the end of the decay")
    lr_warmup_iters: int = Field(10, description="linear warmup iterations from 0")
    lr_decay_style: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay from lr to min_lr over the iterations after the warmup")
    weight_decay: float = Field(0.01, description="decoupled weight decay (AdamW style; none on biases and norms)")
    adam_beta1: float = Field(0.9, description="Adam beta1")
    adam_beta2: float = Field(0.98, description="Adam beta2")
    adam_eps: float = Field(1e-8, description="Adam epsilon")
    clip_grad: float = Field(1.0, description="gradient clipping by global L2 norm")
    seed: int = Field(1234, description="random seed (weights, data order, dropout)")
    log_interval: int = Field(10, description="log every N iterations")
    save_interval: int | None = Field(None, description="save a checkpoint every N iterations (with --save)")
    exit_interval: int | None = Field(None, description="save (if --save) and exit after this iteration")
    # --- leaving early: signals and time limits (Megatron-LM's names; nbp_common.exit_control) --
    exit_signal_handler: bool = Field(
        False, description="on SIGTERM or SIGUSR1 (to any rank) every rank finishes its iteration, saves (with "
                           "--save) and exits with status 0 (e.g. #SBATCH --signal=USR1@180 before a time limit)")
    exit_duration_in_mins: float | None = Field(
        None, description="save (with --save) and exit once the job has run this many minutes (checked after "
                          "every iteration; all ranks stop once the first rank's clock passes it)")
    max_skipped_iterations: int = Field(
        10, description="consecutive non-finite iterations tolerated before aborting")
    shuffle_buffer: int = Field(256, description="samples in the shuffle buffer of the token-shard stream")
    pkeep: float = Field(1.0, description="keep probability of input video tokens; < 1 corrupts the others as the "
                                          "official NBP release does (see megatron_nbp.layouts)")
    tokenizer_sha256: str | None = Field(
        None, description="sha256 of the tokenizer file the shards must have been made with (checked against the "
                          "data manifest's tokenizer.sha256 before training)")
    p_drop_cond: float = Field(
        0.0, description="probability of replacing a sample's condition by the learned null condition "
                         "(classifier-free guidance training; needs model.null_condition)")
    backend: Literal["megatron", "deepspeed"] = Field(
        "megatron", description="megatron: DDP + 1F1B (TP x PP x DP); deepspeed: ZeRO over DP with megatron TP "
                                "(no PP)")
    # --- precision (Megatron-LM's --bf16 / --fp16 and its loss-scaling flags) -----------------------
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto (bf16 on CUDA, fp32 on CPU: megatron_nbp.device); bf16: bf16 weights and "
                            "activations, fp32 main params and gradient reduction; fp16: the same with dynamic "
                            "loss scaling (megatron's grad scaler); fp32 throughout",
        json_schema_extra=cli_flags(consts={"--bf16": "bf16", "--fp16": "fp16", "--fp32": "fp32"}))
    loss_scale: float | None = Field(None, description="fp16: a static loss scale; unset = dynamic loss scaling")
    initial_loss_scale: float = Field(2.0 ** 32, description="fp16 dynamic scaling: the first scale")
    min_loss_scale: float = Field(1.0, description="fp16 dynamic scaling: the scale never drops below this")
    loss_scale_window: int = Field(
        1000, description="fp16 dynamic scaling: iterations without overflow before the scale doubles")
    hysteresis: int = Field(2, description="fp16 dynamic scaling: overflows tolerated before the scale halves")
    # --- megatron backend performance options (Megatron-LM's names) ---------------------------------
    use_distributed_optimizer: bool = Field(
        False, description="shard the optimizer state (fp32 main params, Adam moments) over data-parallel ranks "
                           "(ZeRO-1)")
    overlap_grad_reduce: bool = Field(
        False, description="overlap the data-parallel gradient all-reduce / reduce-scatter with the backward pass")
    overlap_param_gather: bool = Field(
        False, description="overlap the distributed optimizer's parameter all-gather with the forward pass")
    recompute_granularity: Literal["full", "selective"] | None = Field(
        None, description="activation recomputation: full (whole layers) or selective (core attention); unset = "
                          "none")
    recompute_method: Literal["uniform", "block"] | None = Field(
        None, description="full recompute: uniform (every chunk of recompute_num_layers layers) or block (the first "
                          "recompute_num_layers layers of each pipeline stage)")
    recompute_num_layers: int | None = Field(
        None, description="full recompute: layers per recompute chunk (uniform) or per stage (block)")
    # --- loading (Megatron-LM's names; both backends; megatron_nbp.restore) ---------------------------
    no_load_optim: bool = Field(
        False, description="with --load: restore the weights (the fp32 main copy of a bf16/fp16 checkpoint where "
                           "saved), iteration and data position, not the optimizer and LR schedule (a fresh schedule "
                           "advanced to the iteration; needed to change between fp32 and bf16/fp16)")
    no_load_rng: bool = Field(
        False, description="with --load: do not restore the RNG states, re-seed them from seed + iteration (done "
                           "anyway on another TP / PP / DP layout)")
    finetune: bool = Field(
        False, description="with --load: take the weights only and start at iteration 0 (data position 0, fresh "
                           "optimizer and LR schedule, RNG from seed)")
    # --- observability ----------------------------------------------------------------------------
    peak_tflops: float | None = Field(
        None, description="dense bf16 peak TFLOP/s of one GPU for MFU; unset = from the GPU's name")
    profile: bool = Field(
        False, description="profile the iterations profile_step_start+1 .. profile_step_end on profile_ranks "
                           "(megatron_nbp.training.profiling): with --use-pytorch-profiler a torch.profiler trace "
                           "in --tensorboard-dir and a printed summary; without it a CUDA profiler capture range "
                           "for nsys (--capture-range=cudaProfilerApi)")
    use_pytorch_profiler: bool = Field(
        False, description="with --profile: torch.profiler (CPU operators, GPU kernels, shapes) instead of an nsys "
                           "capture range")
    profile_step_start: int = Field(10, description="with --profile: the window opens after this many iterations")
    profile_step_end: int = Field(12, description="with --profile: the window closes after this many iterations")
    profile_ranks: list[int] = Field([0], description="with --profile: the global ranks that profile")
    # --- validation and training-time samples (Megatron-LM's names; megatron_nbp.training.validation,
    # megatron_nbp.training.samples) ------------------------------------------------------------------
    eval_interval: int | None = Field(
        None, description="with --valid-data: evaluate the validation loss every N iterations (and after the last "
                          "one); unset = after the last iteration only")
    eval_iters: int = Field(
        10, description="validation iterations per evaluation, each of global_batch_size samples: every "
                        "evaluation reads the same first eval_iters x global_batch_size samples of --valid-data")
    sample_interval: int | None = Field(
        None, description="every N iterations, generate one clip from the first --valid-data clip's prompt with "
                          "the current weights and log it to TensorBoard / W&B (needs --valid-data); unset = never")
    # --- schedule length and weight-decay groups (the official release's choices) --------------
    lr_decay_iters: int | None = Field(
        None, description="iterations over which the LR decays from lr to min_lr, counted from 0 and including "
                          "the warmup (Megatron-LM's --lr-decay-iters); unset = train_iters")
    no_weight_decay: Literal["megatron", "release"] = Field(
        "megatron", description="parameters without weight decay (megatron_nbp.training.optim.no_weight_decay): "
                                "megatron (biases and 1-D parameters, Megatron-LM's rule) or release (those plus the "
                                "word embedding and the position tables, the official NBP release's rule)")


class DeepSpeedConfig(TypedConfig):
    """DeepSpeed ZeRO settings, used when ``train.backend`` is "deepspeed" (megatron_nbp.training.deepspeed_backend).

    ZeRO partitions over the data-parallel group only; tensor parallelism stays megatron-core's layers.
    """

    zero_stage: Literal[1, 2, 3] | None = Field(
        None, description="ZeRO stage: 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters); unset = the "
                          "stage of config_file if it has one, else 1")
    offload_optimizer: Literal["none", "cpu"] | None = Field(
        None, description="ZeRO optimizer offload: none or cpu (ZeRO-Offload: optimizer states and step on the "
                          "host); unset = the offload_optimizer.device of config_file if it has one, else none")
    config_file: str | None = Field(
        None, description="DeepSpeed JSON (configs/deepspeed/*.json) whose zero_optimization entries (bucket sizes, "
                          "overlap_comm, ...) are merged into the engine config; batch sizes, gradient clipping, "
                          "precision and the optimizer always come from this NBP config (other keys are refused, "
                          "logging-only ones warned about, by name: megatron_nbp.deepspeed_json)",
        json_schema_extra=cli_flags(flag="--deepspeed-config"))

    def file_zero_optimization(self) -> dict[str, Any]:
        """The ``zero_optimization`` dict of ``config_file`` ({} without a file).

        Raises:
            ConfigError: the file is missing, not JSON, or its zero_optimization is not a dict.
        """
        if not self.config_file:
            return {}
        import json

        try:
            section = json.loads(Path(self.config_file).read_text()).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"deepspeed.config_file={self.config_file!r}: {exc}") from exc
        if not isinstance(section, dict):
            raise ConfigError(f"{self.config_file}: zero_optimization must be a JSON object")
        return section

    def file_warnings(self) -> list[str]:
        """One line per key of ``config_file`` that is ignored with a warning (logging-only keys such as
        ``wandb``; megatron_nbp.deepspeed_json); [] without a file."""
        from megatron_nbp.deepspeed_json import check_deepspeed_json

        return check_deepspeed_json(self.config_file)[1] if self.config_file else []

    @property
    def stage(self) -> int:
        """The resolved ZeRO stage (see ``zero_stage``)."""
        return int(self.zero_stage if self.zero_stage is not None else self.file_zero_optimization().get("stage", 1))

    @property
    def offload(self) -> str:
        """The resolved optimizer offload device, "none" or "cpu" (see ``offload_optimizer``)."""
        if self.offload_optimizer is not None:
            return self.offload_optimizer
        return (self.file_zero_optimization().get("offload_optimizer") or {}).get("device", "none")

    def problems(self, model: ModelConfig, pipeline_parallel: int) -> list[str]:
        """Reasons this DeepSpeed setup cannot run (empty if it can); see NBPConfig.validate."""
        try:
            section = self.file_zero_optimization()
            stage, offload = self.stage, self.offload
        except (ConfigError, TypeError, ValueError) as exc:
            return [f"deepspeed settings unreadable ({self.config_file}): {exc}"]
        from megatron_nbp.deepspeed_json import check_deepspeed_json

        errors = check_deepspeed_json(self.config_file)[0] if self.config_file else []
        if stage not in (1, 2, 3):
            errors.append(f"deepspeed.zero_stage={stage} not in (1, 2, 3)")
        if "stage" in section and section["stage"] != stage:
            errors.append(f"deepspeed.zero_stage={stage} contradicts stage {section['stage']} in {self.config_file}")
        if offload not in ("none", "cpu"):
            errors.append(f"deepspeed.offload_optimizer={offload!r} not in ('none', 'cpu')")
        if section.get("compute_grad_norm", True) is False:
            errors.append(f"zero_optimization.compute_grad_norm=false in {self.config_file} turns off DeepSpeed's "
                          "non-finite gradient check, which the NaN/Inf step skip relies on; remove it")
        file_offload = (section.get("offload_optimizer") or {}).get("device", offload)
        if file_offload != offload:
            errors.append(f"deepspeed.offload_optimizer={offload!r} contradicts {file_offload!r} in {self.config_file}")
        if pipeline_parallel > 1:
            why = (f"ZeRO-{stage} partitions {'gradients' if stage == 2 else 'parameters'} across the "
                   "data-parallel group, which the pipeline schedule cannot combine with"
                   if stage in (2, 3) else
                   "ZeRO-1 + PP would need DeepSpeed's PipelineEngine in place of megatron's 1F1B schedule")
            errors.append(f"pipeline parallel size {pipeline_parallel} with the DeepSpeed backend: {why}. "
                          "Use --backend megatron for pipeline parallelism, or TP x DP with ZeRO")
        if model.transformer_impl != "local":
            errors.append(f"model.transformer_impl={model.transformer_impl!r}: the DeepSpeed backend "
                          "(and its checkpoint conversion) supports the 'local' layer spec only")
        return errors



class NBPConfig(TypedConfig):
    """The whole run: model, parallel layout, training and DeepSpeed sections, plus the run's paths.

    Built with :meth:`from_yaml` (layered files + dotted overrides) or :meth:`from_dict`; changed with
    :meth:`set`; checked as a whole with :meth:`validate`; :meth:`to_dict` is the JSON/YAML-safe form
    (checkpoints store its ``model`` part and rebuild a :class:`ModelConfig` from it).
    """

    model: ModelConfig = Field(default_factory=ModelConfig, description="decoder shape and NBP layout")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="TP x PP x DP layout")
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="optimisation and bookkeeping")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO settings")
    data: str | None = Field(None, description="directory of token shards with manifest.json")
    # ---- weighted dataset blending (megatron_nbp/data_blend.py)
    data_path: list[str] | None = Field(
        None, description="token-shard folders to blend, Megatron-LM's form: DIR, or weight-folder pairs "
                          "W1 DIR1 W2 DIR2 ... (weights normalised); instead of --data")
    save: str | None = Field(None, description="checkpoint directory to write")
    load: str | None = Field(None, description="checkpoint directory to resume from")
    tensorboard_dir: str | None = Field(None, description="write TensorBoard scalars here")
    # --- validation data, training-time samples, Weights & Biases (megatron_nbp.training.validation,
    # megatron_nbp.training.samples, megatron_nbp.training_log) ----------------------------------------
    valid_data: str | None = Field(
        None, description="directory of held-out token shards with manifest.json (checked against the model like "
                          "--data): the validation loss and the prompt of training-time samples")
    sample_tokenizer: str | None = Field(
        None, description="tokenizer file (.safetensors) the shards were made with: training-time samples are "
                          "decoded to video; unset = the generated latent ids are logged as an image")
    wandb_project: str | None = Field(
        None, description="also log the scalars (and samples) to this Weights & Biases project (pip install "
                          "'megatron-nbp[wandb]')")
    wandb_exp_name: str | None = Field(None, description="W&B run name (with --wandb-project)")
    wandb_save_dir: str | None = Field(None, description="directory of W&B's local files (with --wandb-project)")
    dry_run: bool = Field(False, description="validate the config, print it and the parameter count, and exit "
                                             "(no weights, no process group)")

    @field_validator("data_path", mode="before")
    @classmethod
    def _data_path_as_text(cls, value: Any) -> Any:
        """YAML weights are numbers: ``[0.7, /a, 0.3, /b]`` -> all text (parsed by :meth:`data_folders`)."""
        if isinstance(value, (list, tuple)):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    def data_folders(self) -> list[tuple[float, str]]:
        """The training data as ``[(normalised weight, folder)]``: ``--data DIR`` is ``[(1.0, DIR)]``, else
        ``data_path`` parsed by :func:`megatron_nbp.data_path.parse_data_path`.

        Raises:
            ValueError: neither or both of ``data`` and ``data_path`` given, or a malformed ``data_path``.
        """
        if self.data is not None and self.data_path is not None:
            raise ValueError(f"give the training data once: --data {self.data} or --data-path "
                             f"{' '.join(self.data_path)}, not both")
        if self.data_path is not None:
            return parse_data_path(self.data_path)
        if self.data is None:
            raise ValueError("--data DIR or --data-path [W1] DIR1 [W2 DIR2 ...] (directories of token shards "
                             "with manifest.json) is required")
        return [(1.0, self.data)]

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int | None = None) -> None:
        """Refuse invalid values and combinations before any distributed or allocation work.

        Args:
            world_size: number of processes (torchrun WORLD_SIZE), if known.

        Raises:
            ConfigError: naming each offending value.
        """
        m, p, t = self.model, self.parallel, self.train
        errors = []
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        try:
            layout = m.token_layout
        except ValueError as exc:  # an unknown layout: nothing else about the model can be computed
            raise ConfigError(f"invalid configuration:\n  - {exc}") from None
        errors.extend(layout.config_problems())
        if m.position_embedding_type == "rope3d" and (m.kv_channels % 2 or m.kv_channels < 6):
            errors.append(f"rope3d needs an even head dimension >= 6, got {m.kv_channels}")
        if m.transformer_impl == "transformer_engine":
            from megatron_nbp.model.spec import transformer_engine_available

            if not transformer_engine_available():
                errors.append("model.transformer_impl='transformer_engine' needs transformer-engine on a CUDA "
                              "machine (requirements-gpu.txt); use 'local' on CPU")
        if m.attention_backend == "flex" and m.attention_dropout:
            errors.append(f"attention_backend 'flex' has no attention dropout (attention_dropout={m.attention_dropout})")
        if len(m.latent_shape) != 3 or len(m.block_shape) != 3:
            errors.append(f"latent_shape {m.latent_shape} and block_shape {m.block_shape} must be (T, H, W)")
        elif any(l % b for l, b in zip(m.latent_shape, m.block_shape)) or min(m.block_shape) < 1:
            errors.append(f"block_shape {m.block_shape} does not tile latent_shape {m.latent_shape}")
        else:
            errors.extend(layout.prompt_problems(m.condition_frames))
        if not 0 < m.condition_frames < m.latent_shape[0]:
            errors.append(
                f"condition_frames={m.condition_frames} must be in [1, {m.latent_shape[0] - 1}] "
                f"for latent_shape {m.latent_shape}"
            )
        if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
            errors.append(f"sequence length {m.seq_length} (layout {m.layout}, latent_shape {m.latent_shape}, "
                          f"block_shape {m.block_shape}) exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings} (the position table)")
        if m.hidden_size % m.num_attention_heads:
            errors.append(f"hidden_size={m.hidden_size} not divisible by num_attention_heads={m.num_attention_heads}")
        if m.num_attention_heads % tp:
            errors.append(f"num_attention_heads={m.num_attention_heads} not divisible by tensor parallel size {tp}")
        if m.padded_vocab_size % tp:
            errors.append(f"padded vocabulary {m.padded_vocab_size} not divisible by tensor parallel size {tp} "
                          f"(raise make_vocab_size_divisible_by={m.make_vocab_size_divisible_by})")
        if m.ffn_hidden_size % tp:
            errors.append(f"ffn_hidden_size={m.ffn_hidden_size} not divisible by tensor parallel size {tp}")
        if m.num_layers % pp:
            errors.append(f"num_layers={m.num_layers} not divisible by pipeline parallel size {pp}")
        if tp < 1 or pp < 1:
            errors.append(f"parallel sizes must be >= 1 (tp={tp}, pp={pp})")
        if world_size is not None:
            if world_size % (tp * pp):
                errors.append(f"world size {world_size} not divisible by TP x PP = {tp} x {pp}")
            else:
                dp = world_size // (tp * pp)
                if t.global_batch_size % (t.micro_batch_size * dp):
                    errors.append(
                        f"global_batch_size={t.global_batch_size} not divisible by "
                        f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
                    )
        if t.micro_batch_size < 1 or t.global_batch_size < 1 or t.train_iters < 1:
            errors.append("micro_batch_size, global_batch_size and train_iters must be >= 1")
        if not 0.0 <= t.p_drop_cond < 1.0:
            errors.append(f"train.p_drop_cond={t.p_drop_cond} must be in [0, 1)")
        elif t.p_drop_cond and layout.null_condition_id is None:
            errors.append(f"train.p_drop_cond={t.p_drop_cond} needs the hybrid layout with model.null_condition: true")
        if not 0.0 < t.pkeep <= 1.0:
            errors.append(f"train.pkeep={t.pkeep} must be in (0, 1]")
        if not 0 <= t.lr_warmup_iters < t.train_iters:
            errors.append(f"lr_warmup_iters={t.lr_warmup_iters} must be in [0, train_iters={t.train_iters})")
        if t.lr_decay_iters is not None and t.lr_decay_iters <= t.lr_warmup_iters:
            errors.append(f"train.lr_decay_iters={t.lr_decay_iters} must exceed lr_warmup_iters={t.lr_warmup_iters}")
        if m.position_embedding_init != "normal" and m.position_embedding_type != "learned_absolute":
            errors.append(f"model.position_embedding_init={m.position_embedding_init!r} needs learned_absolute "
                          f"positions (position_embedding_type={m.position_embedding_type!r} has no table)")
        if t.max_skipped_iterations < 1:
            errors.append(f"max_skipped_iterations={t.max_skipped_iterations} must be >= 1")
        for name in ("save_interval", "exit_interval"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                errors.append(f"{name}={getattr(t, name)} must be >= 1")
        if t.exit_duration_in_mins is not None and not t.exit_duration_in_mins > 0:
            errors.append(f"train.exit_duration_in_mins={t.exit_duration_in_mins} must be > 0")
        if t.backend == "deepspeed":
            errors.extend(self.deepspeed.problems(m, pp))
        errors.extend(self._performance_problems())
        errors.extend(self._validation_problems())
        if self.data_path is not None:  # weighted dataset blending: data XOR data_path, well-formed pairs
            try:
                self.data_folders()
            except ValueError as exc:
                errors.append(str(exc))
        errors.extend(self._load_problems())
        errors.extend(self._profile_problems(world_size))
        if errors:
            raise ConfigError.from_problems(errors)

    def _validation_problems(self) -> list[str]:
        """Reasons the validation, training-time sample and W&B settings cannot run."""
        t = self.train
        errors = []
        for name in ("eval_interval", "eval_iters", "sample_interval"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                errors.append(f"train.{name}={getattr(t, name)} must be >= 1")
        if t.eval_interval is not None and not self.valid_data:
            errors.append(f"--eval-interval {t.eval_interval} needs --valid-data (a directory of held-out token shards)")
        if t.sample_interval is not None and not self.valid_data:
            errors.append(f"--sample-interval {t.sample_interval} needs --valid-data (its first clip is the prompt)")
        if self.sample_tokenizer and t.sample_interval is None:
            errors.append(f"--sample-tokenizer {self.sample_tokenizer} needs --sample-interval")
        if self.sample_tokenizer and not Path(self.sample_tokenizer).is_file():
            errors.append(f"--sample-tokenizer {self.sample_tokenizer}: no such file")
        if (self.wandb_exp_name or self.wandb_save_dir) and not self.wandb_project:
            errors.append("--wandb-exp-name / --wandb-save-dir need --wandb-project")
        if self.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                errors.append(f"--wandb-project {self.wandb_project} needs the wandb package: "
                              "pip install 'megatron-nbp[wandb]'")
        return errors

    def _profile_problems(self, world_size: int | None) -> list[str]:
        """Reasons the ``--profile`` settings cannot run (checks needing no device; the CUDA-only nsys capture
        range is refused by the trainer's device check)."""
        t = self.train
        flags = [f for f, changed in (("--use-pytorch-profiler", t.use_pytorch_profiler),
                                      ("--profile-step-start", t.profile_step_start != 10),
                                      ("--profile-step-end", t.profile_step_end != 12),
                                      ("--profile-ranks", list(t.profile_ranks) != [0])) if changed]
        if not t.profile:
            return [f"{' / '.join(flags)} given without --profile"] if flags else []
        errors = []
        if not 0 <= t.profile_step_start < t.profile_step_end:
            errors.append(f"--profile-step-start {t.profile_step_start} / --profile-step-end {t.profile_step_end}: "
                          "need 0 <= start < end (the window holds iterations start+1 .. end)")
        elif t.profile_step_end > t.train_iters:
            errors.append(f"--profile-step-end {t.profile_step_end} is past --train-iters {t.train_iters}: the "
                          "window would never close")
        if not t.profile_ranks:
            errors.append("--profile-ranks is empty")
        bad = [r for r in t.profile_ranks if r < 0 or (world_size is not None and r >= world_size)]
        if bad:
            errors.append(f"--profile-ranks {bad}: not ranks of this run (world size {world_size})")
        if t.use_pytorch_profiler and not self.tensorboard_dir:
            errors.append("--use-pytorch-profiler writes its trace and summary to --tensorboard-dir: give one")
        return errors

    def _load_problems(self) -> list[str]:
        """Reasons the loading flags (``--finetune``, ``--no-load-optim``, ``--no-load-rng``) cannot apply."""
        t = self.train
        flags = [f for f, on in (("--finetune", t.finetune), ("--no-load-optim", t.no_load_optim),
                                 ("--no-load-rng", t.no_load_rng)) if on]
        if flags and not self.load:
            return [f"{' / '.join(flags)} given without --load (nothing to load)"]
        return []

    def _performance_problems(self) -> list[str]:
        """Reasons the precision / performance options cannot run with this model and backend
        (Megatron-LM's own argument checks, plus what this project's layer specs support)."""
        m, p, t = self.model, self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        errors = []
        if t.loss_scale is not None and t.loss_scale <= 0:
            errors.append(f"train.loss_scale={t.loss_scale} must be > 0 (or unset for dynamic scaling)")
        if not 0 < t.min_loss_scale <= t.initial_loss_scale:
            errors.append(f"train.min_loss_scale={t.min_loss_scale} must be in (0, initial_loss_scale="
                          f"{t.initial_loss_scale}]")
        if t.loss_scale_window < 1 or t.hysteresis < 1:
            errors.append(f"train.loss_scale_window={t.loss_scale_window} and train.hysteresis={t.hysteresis} "
                          "must be >= 1")
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            errors.append(f"train.peak_tflops={t.peak_tflops} must be > 0")
        deepspeed = t.backend == "deepspeed"
        for name in ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
            if getattr(t, name) and deepspeed:
                why = ("ZeRO-1/2/3 already shard the optimizer state; choose --zero-stage"
                       if name == "use_distributed_optimizer" else
                       "DeepSpeed overlaps communication itself (zero_optimization.overlap_comm in --deepspeed-config)")
                errors.append(f"--{name.replace('_', '-')} is a megatron-backend option: {why}")
        if t.overlap_param_gather and not (t.use_distributed_optimizer and t.overlap_grad_reduce):
            errors.append("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
                          "(as in Megatron-LM)")
        g, method, n = t.recompute_granularity, t.recompute_method, t.recompute_num_layers
        layers_per_stage = m.num_layers // pp if pp >= 1 and m.num_layers % pp == 0 else m.num_layers
        if g == "full":
            if method not in ("uniform", "block"):
                errors.append(f"--recompute-granularity full needs --recompute-method uniform|block, got {method!r}")
            if n is None or not 1 <= n <= layers_per_stage:
                errors.append(f"--recompute-granularity full needs --recompute-num-layers in [1, "
                              f"{layers_per_stage}] (layers per pipeline stage), got {n}")
            elif method == "uniform" and layers_per_stage % n:
                errors.append(f"--recompute-method uniform: --recompute-num-layers {n} must divide the "
                              f"{layers_per_stage} layers of a pipeline stage")
        elif g == "selective":
            if method is not None or n is not None:
                errors.append("--recompute-granularity selective recomputes the core attention of every layer: "
                              f"leave --recompute-method ({method!r}) and --recompute-num-layers ({n}) unset")
        elif method is not None or n is not None:
            errors.append(f"--recompute-method {method!r} / --recompute-num-layers {n} need --recompute-granularity")
        if p.sequence_parallel:
            if tp < 2:
                errors.append("--sequence-parallel splits activations across the tensor-parallel group: it "
                              f"needs TP > 1 (got {tp})")
            if m.transformer_impl != "transformer_engine":
                errors.append("--sequence-parallel needs --transformer-impl transformer_engine: the local "
                              "spec's torch LayerNorm / RMSNorm do not reduce their gradients over the sequence "
                              "split")
            if tp >= 1 and m.seq_length % tp:
                errors.append(f"--sequence-parallel needs the sequence length {m.seq_length} divisible by TP {tp}")
            if deepspeed:
                errors.append("--sequence-parallel is a megatron-backend option (the DeepSpeed backend runs "
                              "the local layer spec)")
        return errors
