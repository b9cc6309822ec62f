"""Typed configuration: YAML file + Megatron-style command-line overrides, validated before any work.

A config file has these sections, each a dataclass below::

    model:  ModelConfig      # transformer shape and the NBP layout (block size, latent shape)
    train:  TrainingConfig   # batch sizes, optimiser, schedule, intervals
    parallel: ParallelConfig # tensor / pipeline parallel sizes
    deepspeed: DeepSpeedConfig # ZeRO stage and offload, used when train.backend is "deepspeed"

Every check that can be made without a process group is made in :meth:`NBPConfig.validate`, so a bad
config is refused with the offending values before torch.distributed or any allocation starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names the values."""


@dataclass
class ModelConfig:
    """Decoder shape and NBP layout.

    Attributes:
        num_layers, hidden_size, num_attention_heads, ffn_hidden_size: GPT shape (Megatron names).
        vocab_size: video token ids, the tokenizer codebook (64,000 FSQ codes [8,8,8,5,5,5]).
        latent_shape: (T', H', W') latent tokens per clip, flattened t-major then rows then columns.
        block_shape: (t, h, w) tokens per NBP block; must tile ``latent_shape``. (1, 1, W') = one row
            (the paper's default); other shapes (1x4x4, 2x1x8, ...) reorder clips block-major
            (megatron_nbp.layouts.block_major_order).
        layout: token layout (DESIGN.md): "frame_prediction" (K600-style, no prefix) or "hybrid"
            (class-conditional, UCF-101-style: condition block, BOV, first block token by token, MBOS).
        condition_frames: latent frames given at inference for frame prediction.
        condition_type: hybrid only: "class" (one label token, ids from ``condition_labels``) or "text"
            (up to P text ids from a user-supplied tokenizer, padded; padding is masked as keys).
        condition_labels: hybrid + class: the class names, in id order (condition id = index here).
        text_vocab_size: hybrid + text: size of the text tokenizer's vocabulary (the condition ids).
        num_condition_tokens: hybrid only: P, condition tokens per sample (1 for a class label, the
            maximum text length for text; shorter texts are padded, longer ones truncated).
        position_embedding_type: "learned_absolute" (the paper's: separate learned tables for the
            condition positions and the video-stream positions) or "rope3d" (rotary embedding over
            (t, h, w) coordinates, megatron-core's multimodal RoPE; no position table).
        rotary_base: RoPE base period (rope3d).
        max_position_embeddings: rows of the learned position tables, condition + video stream
            (Megatron-LM's ``--max-position-embeddings``); None = exactly ``seq_length``. A layout whose
            sequence is longer than the table is refused by ``NBPConfig.validate``.
        null_condition: hybrid only: reserve the last condition id as the learned "no condition"
            embedding (all P positions, unpadded), trained with ``train.p_drop_cond`` and sampled
            against by classifier-free guidance.
        transformer_impl: "local" (megatron's torch layers; CPU and GPU) or "transformer_engine"
            (TE linear layers with fused norms + the same block-causal attention; GPU only).
        make_vocab_size_divisible_by: vocabulary padding unit (independent of TP, see padded_vocab_size).
        share_embeddings_and_output_weights: tie input embedding and output layer (Megatron default).
        normalization: "LayerNorm" (GPT style, the paper's) or "RMSNorm".
        activation: "gelu" (4h MLP, the paper's) or "swiglu" (gated, LLaMA style; fc1 is 2 x ffn wide).
        add_bias_linear: biases in the linear layers (GPT style True; LLaMA style False).
        attention_backend: "dense" (SDPA + dense block-causal mask; CPU path and reference) or
            "flex" (FlexAttention + cached BlockMask; compiled on GPU, no S x S tensor).
    """

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    vocab_size: int = 64000
    latent_shape: tuple[int, int, int] = (5, 8, 8)
    block_shape: tuple[int, int, int] = (1, 1, 8)
    layout: str = "frame_prediction"
    condition_frames: int = 2
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    share_embeddings_and_output_weights: bool = True
    attention_backend: str = "dense"
    normalization: str = "LayerNorm"
    activation: str = "gelu"
    add_bias_linear: bool = True
    condition_type: str = "class"
    condition_labels: list[str] | None = None
    text_vocab_size: int | None = None
    num_condition_tokens: int = 1
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    null_condition: bool = False
    transformer_impl: str = "local"
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(x) for x in self.latent_shape)
        self.block_shape = tuple(int(x) for x in self.block_shape)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def block_size(self) -> int:
        """Tokens per block, L = t * h * w."""
        return math.prod(self.block_shape)

    @property
    def num_video_tokens(self) -> int:
        """Tokens per clip, N = T' * H' * W'."""
        return math.prod(self.latent_shape)

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


@dataclass
class ParallelConfig:
    """Megatron parallel layout: world size = TP x PP x DP.

    Attributes:
        tensor_model_parallel_size, pipeline_model_parallel_size: TP and PP (Megatron-LM's names).
        sequence_parallel: Megatron's sequence parallelism (norms, dropouts and residuals split over the
            sequence across the TP group); needs TP > 1, a sequence length divisible by TP and the
            ``transformer_engine`` layer spec (the local spec's torch norms do not support it).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class TrainingConfig:
    """Optimisation and bookkeeping (Megatron-LM argument names). Schedules count iterations.
    ``pkeep`` < 1 corrupts input video tokens as the official NBP release does (see layouts);
    ``p_drop_cond`` > 0 replaces a sample's condition by the learned null condition with that
    probability (classifier-free guidance training; needs ``model.null_condition``)."""

    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 10
    lr_decay_style: str = "linear"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    save_interval: int | None = None
    exit_interval: int | None = None
    max_skipped_iterations: int = 10  # consecutive non-finite iterations tolerated before aborting
    shuffle_buffer: int = 256
    pkeep: float = 1.0
    tokenizer_sha256: str | None = None  # if set, the data manifest's tokenizer.sha256 must equal it (data.check_manifest)
    p_drop_cond: float = 0.0
    backend: str = "megatron"  # "megatron" (DDP + 1F1B, TP x PP x DP) or "deepspeed" (ZeRO, TP x DP)
    # --- precision (Megatron-LM's --bf16 / --fp16 and its loss-scaling flags) -----------------------
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU: megatron_nbp.device), "bf16", "fp16", "fp32"
    loss_scale: float | None = None  # fp16: a static loss scale; None = dynamic loss scaling
    initial_loss_scale: float = 2.0 ** 32  # fp16 dynamic scaling: the first scale
    min_loss_scale: float = 1.0  # fp16 dynamic scaling: the scale never drops below this
    loss_scale_window: int = 1000  # fp16 dynamic scaling: good iterations before the scale doubles
    hysteresis: int = 2  # fp16 dynamic scaling: overflows tolerated before the scale halves
    # --- megatron backend performance options (Megatron-LM's names) ---------------------------------
    use_distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks (ZeRO-1)
    overlap_grad_reduce: bool = False  # gradient all-reduce / reduce-scatter overlapped with backward
    overlap_param_gather: bool = False  # parameter all-gather overlapped with forward (distributed optimizer)
    recompute_granularity: str | None = None  # None, "full" (whole layers) or "selective" (core attention)
    recompute_method: str | None = None  # full: "uniform" or "block"
    recompute_num_layers: int | None = None  # full: layers per recompute chunk (uniform) or per stage (block)
    # --- loading (Megatron-LM's names; megatron backend) ---------------------------------------------
    no_load_optim: bool = False  # --load restores weights, iteration and data position, not optimizer / scheduler
    no_load_rng: bool = False  # --load does not restore the RNG states (e.g. after changing the TP / PP layout)
    # --- observability ----------------------------------------------------------------------------
    peak_tflops: float | None = None  # dense bf16 peak of one GPU for MFU; None = from the GPU's name


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings, used when ``train.backend`` is "deepspeed" (megatron_nbp.deepspeed_backend).

    ZeRO partitions over the data-parallel group only; tensor parallelism stays megatron-core's layers.

    Attributes:
        zero_stage: 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters); None: the ``stage`` of
            ``config_file`` if it has one, else 1.
        offload_optimizer: "none" or "cpu" (ZeRO-Offload: optimizer states and step on the host);
            None: the ``offload_optimizer.device`` of ``config_file`` if it has one, else "none".
        config_file: optional DeepSpeed JSON (configs/deepspeed/*.json). Its ``zero_optimization``
            entries (bucket sizes, overlap_comm, ...) are merged into the engine config; batch sizes,
            gradient clipping, precision and the optimizer always come from this NBP config.
    """

    zero_stage: int | None = None
    offload_optimizer: str | None = None
    config_file: str | None = None

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
        errors = []
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


@dataclass
class NBPConfig:
    """The whole run: model, parallel layout and training; plus paths from the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: str | None = None
    save: str | None = None
    load: str | None = None
    tensorboard_dir: str | None = None
    dry_run: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, paths: str | Path | list[str | Path],
                  overrides: dict[str, Any] | None = None) -> "NBPConfig":
        """Read one or more YAML configs (later files override earlier ones key by key, e.g. a model
        size file then a data file) and apply ``overrides`` ({"train.lr": 1e-3, "save": "ckpt", ...}).

        Raises:
            FileNotFoundError: a file does not exist.
            ConfigError: unknown section or key, or a value of the wrong kind.
        """
        raw: dict[str, Any] = {}
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            for section, values in (yaml.safe_load(path.read_text()) or {}).items():
                if isinstance(values, dict):
                    raw.setdefault(section, {}).update(values)
                else:
                    raw[section] = values
        return cls.from_dict(raw, overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> "NBPConfig":
        """Build from nested dicts (the YAML structure); see :meth:`from_yaml`."""
        sections = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainingConfig,
                    "deepspeed": DeepSpeedConfig}
        unknown = set(raw) - set(sections) - {"data", "save", "load", "tensorboard_dir"}
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; expected {sorted(sections)}")
        built = {}
        for name, klass in sections.items():
            values = dict(raw.get(name) or {})
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"unknown keys in '{name}': {sorted(bad)}; known: {sorted(known)}")
            built[name] = klass(**values)
        cfg = cls(**built, **{k: raw[k] for k in ("data", "save", "load", "tensorboard_dir") if k in raw})
        for dotted, value in (overrides or {}).items():
            if value is not None:
                cfg.set(dotted, value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (or a top-level key) to ``value``; raises ConfigError if unknown."""
        target: Any = self
        *parents, key = dotted.split(".")
        for parent in parents:
            target = getattr(target, parent)
        if not hasattr(target, key):
            raise ConfigError(f"unknown config key {dotted!r}")
        setattr(target, key, value)
        if hasattr(target, "__post_init__"):
            target.__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe) of the whole config."""
        out = dataclasses.asdict(self)
        for key in ("latent_shape", "block_shape"):
            out["model"][key] = list(out["model"][key])
        return out

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
        if m.position_embedding_type not in ("learned_absolute", "rope3d"):
            errors.append(f"model.position_embedding_type={m.position_embedding_type!r} not in "
                          "('learned_absolute', 'rope3d')")
        elif m.position_embedding_type == "rope3d" and (m.kv_channels % 2 or m.kv_channels < 6):
            errors.append(f"rope3d needs an even head dimension >= 6, got {m.kv_channels}")
        if m.normalization not in ("LayerNorm", "RMSNorm"):
            errors.append(f"model.normalization={m.normalization!r} not in ('LayerNorm', 'RMSNorm')")
        if m.activation not in ("gelu", "swiglu"):
            errors.append(f"model.activation={m.activation!r} not in ('gelu', 'swiglu')")
        if m.transformer_impl not in ("local", "transformer_engine"):
            errors.append(f"model.transformer_impl={m.transformer_impl!r} not in ('local', 'transformer_engine')")
        elif m.transformer_impl == "transformer_engine":
            from megatron_nbp.model.spec import transformer_engine_available

            if not transformer_engine_available():
                errors.append("model.transformer_impl='transformer_engine' needs transformer-engine on a CUDA "
                              "machine (requirements-gpu.txt); use 'local' on CPU")
        if m.attention_backend not in ("dense", "flex"):
            errors.append(f"model.attention_backend={m.attention_backend!r} not in ('dense', 'flex')")
        elif m.attention_backend == "flex" and m.attention_dropout:
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
        if t.lr_decay_style not in ("linear", "cosine", "constant"):
            errors.append(f"lr_decay_style={t.lr_decay_style!r} not in linear/cosine/constant")
        if t.max_skipped_iterations < 1:
            errors.append(f"max_skipped_iterations={t.max_skipped_iterations} must be >= 1")
        for name in ("save_interval", "exit_interval"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                errors.append(f"{name}={getattr(t, name)} must be >= 1")
        if t.backend not in ("megatron", "deepspeed"):
            errors.append(f"train.backend={t.backend!r} not in ('megatron', 'deepspeed')")
        elif t.backend == "deepspeed":
            errors.extend(self.deepspeed.problems(m, pp))
        errors.extend(self._performance_problems())
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

    def _performance_problems(self) -> list[str]:
        """Reasons the precision / performance options cannot run with this model and backend
        (Megatron-LM's own argument checks, plus what this project's layer specs support)."""
        m, p, t = self.model, self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        errors = []
        if t.precision not in ("auto", "bf16", "fp16", "fp32"):
            errors.append(f"train.precision={t.precision!r} not in ('auto', 'bf16', 'fp16', 'fp32')")
        if t.loss_scale is not None and t.loss_scale <= 0:
            errors.append(f"train.loss_scale={t.loss_scale} must be > 0 (or unset for dynamic scaling)")
        if not 0 < t.min_loss_scale <= t.initial_loss_scale:
            errors.append(f"train.min_loss_scale={t.min_loss_scale} must be in (0, initial_loss_scale="
                          f"{t.initial_loss_scale}]")
        if t.loss_scale_window < 1 or t.hysteresis < 1:
            errors.append(f"train.loss_scale_window={t.loss_scale_window} and train.hysteresis={t.hysteresis} "
                          "must be >= 1")
        if (t.no_load_optim or t.no_load_rng) and t.backend == "deepspeed":
            errors.append("--no-load-optim / --no-load-rng are megatron-backend options here (a DeepSpeed checkpoint "
                          "resumes whole)")
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
        if g not in (None, "full", "selective"):
            errors.append(f"train.recompute_granularity={g!r} not in (None, 'full', 'selective')")
        elif g == "full":
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
