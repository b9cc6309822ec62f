"""The DeepSpeed ZeRO backend (stage 1/2/3, optional CPU optimizer offload) over megatron-core
tensor-parallel layers: ``train.backend: deepspeed`` (launchers/pretrain_nbp.py --backend deepspeed).

The same GPTModel, data stream, forward step, NBP loss, parameter groups and LR schedule as the
megatron backend (megatron_nbp.training.megatron_backend); only the data-parallel machinery differs.
DeepSpeed gets megatron's parallel_state as its ``mpu`` (:class:`MegatronMPU`), so ZeRO partitions
optimizer states, gradients (2) and parameters (3) over the data-parallel group only, and computes the
gradient norm over the tensor-parallel group without double-counting replicated parameters. No pipeline
parallelism (NBPConfig.validate refuses it): the iteration is a plain loop over micro-batches with
DeepSpeed's gradient accumulation.

Numerics match the megatron backend (fp32 on CPU): each micro-batch's loss is its token-mean, DeepSpeed
divides it by the gradient-accumulation steps and averages gradients over data-parallel ranks, as the
megatron schedule + DDP do; the optimizer is torch AdamW on megatron's parameter groups (no weight
decay on biases and norms, megatron_nbp.training.optim), which is what megatron-core uses when neither
TE nor Apex is installed; clipping is DeepSpeed's ``gradient_clipping`` (clip / (norm + 1e-6), as
megatron's clip_grad_norm). Precision is the run's ``train.precision`` (bf16 by default on GPU, fp32
on CPU; fp16 with DeepSpeed's dynamic loss scaling), always with fp32 master weights in the ZeRO
optimizer. Devices and batches are
placed as in the megatron backend (megatron_nbp.device). A non-finite loss or gradient on any rank skips
the update on every rank, as in the megatron backend (see :func:`deepspeed_train_step`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_nbp.config import NBPConfig, TrainingConfig
from megatron_nbp.deepspeed_checkpointing import (load_deepspeed_checkpoint, read_latest_tag, read_meta,
                                                  save_deepspeed_checkpoint)
from megatron_nbp.run_record import run_record
from megatron_nbp.device import DevicePlan, device_plan
from megatron_nbp.layouts import LayoutBatch
from megatron_nbp.model.builder import build_gpt_model
from megatron_nbp.restore import (LoadOptions, ParallelLayout, Restored, check_nothing_to_load, finish_restore,
                                  what_to_restore)
from megatron_nbp.training.backend import StepResult, TrainingBackend
from megatron_nbp.training.optim import build_scheduler, weight_decay_groups
from megatron_nbp.training.gather_weights import gather_full_state_dict
from megatron_nbp.training.step import loss_contribution, make_forward_step


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron.core.parallel_state (Megatron-DeepSpeed's names).

    The DeepSpeed backend has no pipeline parallelism, so DeepSpeed's "model parallel" group is the
    tensor-parallel group. Every method reads parallel_state, which must be initialised.
    """

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        """Global ranks of this rank's data-parallel group."""
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())


def deepspeed_config(cfg: NBPConfig, dp_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed engine config (a JSON-able dict) for ``cfg``.

    Batch sizes and gradient accumulation from ``cfg.train`` (global = micro x accumulation x DP),
    ``gradient_clipping`` = train.clip_grad (DeepSpeed would otherwise clip at 1.0 silently), ZeRO stage
    and optimizer offload from ``cfg.deepspeed`` with ``config_file``'s zero_optimization merged under
    them, ``precision`` ("bf16", "fp16" with the run's loss-scaling settings mapped to DeepSpeed's, or
    "fp32"). Logging and step printing are left to the training loop.

    ``cfg`` must have passed ``NBPConfig.validate`` (which refuses, e.g., a ``config_file`` that turns off
    ``zero_optimization.compute_grad_norm``, needed by the non-finite step skip).
    """
    t, d = cfg.train, cfg.deepspeed
    zero = dict(d.file_zero_optimization())
    zero["stage"] = d.stage
    if d.offload == "cpu":
        zero["offload_optimizer"] = {**(zero.get("offload_optimizer") or {}), "device": "cpu"}
    else:
        zero.pop("offload_optimizer", None)
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        # check_grad_overflow (DeepSpeed's default, explicit here): bf16 ZeRO-1/2 skips a step whose gradient
        # norm is not finite, as fp32 and ZeRO-3 always do (deepspeed_train_step relies on it)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": _fp16_section(t) if precision == "fp16" else {"enabled": False},
        # torch AdamW is the client optimizer (megatron's choice without TE/Apex); DeepSpeedCPUAdam
        # replaces it under offload on GPU (see build_optimizer).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    # No "data_types.grad_accum_dtype": fp32 with bf16 would switch ZeRO-1 to DeepSpeed's BF16_Optimizer,
    # whose checkpoints zero_to_fp32 (the converter) does not read.
    return config


def _fp16_section(t: TrainingConfig) -> dict[str, Any]:
    """DeepSpeed's fp16 section from Megatron-LM's loss-scaling settings (``loss_scale`` 0 = dynamic)."""
    return {"enabled": True, "loss_scale": t.loss_scale or 0,
            "initial_scale_power": int(round(math.log2(t.initial_loss_scale))),
            "loss_scale_window": t.loss_scale_window, "hysteresis": t.hysteresis, "min_loss_scale": t.min_loss_scale}


def build_optimizer(module: torch.nn.Module, cfg: NBPConfig, use_gpu: bool) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay on megatron-core's parameter groups for ``module``.

    The groups are megatron's grouping (:func:`~megatron_nbp.training.optim.weight_decay_groups`:
    weight decay off for the parameters ``train.no_weight_decay`` names, by default biases and 1-D
    parameters; ``wd_mult`` / ``max_lr`` / ``min_lr`` keys that OptimizerParamScheduler reads), so both
    backends decay the same parameters. torch.optim.AdamW, except
    DeepSpeedCPUAdam (adamw mode, its compiled host kernel) for optimizer offload on GPU.
    """
    t = cfg.train
    groups = weight_decay_groups(module, t.lr, t.min_lr, t.no_weight_decay)
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if use_gpu and cfg.deepspeed.offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _skip_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (70-100 s) when its
    communication backend starts; that op only serves ``inference_all_reduce``, never training. Mark it
    incompatible (``deepspeed.ops.__compatible_ops__`` is the cached probe DeepSpeed consults) so training
    uses torch.distributed (gloo) directly and nothing is compiled."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass
class DeepSpeedState:
    """One rank's DeepSpeed engine (wrapping the GPTModel and the ZeRO optimizer), the LR scheduler
    (megatron's, on the engine's parameter groups), the forward step shared with the megatron backend,
    the precision and fp16's minimum loss scale."""

    engine: Any
    scheduler: OptimizerParamScheduler
    forward_step: Callable
    precision: str = "fp32"
    min_loss_scale: float = 1.0


def build_deepspeed_state(cfg: NBPConfig, plan: DevicePlan | None = None) -> DeepSpeedState:
    """GPTModel of this rank (built exactly as the megatron backend builds it, so the same seed gives
    the same weights, on ``plan.device`` in the run's precision), wrapped by ``deepspeed.initialize``
    with :class:`MegatronMPU`. parallel_state must be initialised with PP = 1."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    plan = plan or device_plan()
    use_gpu = plan.is_cuda
    if not use_gpu:
        _skip_shm_comm_build()
    precision = plan.resolve_precision(cfg.train.precision)
    module = build_gpt_model(cfg.model, precision=precision, plan=plan, train=cfg.train)
    if cfg.deepspeed.stage == 3 and module.share_embeddings_and_output_weights:
        # the output layer reads the embedding's (ZeRO-3 partitioned) weight outside the embedding's forward
        deepspeed.zero.register_external_parameter(module.output_layer, module.shared_embedding_or_output_weight())
    optimizer = build_optimizer(module, cfg, use_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, mpu=MegatronMPU, dist_init_required=False,
        config=deepspeed_config(cfg, parallel_state.get_data_parallel_world_size(), precision),
    )
    scheduler = build_scheduler(engine.optimizer, cfg.train)
    return DeepSpeedState(engine, scheduler, make_forward_step(cfg.model, cfg.train.pkeep, plan), precision,
                          cfg.train.min_loss_scale)


def deepspeed_train_step(state: DeepSpeedState, data_iterator: Iterator[LayoutBatch],
                         num_microbatches: int) -> StepResult:
    """One iteration: forward/backward of each micro-batch through the engine (DeepSpeed accumulates and
    takes the ZeRO step at the last one), then the scheduler step, unless the update is skipped.

    Non-finite loss or gradient (any micro-batch, any rank): the update is skipped on every rank, and
    weights, fp32 master weights, optimizer state and the LR schedule do not move. The skip is
    DeepSpeed's own: at the accumulation boundary the ZeRO optimizer (stages 1, 2 and 3, fp32 and
    bf16) computes the global gradient norm over the data- and tensor-parallel groups (with PP = 1, the
    world) and, when it is not finite, discards the accumulated gradients without stepping, counts
    ``engine.skipped_steps`` and still advances ``global_steps`` / ``micro_steps``, so later iterations,
    checkpoints and resume stay consistent. That covers a non-finite gradient on any rank. A non-finite
    loss can come with finite gradients (e.g. an inf at a masked-out token), so the micro-batch losses
    are checked too: after the last forward, every rank's "all my losses are finite" flag is all-reduced
    (MIN over the world) and, if any rank has a non-finite loss, each rank back-propagates its last
    micro-batch loss times NaN, which makes the gradients and so the norm NaN and routes the step into
    the same DeepSpeed skip. Whether the step was applied (``engine.was_step_applied()``) is all-reduced
    again (MIN) so every rank reports the same; the scheduler steps only when it was.

    Host reads per iteration: the loss flag before the last backward (one fused check of every
    micro-batch, one all-reduce) and, after the step, one all-reduce carrying "applied" and the loss.
    Under fp16 an overflow skip by DeepSpeed's dynamic loss scaler above its minimum scale is reported
    as ``loss_scale_overflow`` (a normal event of loss scaling, not a fault).

    Returns:
        the :class:`StepResult` (loss: token-weighted mean over micro-batches and DP ranks, nan/inf on a
        skipped step; grad_norm: before clipping, nan on a skipped step).

    Raises:
        RuntimeError: DeepSpeed applied the update on some ranks but not on others (replicas diverged).
    """
    engine = state.engine
    reported = []
    losses_finite = True
    for i in range(num_microbatches):
        output, loss_fn = state.forward_step(data_iterator, engine)
        loss_sum, num_tokens, logged = loss_fn(output)
        reported.append(logged)
        loss = loss_sum / num_tokens.clamp(min=1)
        if i == num_microbatches - 1:
            mine = torch.isfinite(torch.stack([x["lm loss"] for x in reported])).all()
            losses_finite = _on_every_rank(mine)
            if not losses_finite:
                loss = loss * float("nan")  # every gradient NaN -> DeepSpeed's overflow path skips the step
        engine.backward(loss)
        engine.step()
    applied = bool(engine.was_step_applied())
    not_applied = torch.tensor([0.0 if applied else 1.0], device=loss.device)
    total = torch.cat([not_applied, loss_contribution(reported, loss.device)])
    dist.all_reduce(total)
    skipped_ranks, loss_sum, tokens = total.tolist()
    mean_loss = loss_sum / max(tokens, 1.0)
    if skipped_ranks not in (0, dist.get_world_size()):
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed applied the update on some ranks but skipped it on "
                           "others; the data-parallel replicas no longer agree")
    if skipped_ranks:
        scale = getattr(engine.optimizer, "loss_scale", None)
        overflow = (state.precision == "fp16" and losses_finite and scale is not None
                    and float(scale) > state.min_loss_scale)
        return StepResult(mean_loss, float("nan"), False, loss_scale_overflow=overflow)
    state.scheduler.step(increment=1)
    grad_norm = engine.get_global_grad_norm()
    return StepResult(mean_loss, float(grad_norm if grad_norm is not None else 0.0), True)


def deepspeed_evaluate(state: DeepSpeedState, data_iterator: Iterator[LayoutBatch],
                       num_microbatches: int) -> tuple[float, float]:
    """Forward only through the engine (eval mode, no gradient, no backward or step; train mode
    again after), then the loss reduction of :func:`deepspeed_train_step`. Collective.

    Returns:
        (loss sum in nats, loss tokens) over the micro-batches and data-parallel ranks, on every rank.
    """
    engine = state.engine
    engine.eval()
    reported = []
    try:
        with torch.no_grad():
            for _ in range(num_microbatches):
                output, loss_fn = state.forward_step(data_iterator, engine)
                reported.append(loss_fn(output)[2])
    finally:
        engine.train()
    total = loss_contribution(reported, reported[0]["lm loss"].device)
    dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return loss_sum, tokens


def deepspeed_gather_weights(state: DeepSpeedState, cfg: NBPConfig, dst: int) -> dict[str, torch.Tensor] | None:
    """:func:`megatron_nbp.training.gather_weights.gather_full_state_dict` of the engine's model; under
    ZeRO-3 inside ``deepspeed.zero.GatheredParameters`` (the partitioned parameters made whole for the
    duration, read only). Collective."""
    module = state.engine.module
    if cfg.deepspeed.stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return gather_full_state_dict(module, cfg.model, dst)
    return gather_full_state_dict(module, cfg.model, dst)


def _on_every_rank(flag: torch.Tensor) -> bool:
    """A bool tensor ``flag`` and-ed over every rank of the world (an int32 MIN all-reduce; collective;
    one host read)."""
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class DeepSpeedBackend(TrainingBackend):
    """:class:`TrainingBackend` over a DeepSpeed ZeRO engine (TP from megatron-core, no PP); its state
    after :meth:`build` is :attr:`state` (a :class:`DeepSpeedState`)."""

    name = "deepspeed"

    def __init__(self, cfg: NBPConfig) -> None:
        super().__init__(cfg)
        self.state: DeepSpeedState | None = None

    def build(self, plan: DevicePlan) -> None:
        """:func:`build_deepspeed_state` on ``plan``."""
        self.state = build_deepspeed_state(self.cfg, plan)
        self.plan = plan

    @property
    def precision(self) -> str:
        """The resolved precision of :attr:`state`."""
        return self.state.precision

    def describe(self, dp_size: int, num_microbatches: int) -> str:
        """ZeRO stage and offload, TP / DP, micro-batches, sequence and block sizes, precision."""
        cfg, p = self.cfg, self.cfg.parallel
        return (f"> DeepSpeed ZeRO-{cfg.deepspeed.stage} (optimizer offload: {cfg.deepspeed.offload}) | "
                f"TP={p.tensor_model_parallel_size} DP={dp_size} | micro-batches per iteration: {num_microbatches} | "
                f"seq length {cfg.model.seq_length} | block size {cfg.model.block_size} | "
                f"padded vocab {cfg.model.padded_vocab_size} | {self.precision}")

    def load(self) -> Restored | None:
        """DeepSpeed checkpoint from ``cfg.load`` (engine, ZeRO partitions, scheduler, every rank's RNG;
        :func:`megatron_nbp.deepspeed_checkpointing.load_deepspeed_checkpoint`) as
        :func:`megatron_nbp.restore.what_to_restore` decides (``--finetune``, ``--no-load-optim``,
        ``--no-load-rng``, a DP change), then :func:`megatron_nbp.restore.finish_restore`."""
        cfg, t = self.cfg, self.cfg.train
        options = LoadOptions.from_config(t)
        tag = read_latest_tag(cfg.load)
        if tag is None:
            load_deepspeed_checkpoint(cfg.load, None, None, {})  # refuses a megatron-backend checkpoint
            check_nothing_to_load(options, cfg.load)
            return None
        meta = read_meta(cfg.load, tag)
        saved = ParallelLayout(meta["tensor_model_parallel_size"], 1, meta["data_parallel_size"])
        plan = what_to_restore(options, saved, ParallelLayout.current(), Path(cfg.load) / tag, "deepspeed",
                               zero_stage=meta.get("zero_stage"))
        iteration, consumed = load_deepspeed_checkpoint(
            cfg.load, self.state.engine, self.state.scheduler, cfg.to_dict()["model"], load_optimizer=plan.optimizer,
            load_rng=plan.rng, weights_only=options.finetune, same_layout=False)
        return finish_restore(plan, self.state.scheduler, iteration, consumed, t.seed)

    def train_step(self, data_iterator: Iterator[LayoutBatch], num_microbatches: int) -> StepResult:
        """:func:`deepspeed_train_step` on :attr:`state`."""
        return deepspeed_train_step(self.state, data_iterator, num_microbatches)

    def save(self, iteration: int, consumed: int) -> Path:
        """:func:`megatron_nbp.deepspeed_checkpointing.save_deepspeed_checkpoint` under ``cfg.save``."""
        return save_deepspeed_checkpoint(self.cfg.save, iteration, self.state.engine, self.state.scheduler, consumed,
                                         self.cfg.to_dict()["model"], self.cfg.deepspeed.stage,
                                         record=run_record(self.cfg))

    def evaluate(self, data_iterator: Iterator[LayoutBatch], num_microbatches: int) -> tuple[float, float]:
        """:func:`deepspeed_evaluate` on :attr:`state`."""
        return deepspeed_evaluate(self.state, data_iterator, num_microbatches)

    def gather_weights(self, dst: int) -> dict[str, torch.Tensor] | None:
        """:func:`deepspeed_gather_weights` on :attr:`state`."""
        return deepspeed_gather_weights(self.state, self.cfg, dst)

    def learning_rate(self) -> float:
        """The ZeRO optimizer's first group's lr."""
        return self.state.engine.optimizer.param_groups[0]["lr"]
