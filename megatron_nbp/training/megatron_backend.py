"""The megatron-core backend (``train.backend: megatron``): model, DDP, optimizer, scheduler, 1F1B.

Follows Megatron-LM's ``pretrain`` structure: ``forward_step`` / ``loss_func`` (megatron_nbp.training.step)
for ``get_forward_backward_func()`` (1F1B when PP > 1), the model on this process's device
(megatron_nbp.device) in the run's precision (``Float16Module`` for ``--bf16`` / ``--fp16``), megatron
DDP with ``finalize_model_grads`` (data-parallel all-reduce or reduce-scatter, optionally overlapped
with backward, and the tied-embedding reduction across pipeline stages), the megatron optimizer
(plain or distributed; fp32 main params under mixed precision; dynamic loss scaling under fp16) with
gradient clipping, and ``OptimizerParamScheduler`` stepped once per applied update.

Host synchronisation per iteration: one, the fused non-finite check + loss reduction
(:func:`~megatron_nbp.training.step.check_and_reduce`), besides megatron's own gradient-norm read in
``optimizer.step()``; memory statistics are gathered at the logging interval only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_nbp.checkpointing import RunInfo, open_checkpoint, restore_checkpoint, save_checkpoint
from megatron_nbp.run_record import run_record
from megatron_nbp.config import NBPConfig, TrainingConfig
from megatron_nbp.device import DevicePlan, device_plan
from megatron_nbp.layouts import LayoutBatch
from megatron_nbp.model.builder import PARAMS_DTYPES, build_gpt_model
from megatron_nbp.restore import (LoadOptions, ParallelLayout, Restored, check_nothing_to_load, finish_restore,
                                  what_to_restore)
from megatron_nbp.training.backend import StepResult, TrainingBackend
from megatron_nbp.training.gather_weights import gather_full_state_dict
from megatron_nbp.training.optim import build_scheduler, megatron_config_overrides
from megatron_nbp.training.step import check_and_reduce, loss_contribution, make_forward_step


@dataclass
class TrainingState:
    """Everything one rank trains: the DDP-wrapped model stage (``Float16Module`` inside under bf16 /
    fp16), the megatron optimizer, the LR scheduler, the forward_step_func for the model's layout and
    attention backend, the device plan and the resolved precision ("bf16", "fp16" or "fp32")."""

    model: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler
    forward_step: Callable
    plan: DevicePlan
    precision: str


def build_training_state(cfg: NBPConfig, plan: DevicePlan | None = None) -> TrainingState:
    """Model stage of this rank on ``plan.device`` in the run's precision, wrapped the megatron-core way
    (Megatron-LM's ``get_model``: ``Float16Module`` for bf16 / fp16, then megatron DDP with fp32 gradient
    reduction, the distributed optimizer and communication overlap as configured), the megatron optimizer
    (Adam, clipping; fp32 main params and grads under bf16 / fp16, dynamic loss scaling under fp16) and
    the warmup + decay LR schedule. parallel_state must be initialised.

    Args:
        plan: the process's device plan (default: :func:`megatron_nbp.device.device_plan`).
    """
    t = cfg.train
    plan = plan or device_plan()
    precision = plan.resolve_precision(t.precision)
    module = build_gpt_model(cfg.model, precision=precision, plan=plan, train=t,
                             sequence_parallel=cfg.parallel.sequence_parallel)
    config = module.config
    if precision != "fp32":
        module = Float16Module(config, module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=t.overlap_grad_reduce,
        overlap_param_gather=t.overlap_param_gather, use_distributed_optimizer=t.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    optimizer = get_megatron_optimizer(optimizer_config(t, precision), [model],
                                       config_overrides=megatron_config_overrides(t.no_weight_decay))
    scheduler = build_scheduler(optimizer, t)
    config.no_sync_func = model.no_sync
    if t.overlap_grad_reduce:  # start each bucket's reduction as soon as its last micro-batch is done
        config.grad_sync_func = model.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return TrainingState(model, optimizer, scheduler, make_forward_step(cfg.model, t.pkeep, plan), plan, precision)


def optimizer_config(t: TrainingConfig, precision: str = "fp32") -> OptimizerConfig:
    """megatron-core OptimizerConfig of the run: Adam (AdamW-style decoupled weight decay), gradient
    clipping ``t.clip_grad``, fp32 main params for bf16 / fp16 weights (megatron's mixed-precision
    optimizer), Megatron-LM's loss-scaling settings for fp16, and the distributed optimizer if asked."""
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, params_dtype=PARAMS_DTYPES[precision],
        bf16=precision == "bf16", fp16=precision == "fp16",
        loss_scale=t.loss_scale, initial_loss_scale=t.initial_loss_scale, min_loss_scale=t.min_loss_scale,
        loss_scale_window=t.loss_scale_window, hysteresis=t.hysteresis,
        use_distributed_optimizer=t.use_distributed_optimizer, overlap_param_gather=t.overlap_param_gather,
    )


def train_step(state: TrainingState, data_iterator: Iterator[LayoutBatch], cfg: NBPConfig,
               num_microbatches: int) -> StepResult:
    """One iteration: forward/backward over the micro-batches (1F1B when PP > 1), the non-finite check,
    optimizer step, scheduler step. Collective.

    The check and the loss reduction are one collective and one host read (:func:`check_and_reduce`).
    A non-finite loss or gradient on any rank skips the update on every rank (weights, optimizer state
    and LR schedule unchanged). Under fp16 the gradients are megatron's loss scaler's to check (an
    overflow lowers the scale and skips the step, Megatron-LM's dynamic loss scaling, reported as
    ``loss_scale_overflow`` while the scale is above ``min_loss_scale``); the scheduler steps only after
    an applied update.

    Returns:
        the :class:`StepResult` (loss: token-weighted mean over micro-batches and data-parallel ranks, on
        every rank; grad_norm nan on a skipped step).
    """
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=state.forward_step,
        data_iterator=data_iterator,
        model=[state.model],
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=False,
    )
    finite, loss = check_and_reduce(state.model, losses, check_grads=state.precision != "fp16")
    if not finite:
        state.optimizer.zero_grad()  # skip: neither weights, optimizer state nor the LR schedule move
        return StepResult(loss, float("nan"), False)
    update_ok, grad_norm, _ = state.optimizer.step()
    if not update_ok:  # fp16: the loss scaler found an overflow and lowered the scale
        overflow = float(state.optimizer.get_loss_scale()) > cfg.train.min_loss_scale
        return StepResult(loss, float("nan"), False, loss_scale_overflow=overflow)
    state.scheduler.step(increment=1)
    return StepResult(loss, float(grad_norm or 0.0), True)


def evaluate(state: TrainingState, data_iterator: Iterator[LayoutBatch], cfg: NBPConfig,
             num_microbatches: int) -> tuple[float, float]:
    """Forward-only pass of ``num_microbatches`` micro-batches through megatron-core's schedule
    (``get_forward_backward_func()(..., forward_only=True)``; under PP the losses come out on the last
    stage), no gradient, the model in eval mode and back in train mode after, as Megatron-LM's
    ``evaluate``: with ``--overlap-param-gather`` the parameters are all-gathered first (the forward
    pre-hooks paused meanwhile). Collective.

    Returns:
        (loss sum in nats, loss tokens) over the micro-batches and data-parallel ranks, on every rank.
    """
    overlap = cfg.train.overlap_param_gather
    if overlap:
        state.model.disable_forward_pre_hook(param_sync=True)
    state.model.eval()
    try:
        with torch.no_grad():
            losses = get_forward_backward_func()(
                forward_step_func=state.forward_step, data_iterator=data_iterator, model=[state.model],
                num_microbatches=num_microbatches, seq_length=cfg.model.seq_length,
                micro_batch_size=cfg.train.micro_batch_size, forward_only=True,
            )
    finally:
        state.model.train()
        if overlap:
            state.model.enable_forward_pre_hook()
    total = loss_contribution(losses, state.plan.device)
    dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return loss_sum, tokens


def gather_weights(state: TrainingState, cfg: NBPConfig, dst: int) -> dict[str, torch.Tensor] | None:
    """:func:`megatron_nbp.training.gather_weights.gather_full_state_dict` of the model (parameters
    all-gathered first under ``--overlap-param-gather``, as for a save). Collective."""
    overlap = cfg.train.overlap_param_gather
    if overlap:
        state.model.disable_forward_pre_hook(param_sync=True)
    try:
        return gather_full_state_dict(state.model, cfg.model, dst)
    finally:
        if overlap:
            state.model.enable_forward_pre_hook()


def run_info(state: TrainingState, cfg: NBPConfig) -> RunInfo:
    """The precision and optimizer kind the megatron backend's checkpoints record."""
    return RunInfo(precision=state.precision, use_distributed_optimizer=cfg.train.use_distributed_optimizer)


def save_training_checkpoint(cfg: NBPConfig, state: TrainingState, iteration: int, consumed: int) -> Path:
    """Save the megatron backend's checkpoint. With ``--overlap-param-gather`` the parameters are
    all-gathered first (the forward pre-hooks that would do it are paused around the save, as in
    Megatron-LM), so every rank saves up-to-date weights."""
    overlap = cfg.train.overlap_param_gather
    if overlap:
        state.model.disable_forward_pre_hook(param_sync=True)
    try:
        return save_checkpoint(cfg.save, iteration, state.model, state.optimizer, state.scheduler, consumed,
                               cfg.to_dict()["model"], run_info(state, cfg), record=run_record(cfg))
    finally:
        if overlap:
            state.model.enable_forward_pre_hook()


class MegatronBackend(TrainingBackend):
    """:class:`TrainingBackend` over megatron-core (TP, PP with 1F1B, DDP or the distributed optimizer);
    its state after :meth:`build` is :attr:`state` (a :class:`TrainingState`)."""

    name = "megatron"

    def __init__(self, cfg: NBPConfig) -> None:
        super().__init__(cfg)
        self.state: TrainingState | None = None

    def build(self, plan: DevicePlan) -> None:
        """:func:`build_training_state` on ``plan``."""
        self.state = build_training_state(self.cfg, plan)
        self.plan = plan

    @property
    def precision(self) -> str:
        """The resolved precision of :attr:`state`."""
        return self.state.precision

    def describe(self, dp_size: int, num_microbatches: int) -> str:
        """TP / PP / DP, micro-batches, sequence and block sizes, precision, attention, optimizer, recompute."""
        cfg, p, t = self.cfg, self.cfg.parallel, self.cfg.train
        return (f"> TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} DP={dp_size} | "
                f"micro-batches per iteration: {num_microbatches} | seq length {cfg.model.seq_length} | "
                f"block size {cfg.model.block_size} | padded vocab {cfg.model.padded_vocab_size} | "
                f"{self.precision} | attention {cfg.model.attention_backend} | "
                f"distributed optimizer {t.use_distributed_optimizer} | "
                f"recompute {t.recompute_granularity or 'none'}")

    def load(self) -> Restored | None:
        """megatron dist checkpoint from ``cfg.load``: :func:`megatron_nbp.checkpointing.open_checkpoint`,
        :func:`megatron_nbp.restore.what_to_restore` (``--finetune``, ``--no-load-optim``,
        ``--no-load-rng``, a TP / PP / DP change), :func:`megatron_nbp.checkpointing.restore_checkpoint`,
        :func:`megatron_nbp.restore.finish_restore`."""
        cfg, state, t = self.cfg, self.state, self.cfg.train
        options = LoadOptions.from_config(t)
        opened = open_checkpoint(cfg.load)
        if opened is None:
            check_nothing_to_load(options, cfg.load)
            return None
        saved = ParallelLayout(*opened.layout) if opened.layout else None
        plan = what_to_restore(options, saved, ParallelLayout.current(), opened.path, "megatron",
                               distributed_optimizer=opened.run.use_distributed_optimizer)
        iteration, consumed = restore_checkpoint(opened, state.model, state.optimizer, state.scheduler,
                                                 cfg.to_dict()["model"], load_optimizer=plan.optimizer,
                                                 load_rng=plan.rng, run=run_info(state, cfg))
        return finish_restore(plan, state.scheduler, iteration, consumed, t.seed)

    def train_step(self, data_iterator: Iterator[LayoutBatch], num_microbatches: int) -> StepResult:
        """:func:`train_step` on :attr:`state`."""
        return train_step(self.state, data_iterator, self.cfg, num_microbatches)

    def save(self, iteration: int, consumed: int) -> Path:
        """:func:`save_training_checkpoint`."""
        return save_training_checkpoint(self.cfg, self.state, iteration, consumed)

    def evaluate(self, data_iterator: Iterator[LayoutBatch], num_microbatches: int) -> tuple[float, float]:
        """:func:`evaluate` on :attr:`state`."""
        return evaluate(self.state, data_iterator, self.cfg, num_microbatches)

    def gather_weights(self, dst: int) -> dict[str, torch.Tensor] | None:
        """:func:`gather_weights` on :attr:`state`."""
        return gather_weights(self.state, self.cfg, dst)

    def learning_rate(self) -> float:
        """The megatron optimizer's first group's lr."""
        return self.state.optimizer.param_groups[0]["lr"]
