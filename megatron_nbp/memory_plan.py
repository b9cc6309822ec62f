"""Per-GPU memory of an NBP training run under a parallel plan: parameters, gradients, optimizer state,
activations.

All figures are bytes on the most loaded GPU (pipeline stage) of a TP x PP x DP parallel plan, from the config
alone (nothing allocated). Notation: s = sequence length (``ModelConfig.seq_length``), b = micro-batch
size, h = hidden size, a = attention heads, f = FFN width, V = padded vocabulary, L = layers,
t / p / d = tensor / pipeline / data-parallel sizes, e = bytes of an activation element (2 for bf16,
4 for fp32), m = 1 if hidden dropout > 0 (a 1-byte mask per element) else 0.

Model state (bytes per parameter, Megatron-LM / ZeRO paper accounting)::

    precision  weights  gradients              optimizer (Adam)
    bf16       2        4 (fp32 main grads; 2  12 = fp32 master 4 + m 4 + v 4
                           with grad_dtype bf16)
    fp32       4        4                      8 = m 4 + v 4

ZeRO partitions over the d data-parallel ranks, each holding ceil(n / d) of a state of n elements:
stage 1 the optimizer state (= Megatron's distributed optimizer), stage 2 + gradients, stage 3 +
weights. Communication buckets, ZeRO-3's gathered layers and the CUDA context are not modelled: the
``reserve`` of :func:`fits` stands for them.

Parameters per GPU (Megatron-core sharding): each layer's linear weights (and column-parallel biases)
are split t ways, its norms and row-parallel output biases are replicated; L / p layers per stage; the
word embedding (V h / t) and the position tables on the first stage; the final norm and the output
layer (V h / t: its own weights if untied, the tied copy of the word embedding if p > 1) on the last.
Counts come from :func:`megatron_nbp.model.params.count_parameters`.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
without sequence parallelism; their bf16 per-layer total is s b h (10 + 24 / t + 5 a s / (h t))), per
layer and micro-batch, derived term by term for this layer (megatron local spec)::

    replicated over TP:  s b h (4 e + 2 m)      inputs of the two norms, of QKV and of fc1; 2 dropout masks
                         (+ 2 e for RMSNorm in the local spec: torch's composite RMSNorm also keeps
                         its normalized output; LayerNorm is one fused op)
    split over TP:       s b h / t (5 e + g e f / h)
                         q, k, v (3 e), attention output kept by the kernel (e), output-projection
                         input (e); MLP: g = 2 for GELU (act input, fc2 input), 5 for SwiGLU (the 2 f
                         fc1 output, act(gate), megatron's x_linear + glu_linear_offset copy, fc2 input)
    attention scores:    flex (fused FlexAttention): none, no S x S tensor;
                         dense, no attention dropout (torch SDPA's fused kernels, memory-efficient on
                         GPU, flash on CPU: they keep q, k, v, output, logsumexp and the S x S mask
                         as a float bias): s^2 e per layer (b-independent, mask shared by the batch);
                         dense with attention dropout (math path): + a s^2 b / t (2 e + 1) (softmax,
                         1-byte dropout mask, dropped probabilities; the paper's 5 a s^2 b at e = 2)

With e = 2, m = 1, GELU (f = 4 h) and the paper's score term this is the paper's 10 + 24 / t + 5 a s / (h t)
up to the kernel's saved output (+ 2 / t). Sequence parallelism (Korthikanti et al. section 4.2.2) splits
the replicated terms over TP as well (they become s b h (4 e + 2 m) / t).

Recomputation, as megatron-core's ``--recompute-*`` options run it:
  full, uniform, n layers per chunk: each chunk keeps its input (s b h e, the paper's 2 s b h; / t under
    sequence parallelism) and backward rebuilds one chunk at a time (+ n layers' activations);
  full, block, n layers: the first n layers of each stage keep only their inputs, the others everything
    (+ one layer's activations while it is rebuilt);
  selective (core attention): each layer drops what the attention kernel keeps for itself (its output,
    e s b h / t, and the dense path's score terms) and backward rebuilds one layer's attention.
Per stage: the 1F1B
schedule keeps min(p - k, micro-batches) micro-batches in flight on stage k (p on the first stage);
the first stage adds the embedding dropout mask (m s b h), the dense path keeps the boolean S x S mask
once (s^2), and the last stage adds the final norm and output-layer inputs (2 e s b h) and the logits
for cross-entropy: fp32 softmax kept for backward (4 s b V / t) plus the bf16 logits / their gradient
(2 s b V / t) when e = 2.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from megatron_nbp.config import ConfigError, ModelConfig, NBPConfig
from megatron_nbp.model.params import count_parameters

GIB = 2 ** 30

# bytes per parameter: (weights, gradients, optimizer state); fp16 as bf16 (fp32 main params and grads)
STATE_BYTES = {"bf16": (2, 4, 12), "fp16": (2, 4, 12), "fp32": (4, 4, 8)}
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ParallelPlan:
    """A parallel plan: TP x PP x DP, ZeRO stage, batch sizes, precision and recompute, in the trainer's terms
    (:meth:`from_config` reads it off a run's config).

    ``zero_stage`` 0 = plain data parallel (megatron DDP), 1 = optimizer state sharded (megatron's
    ``--use-distributed-optimizer``; DeepSpeed ZeRO-1 holds the same), 2 / 3 = DeepSpeed ZeRO-2 / 3 (TP x
    DP only). ``recompute``: "none", "full" or "selective" (megatron's ``--recompute-granularity``) with
    ``recompute_method`` / ``recompute_num_layers`` for "full" (default: uniform, 1 layer per chunk, i.e.
    every layer). ``sequence_parallel``: megatron's ``--sequence-parallel``."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    micro_batch_size: int = 1
    global_batch_size: int = 256
    precision: str = "bf16"
    grad_dtype: str = "fp32"
    recompute: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    sequence_parallel: bool = False

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per iteration and data-parallel rank: global / (micro x DP)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def full_recompute(self) -> tuple[str, int]:
        """("uniform" | "block", layers) of a full recompute, megatron's defaults filled in."""
        return self.recompute_method or "uniform", self.recompute_num_layers or 1

    @classmethod
    def from_config(cls, cfg: NBPConfig, dp: int, precision: str = "bf16") -> "ParallelPlan":
        """The parallel plan a run of ``cfg`` on ``dp`` data-parallel replicas trains with (``precision`` stands
        for the config's "auto": bf16 on GPU)."""
        t, p = cfg.train, cfg.parallel
        zero = cfg.deepspeed.stage if t.backend == "deepspeed" else (1 if t.use_distributed_optimizer else 0)
        return cls(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, dp=dp, zero_stage=zero,
                   micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                   precision=precision if t.precision == "auto" else t.precision,
                   recompute=t.recompute_granularity or "none", recompute_method=t.recompute_method,
                   recompute_num_layers=t.recompute_num_layers, sequence_parallel=p.sequence_parallel)


@dataclass
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage``; ``parameters`` is its parameter count before ZeRO."""

    stage: int
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def model_state(self) -> int:
        """Weights + gradients + optimizer state, bytes."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Everything modelled, bytes."""
        return self.model_state + self.activations


@dataclass
class MemoryPlan:
    """Memory of every pipeline stage of ``parallel``; ``peak`` is the most loaded stage."""

    parallel: ParallelPlan
    stages: list[StageMemory]

    @property
    def peak(self) -> StageMemory:
        """The stage with the largest total (what one GPU must hold)."""
        return max(self.stages, key=lambda st: st.total)

    def fits(self, gpu_bytes: int, reserve: int = 4 * GIB) -> bool:
        """True if the peak stage needs at most ``gpu_bytes - reserve`` (reserve: CUDA context, NCCL
        and communication buffers, allocator fragmentation; 4 GiB by default)."""
        return self.peak.total <= gpu_bytes - reserve


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def check_parallel_plan(cfg: NBPConfig, parallel: ParallelPlan) -> None:
    """Refuse an impossible parallel plan with NBPConfig.validate's messages (TP vs heads / FFN / vocab,
    PP vs layers, global vs micro batch x DP, ZeRO-2/3 vs PP) plus the planner's own options.

    Raises:
        ConfigError: naming the offending values.
    """
    errors = []
    if parallel.zero_stage not in (0, 1, 2, 3):
        errors.append(f"zero_stage={parallel.zero_stage} not in (0, 1, 2, 3)")
    if parallel.precision not in STATE_BYTES:
        errors.append(f"precision={parallel.precision!r} not in {tuple(STATE_BYTES)}")
    if parallel.grad_dtype not in ("fp32", "bf16") or (parallel.precision == "fp32" and parallel.grad_dtype != "fp32"):
        errors.append(f"grad_dtype={parallel.grad_dtype!r}: fp32, or bf16 under bf16 precision")
    if parallel.recompute not in ("none", "full", "selective"):
        errors.append(f"recompute={parallel.recompute!r} not in ('none', 'full', 'selective')")
    if parallel.dp < 1:
        errors.append(f"data-parallel size must be >= 1, got {parallel.dp}")
    if errors:
        raise ConfigError("invalid parallel plan:\n  - " + "\n  - ".join(errors))
    cfg = copy.deepcopy(cfg)
    cfg.set("parallel.tensor_model_parallel_size", parallel.tp)
    cfg.set("parallel.pipeline_model_parallel_size", parallel.pp)
    cfg.set("train.micro_batch_size", parallel.micro_batch_size)
    cfg.set("train.global_batch_size", parallel.global_batch_size)
    # ZeRO-2/3 run on the DeepSpeed backend (TP x DP); 0/1 on megatron (any PP)
    cfg.set("train.backend", "deepspeed" if parallel.zero_stage >= 2 else "megatron")
    if parallel.zero_stage >= 2:
        cfg.set("deepspeed.zero_stage", parallel.zero_stage)
    else:
        cfg.set("train.use_distributed_optimizer", parallel.zero_stage == 1)
        cfg.set("train.overlap_param_gather", cfg.train.overlap_param_gather and parallel.zero_stage == 1)
    cfg.set("train.precision", parallel.precision)
    cfg.set("parallel.sequence_parallel", parallel.sequence_parallel)
    recompute = None if parallel.recompute == "none" else parallel.recompute
    cfg.set("train.recompute_granularity", recompute)
    method, layers = parallel.full_recompute if recompute == "full" else (None, None)
    cfg.set("train.recompute_method", method)
    cfg.set("train.recompute_num_layers", layers)
    cfg.validate(world_size=parallel.tp * parallel.pp * parallel.dp)  # the trainer's own checks


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one GPU of pipeline ``stage`` (0-based) under TP ``tp`` (see module doc).

    Raises:
        ConfigError: ``stage`` outside [0, pp) or sizes that do not divide (see NBPConfig.validate).
    """
    if not 0 <= stage < pp:
        raise ConfigError(f"stage {stage} outside [0, {pp})")
    count = count_parameters(model)
    h, L = model.hidden_size, model.num_layers
    norm = 2 * h if model.normalization == "LayerNorm" else h      # weight (+ bias)
    per_layer = (count.transformer - norm) // L                    # transformer = L layers + final norm
    replicated = 2 * norm + (2 * h if model.add_bias_linear else 0)  # norms + row-parallel output biases
    n = (L // pp) * ((per_layer - replicated) // tp + replicated)
    if stage == 0:  # word embedding (vocab-parallel) + every other input table (positions, ...)
        n += count.word_embeddings // tp + (count.total - count.transformer - count.output_layer
                                            - count.word_embeddings)
    if stage == pp - 1:
        n += norm
        if count.output_layer or pp > 1:  # untied output layer, or the tied copy on the last stage
            n += count.word_embeddings // tp
    return n


def attention_kernel_bytes(model: ModelConfig, parallel: ParallelPlan) -> int:
    """What the core-attention kernel of one layer keeps for itself for one micro-batch (its output,
    and the dense path's score terms), bytes: what selective recomputation drops (module doc)."""
    s, b, h, a = model.seq_length, parallel.micro_batch_size, model.hidden_size, model.num_attention_heads
    t, e = parallel.tp, ACTIVATION_BYTES[parallel.precision]
    total = s * b * e * h // t
    if model.attention_backend == "dense":
        total += s * s * e
        if model.attention_dropout > 0:
            total += a * s * s * b * (2 * e + 1) // t
    return total


def layer_activation_bytes(model: ModelConfig, parallel: ParallelPlan) -> int:
    """Activations one transformer layer keeps for backward for one micro-batch without recompute,
    bytes, on one GPU (module doc; sequence parallelism splits the replicated terms)."""
    s, b, h, f = model.seq_length, parallel.micro_batch_size, model.hidden_size, model.ffn_hidden_size
    t, e = parallel.tp, ACTIVATION_BYTES[parallel.precision]
    m = 1 if model.hidden_dropout > 0 else 0
    g = 5 if model.activation == "swiglu" else 2
    composite_norm = model.normalization == "RMSNorm" and getattr(model, "transformer_impl", "local") == "local"
    replicated = s * b * h * (4 * e + 2 * m + (2 * e if composite_norm else 0))
    if parallel.sequence_parallel:
        replicated //= t
    # q, k, v, the output projection's input and the MLP terms; the kernel's own output is counted in
    # attention_kernel_bytes
    return replicated + s * b * (4 * e * h + g * e * f) // t + attention_kernel_bytes(model, parallel)


def stage_activation_bytes(model: ModelConfig, parallel: ParallelPlan, stage: int) -> dict[str, int]:
    """Activation bytes of pipeline ``stage`` by part: layers (all in-flight micro-batches), recompute
    working set, embedding, dense mask, output (final norm + output-layer inputs, logits)."""
    s, b, h, V = model.seq_length, parallel.micro_batch_size, model.hidden_size, model.padded_vocab_size
    t, pp, e = parallel.tp, parallel.pp, ACTIVATION_BYTES[parallel.precision]
    in_flight = min(pp - stage, parallel.num_microbatches)
    layers = model.num_layers // pp
    per_layer = layer_activation_bytes(model, parallel)
    parts = {}
    layer_input = s * b * h * e // (t if parallel.sequence_parallel else 1)
    if parallel.recompute == "full":
        method, n = parallel.full_recompute
        if method == "uniform":  # one input per chunk of n layers, a chunk rebuilt at a time
            parts["layers"] = in_flight * _cdiv(layers, n) * layer_input
            parts["recompute"] = n * per_layer
        else:                    # block: the first n layers of the stage keep only their inputs
            parts["layers"] = in_flight * (n * layer_input + (layers - n) * per_layer)
            parts["recompute"] = per_layer
    elif parallel.recompute == "selective":
        kernel = attention_kernel_bytes(model, parallel)
        parts["layers"] = in_flight * layers * (per_layer - kernel)
        parts["recompute"] = kernel
    else:
        parts["layers"] = in_flight * layers * per_layer
    if stage == 0 and model.hidden_dropout > 0:
        parts["embedding"] = in_flight * s * b * h // (t if parallel.sequence_parallel else 1)
    if model.attention_backend == "dense":
        parts["mask"] = s * s
    if stage == pp - 1:
        parts["output"] = 2 * e * s * b * h + s * b * (V // t) * (4 + (2 if e == 2 else 0))
    return parts


def plan_memory(cfg: NBPConfig, parallel: ParallelPlan) -> MemoryPlan:
    """Memory of every pipeline stage of ``parallel`` for ``cfg.model`` (``cfg.train`` / ``cfg.parallel``
    are replaced by the plan's sizes for validation).

    Raises:
        ConfigError: the parallel plan is invalid for the model (see :func:`check_parallel_plan`).
    """
    check_parallel_plan(cfg, parallel)
    model = cfg.model
    w, g, o = STATE_BYTES[parallel.precision]
    if parallel.grad_dtype == "bf16":
        g = 2
    d, z = parallel.dp, parallel.zero_stage
    stages = []
    for k in range(parallel.pp):
        n = stage_parameters(model, parallel.tp, parallel.pp, k)
        acts = stage_activation_bytes(model, parallel, k)
        stages.append(StageMemory(
            stage=k, parameters=n,
            weights=w * (_cdiv(n, d) if z >= 3 else n),
            gradients=g * (_cdiv(n, d) if z >= 2 else n),
            optimizer=o * (_cdiv(n, d) if z >= 1 else n),
            activations=sum(acts.values()), breakdown=acts,
        ))
    return MemoryPlan(parallel, stages)


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending."""
    return [k for k in range(1, n + 1) if n % k == 0]


def sweep(cfg: NBPConfig, num_gpus: int, micro_batch_size: int, global_batch_size: int,
          precision: str = "bf16", grad_dtype: str = "fp32", tps=None, pps=None, zero_stages=None,
          **options) -> tuple[list[tuple[MemoryPlan, MemoryPlan]], list[tuple[ParallelPlan, str]]]:
    """Every parallel plan of ``num_gpus`` GPUs: TP in ``tps`` and PP in ``pps`` (default: every divisor),
    DP = num_gpus / (TP PP), ZeRO stage in ``zero_stages`` (default 0..3; stages > 0 only when DP > 1,
    where they change something). ``options``: further :class:`ParallelPlan` fields (recompute, sequence
    parallelism) for every plan.

    Returns:
        ([(plan as given, plan with full recompute), ...], [(invalid parallel plan, first reason), ...]).
    """
    plans, skipped = [], []
    for tp in tps or divisors(num_gpus):
        for pp in pps or divisors(num_gpus):
            if num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            for zero in zero_stages if zero_stages is not None else range(4):
                if zero and dp == 1 and zero_stages is None:
                    continue
                parallel = ParallelPlan(tp, pp, dp, zero, micro_batch_size, global_batch_size, precision,
                                        grad_dtype, **options)
                try:
                    plans.append((plan_memory(cfg, parallel), plan_memory(cfg, replace(parallel, recompute="full"))))
                except ConfigError as exc:
                    skipped.append((parallel, str(exc).split("\n  - ", 1)[-1].split("\n")[0]))
    return plans, skipped


def gib(n: int) -> float:
    """Bytes -> GiB (2^30 bytes)."""
    return n / GIB


__all__ = ["GIB", "MemoryPlan", "ParallelPlan", "StageMemory", "attention_kernel_bytes", "check_parallel_plan",
           "divisors", "gib", "layer_activation_bytes", "plan_memory", "stage_activation_bytes", "stage_parameters",
           "sweep"]
