"""NBP pretraining with megatron-core: model, DDP, optimizer, scheduler, 1F1B schedule, the loop.

Follows Megatron-LM's ``pretrain`` structure: ``forward_step`` / ``loss_func`` for
``get_forward_backward_func()`` (1F1B when PP > 1), the model on this process's device
(megatron_nbp.device) in the run's precision (``Float16Module`` for ``--bf16`` / ``--fp16``), megatron
DDP with ``finalize_model_grads`` (data-parallel all-reduce or reduce-scatter, optionally overlapped
with backward, and the tied-embedding reduction across pipeline stages), the megatron optimizer
(plain or distributed; fp32 main params under mixed precision; dynamic loss scaling under fp16) with
gradient clipping, and ``OptimizerParamScheduler`` stepped once per applied update.

Host synchronisation per iteration: one, the fused non-finite check + loss reduction
(:func:`check_and_reduce`), besides megatron's own gradient-norm read in ``optimizer.step()``;
memory statistics are gathered at the logging interval only.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_nbp.checkpointing import RunInfo, load_checkpoint, save_checkpoint
from megatron_nbp.config import ConfigError, ModelConfig, NBPConfig, TrainingConfig
from megatron_nbp.data import TokenClipStream, check_manifest, condition_key, micro_batches
from megatron_nbp.device import DevicePlan, device_plan, move_batch
from megatron_nbp.layouts import LayoutBatch, corrupt_video_tokens
from megatron_nbp.model.attention import ATTENTION_BACKENDS
from megatron_nbp.model.builder import PARAMS_DTYPES, build_gpt_model
from megatron_nbp.model.params import count_parameters, format_count
from megatron_nbp.parallel import initialize_parallel, is_logging_rank, print_rank_0
from megatron_nbp.training_log import TrainingLogger, peak_memory_gib


@dataclass
class TrainingState:
    """Everything one rank trains: the DDP-wrapped model stage (``Float16Module`` inside under bf16 /
    fp16), the megatron optimizer, the LR scheduler, the forward_step_func for the model's layout and
    attention backend, the device plan and the resolved precision ("bf16", "fp16" or "fp32").
    ``last_skip_was_overflow`` is True after an fp16 iteration skipped by the dynamic loss scaler (a
    normal event of loss scaling, see :func:`train_step`)."""

    model: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler
    forward_step: Callable
    plan: DevicePlan
    precision: str
    last_skip_was_overflow: bool = False


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
    optimizer = get_megatron_optimizer(optimizer_config(t, precision), [model])
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
    optimizer), Megatron-LM's loss-scaling settings for fp16, and the distributed optimizer if asked.
    The DeepSpeed backend builds its parameter groups from it."""
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, params_dtype=PARAMS_DTYPES[precision],
        bf16=precision == "bf16", fp16=precision == "fp16",
        loss_scale=t.loss_scale, initial_loss_scale=t.initial_loss_scale, min_loss_scale=t.min_loss_scale,
        loss_scale_window=t.loss_scale_window, hysteresis=t.hysteresis,
        use_distributed_optimizer=t.use_distributed_optimizer, overlap_param_gather=t.overlap_param_gather,
    )


def build_scheduler(optimizer, t: TrainingConfig) -> OptimizerParamScheduler:
    """megatron's OptimizerParamScheduler: linear warmup from 0 over ``lr_warmup_iters``, then
    ``lr_decay_style`` decay to ``min_lr`` at ``train_iters``; constant weight decay (scaled per
    parameter group by ``wd_mult``). Sets the groups' lr/weight_decay at construction and on step()."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
    )


def build_data_iterator(cfg: NBPConfig, consumed: int) -> Iterator[LayoutBatch]:
    """Micro-batches for this rank's data-parallel position, resuming after ``consumed`` global samples.
    The batches stay on the host; the forward step moves them (see :func:`make_forward_step`).
    parallel_state must be initialised."""
    dp_size = parallel_state.get_data_parallel_world_size()
    stream = TokenClipStream(
        cfg.data, parallel_state.get_data_parallel_rank(), dp_size, cfg.train.seed, cfg.model.latent_shape,
        cfg.model.vocab_size, cfg.train.shuffle_buffer, consumed=consumed // dp_size,
        condition_key=condition_key(cfg.model),
    )
    return micro_batches(stream, cfg.train.micro_batch_size, cfg.model, cfg.train.p_drop_cond, cfg.train.seed)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token-mean cross entropy of one micro-batch (Megatron-LM's 3-tuple convention).

    Args:
        loss_mask: float32 [B, S] on the model's device, 1 where the target is a video token.
        output_tensor: float32 [B, S] per-token cross entropy from GPTModel.

    Returns:
        (sum of masked losses, number of loss tokens (int32 tensor), {"lm loss": [sum, count]} for
        logging); all on the device, nothing read back to the host.
    """
    losses = output_tensor.float()
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}


class MaskCache:
    """The attention mask of a layout, built on the device once and reused: a dense bool tensor or
    (flex) a handle to a FlexAttention BlockMask, per the model's attention backend.

    The block ids are the same for every micro-batch of a layout (they are shared by the batch), so
    the mask is built once per block-id pattern and broadcast over the batch; a batch with padded text
    conditions gets its own [B, ...] mask, rebuilt only when the padding pattern changes. The cache is
    keyed by the bytes of the *host* block ids and padding (the batches arrive on the CPU, see
    :func:`make_forward_step`), so checking it never reads a device tensor back.

    Args:
        backend: key of ``ATTENTION_BACKENDS`` ("dense" or "flex").
        device: where masks are built (default: the device plan's).
    """

    def __init__(self, backend: str, device: torch.device | str | None = None) -> None:
        self.build = ATTENTION_BACKENDS[backend][1]
        self.device = torch.device(device) if device is not None else device_plan().device
        self._key, self._mask = None, None

    def __call__(self, block_ids: torch.Tensor, key_padding: torch.Tensor | None = None) -> Any:
        """Mask for int64 [B, S] block ids and optional bool [B, S] key padding (host tensors; device
        tensors work but cost a device-to-host copy each call)."""
        key = (tuple(block_ids.shape[1:]), block_ids[0].cpu().numpy().tobytes(),
               None if key_padding is None else (tuple(key_padding.shape), key_padding.cpu().numpy().tobytes()))
        if key != self._key:
            if key_padding is None:
                mask = self.build(block_ids[:1], device=self.device)
            else:
                mask = self.build(block_ids, key_padding, device=self.device)
            self._key, self._mask = key, mask
        return self._mask


def make_forward_step(model_cfg: ModelConfig, pkeep: float = 1.0, plan: DevicePlan | None = None):
    """megatron ``forward_step_func`` for this model: one host micro-batch (LayoutBatch) gets the
    ``pkeep`` corruption of its input video tokens (training only; on the host, from the CPU RNG that
    megatron seeds alike on TP partners), its mask from the :class:`MaskCache`, and is moved to
    ``plan.device`` (pinned, non-blocking on CUDA), then goes through this rank's stage."""
    plan = plan or device_plan()
    masks = MaskCache(model_cfg.attention_backend, plan.device)
    rope3d = model_cfg.position_embedding_type == "rope3d"

    def forward_step(data_iterator: Iterator[LayoutBatch], model):
        batch = next(data_iterator)
        if model.training and pkeep < 1.0:
            batch = dataclasses.replace(batch, tokens=corrupt_video_tokens(
                batch.tokens, pkeep, model_cfg.video_token_offset, model_cfg.total_vocab_size))
        mask = masks(batch.block_ids, batch.key_padding)
        batch = move_batch(batch, plan)
        positions = batch.grid_position_ids if rope3d else batch.position_ids
        output = model(batch.tokens, positions, mask, labels=batch.labels)
        return output, partial(loss_func, batch.loss_mask)

    return forward_step


def train_step(state: TrainingState, data_iterator, cfg: NBPConfig, num_microbatches: int):
    """One iteration: forward/backward over the micro-batches (1F1B when PP > 1), the non-finite check,
    optimizer step, scheduler step.

    The check and the loss reduction are one collective and one host read (:func:`check_and_reduce`).
    A non-finite loss or gradient on any rank skips the update on every rank (weights, optimizer state
    and LR schedule unchanged). Under fp16 the gradients are megatron's loss scaler's to check (an
    overflow lowers the scale and skips the step, Megatron-LM's dynamic loss scaling:
    ``state.last_skip_was_overflow``); the scheduler steps only after an applied update.

    Returns:
        (loss: float, token-weighted mean over micro-batches and data-parallel ranks, on every rank;
        grad_norm: float, nan on a skipped step; update_ok: bool)
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
    state.last_skip_was_overflow = False
    finite, loss = check_and_reduce(state.model, losses, check_grads=state.precision != "fp16")
    if not finite:
        state.optimizer.zero_grad()  # skip: neither weights, optimizer state nor the LR schedule move
        return loss, float("nan"), False
    update_ok, grad_norm, _ = state.optimizer.step()
    if not update_ok:  # fp16: the loss scaler found an overflow and lowered the scale
        state.last_skip_was_overflow = float(state.optimizer.get_loss_scale()) > cfg.train.min_loss_scale
        return loss, float("nan"), False
    state.scheduler.step(increment=1)
    return loss, float(grad_norm or 0.0), True


def _loss_contribution(losses: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """This rank's [loss sum, token count] (fp32, on ``device``): its micro-batches' on tensor-parallel
    rank 0 of the last pipeline stage (the other TP ranks hold the same values), zeros elsewhere, so
    that a SUM over the world is the sum over data-parallel ranks."""
    if (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and losses):
        return torch.stack([x["lm loss"] for x in losses]).sum(0).float()
    return torch.zeros(2, dtype=torch.float32, device=device)


def check_and_reduce(model: DistributedDataParallel, losses: list[dict[str, torch.Tensor]],
                     check_grads: bool = True) -> tuple[bool, float]:
    """The non-finite check and the loss reduction of one iteration, fused: every gradient buffer of
    megatron DDP (one ``isfinite().all()`` over each contiguous buffer, not one per parameter) and
    every micro-batch loss of this rank make one flag; flag and loss contribution go into one SUM
    all-reduce over the world and are read back to the host once.

    Args:
        model: megatron DDP (its ``buffers`` hold every gradient, ``main_grad`` views into them).
        losses: the schedule's per-micro-batch logging dicts (last stage; empty elsewhere).
        check_grads: False under fp16, whose loss scaler checks the gradients itself.

    Returns:
        (True when every gradient and loss on every rank is finite (all ranks get the same answer, so
        they skip together), token-weighted mean loss over micro-batches and data-parallel ranks).
    """
    device = next(iter(model.buffers)).grad_data.device if model.buffers else torch.device("cpu")
    flags = [torch.isfinite(b.grad_data).all() for b in model.buffers + model.expert_parallel_buffers] \
        if check_grads else []
    if losses:
        flags.append(torch.isfinite(torch.stack([x["lm loss"] for x in losses])).all())
    bad = (~torch.stack(flags).all()).float().reshape(1) if flags else torch.zeros(1, device=device)
    total = torch.cat([bad.to(device), _loss_contribution(losses, device).to(device)])
    dist.all_reduce(total)
    bad_ranks, loss_sum, tokens = total.tolist()
    return bad_ranks == 0, loss_sum / max(tokens, 1.0)


def reduce_losses(losses: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over micro-batches and data-parallel ranks, on every rank (collective:
    a SUM all-reduce over the world, see :func:`_loss_contribution`)."""
    total = _loss_contribution(losses, device_plan().device)
    dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0)


def start_job(cfg: NBPConfig, pipeline_parallel: int) -> tuple[DevicePlan, int, int]:
    """What both backends do before building a model: validate the config, check the data manifest
    against the model (no process group or allocation yet), choose the device and start the process
    groups, refuse what this device cannot run, print the parameter count.

    Returns:
        (device plan, data-parallel size, micro-batches per iteration).

    Raises:
        ConfigError, DataError, ValueError: a bad config, mismatched data, or no ``--data``.
    """
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    check_device_support(cfg, device_plan())
    if cfg.data is None:
        raise ValueError("--data (directory of token shards with manifest.json) is required")
    check_manifest(cfg.data, cfg.model, cfg.train.tokenizer_sha256)  # before any model is built
    t = cfg.train
    plan = initialize_parallel(cfg.parallel.tensor_model_parallel_size, pipeline_parallel, seed=t.seed)
    dp_size = parallel_state.get_data_parallel_world_size()
    count = count_parameters(cfg.model)
    print_rank_0(f"> parameters: transformer {format_count(count.transformer)}, total {format_count(count.total)}")
    print_rank_0(f"> device: {plan.device} ({plan.distributed_backend}) | precision "
                 f"{plan.resolve_precision(t.precision)}")
    return plan, dp_size, t.global_batch_size // (t.micro_batch_size * dp_size)


def check_device_support(cfg: NBPConfig, plan: DevicePlan) -> None:
    """Refuse settings this device cannot train with (the config itself is valid).

    Raises:
        ConfigError: FlexAttention training on a CPU (torch has no CPU backward for it), or the
            Transformer Engine spec without CUDA.
    """
    errors = []
    if not plan.is_cuda and cfg.model.attention_backend == "flex":
        errors.append("--attention-backend flex trains on CUDA only (torch's FlexAttention has no CPU backward); "
                      "use --attention-backend dense on this machine")
    if not plan.is_cuda and cfg.model.transformer_impl == "transformer_engine":
        errors.append("--transformer-impl transformer_engine needs a CUDA GPU; use --transformer-impl local")
    if errors:
        raise ConfigError("invalid configuration for " + str(plan.device) + ":\n  - " + "\n  - ".join(errors))


def report_resume(cfg: NBPConfig, iteration: int) -> None:
    """The Megatron-style line saying where ``--load`` resumed."""
    print_rank_0(f"> loaded checkpoint from {cfg.load} at iteration {iteration}" if iteration
                 else f"> no checkpoint in {cfg.load}, starting from scratch")


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
                               cfg.to_dict()["model"], run_info(state, cfg))
    finally:
        if overlap:
            state.model.enable_forward_pre_hook()


def pretrain(cfg: NBPConfig) -> list[float]:
    """The training job (launchers/pretrain_nbp.py): returns the per-iteration losses seen on the
    logging rank (empty elsewhere). Resumes from ``cfg.load`` if it holds a checkpoint."""
    p = cfg.parallel
    plan, dp_size, num_microbatches = start_job(cfg, p.pipeline_model_parallel_size)
    state = build_training_state(cfg, plan)
    t = cfg.train
    print_rank_0(
        f"> TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} DP={dp_size} | "
        f"micro-batches per iteration: {num_microbatches} | seq length {cfg.model.seq_length} | "
        f"block size {cfg.model.block_size} | padded vocab {cfg.model.padded_vocab_size} | "
        f"{state.precision} | attention {cfg.model.attention_backend} | "
        f"distributed optimizer {t.use_distributed_optimizer} | recompute {t.recompute_granularity or 'none'}"
    )
    iteration, consumed = 0, 0
    if cfg.load:
        iteration, consumed = load_checkpoint(cfg.load, state.model, state.optimizer, state.scheduler,
                                              cfg.to_dict()["model"], load_optimizer=not t.no_load_optim,
                                              load_rng=not t.no_load_rng, run=run_info(state, cfg))
        if t.no_load_optim and iteration:  # a fresh optimizer; the LR schedule continues at the loaded iteration
            state.scheduler.step(increment=iteration)
        report_resume(cfg, iteration)
    data_iterator = build_data_iterator(cfg, consumed)
    return training_loop(
        cfg, iteration, consumed,
        step=lambda: train_step(state, data_iterator, cfg, num_microbatches),
        save=lambda it, seen: save_training_checkpoint(cfg, state, it, seen),
        current_lr=lambda: state.optimizer.param_groups[0]["lr"],
        plan=plan, overflow_skip=lambda: state.last_skip_was_overflow,
    )


def training_loop(cfg: NBPConfig, iteration: int, consumed: int,
                  step: Callable[[], tuple[float, float, bool]], save: Callable[[int, int], Any],
                  current_lr: Callable[[], float], plan: DevicePlan | None = None,
                  overflow_skip: Callable[[], bool] | None = None) -> list[float]:
    """The iteration loop both backends share: step, Megatron-style log line + TensorBoard (throughput,
    TFLOP/s per GPU, MFU and peak memory, see megatron_nbp.training_log), checkpoint at ``save_interval``
    / the last iteration / ``exit_interval`` (which then stops, as in Megatron-LM). An iteration whose step
    reports no update (non-finite loss or gradient, skipped) is logged and counted;
    ``train.max_skipped_iterations`` of them in a row save a final checkpoint (of the last good weights:
    skipped steps change nothing) and abort. An fp16 loss-scale overflow (``overflow_skip()`` True:
    the scaler lowered a scale still above ``min_loss_scale``) is counted as skipped but is no fault.

    Raises:
        FloatingPointError: too many consecutive skipped iterations.

    Args:
        iteration, consumed: where training resumes (0, 0 from scratch).
        step: one iteration -> (loss, grad norm, update applied).
        save: (iteration, consumed samples) -> checkpoint path; called only when ``cfg.save`` is set.
        current_lr: the learning rate after the step.
        plan: the device plan (memory figures on CUDA); default :func:`megatron_nbp.device.device_plan`.
        overflow_skip: whether the last skipped step was a loss-scale overflow (default: never).

    Returns:
        per-iteration losses on the logging rank (empty elsewhere).
    """
    t = cfg.train
    plan = plan or device_plan()
    logger = TrainingLogger(cfg, enabled=is_logging_rank(), plan=plan,
                            world_size=dist.get_world_size() if dist.is_initialized() else 1)
    history: list[float] = []
    skipped_in_a_row = 0
    while iteration < t.train_iters:
        start = time.perf_counter()
        loss, grad_norm, update_ok = step()
        iteration += 1
        consumed += t.global_batch_size
        history.append(loss)
        log_now = iteration % t.log_interval == 0 or iteration == t.train_iters
        memory = peak_memory_gib(plan) if log_now else None  # collective on CUDA: every rank calls it
        logger.log(iteration, loss, current_lr(), grad_norm, update_ok, time.perf_counter() - start, consumed,
                   memory)
        overflow = not update_ok and overflow_skip is not None and overflow_skip()
        skipped_in_a_row = 0 if update_ok or overflow else skipped_in_a_row + 1
        if not update_ok:
            print_rank_0(f"> iteration {iteration}: fp16 loss-scale overflow, update skipped" if overflow else
                         f"> iteration {iteration}: non-finite loss or gradient, update skipped "
                         f"({skipped_in_a_row} in a row, limit {t.max_skipped_iterations})")
        if skipped_in_a_row >= t.max_skipped_iterations:
            path = save(iteration, consumed) if cfg.save else None
            logger.close()
            raise FloatingPointError(
                f"{skipped_in_a_row} consecutive iterations with a non-finite loss or gradient (up to iteration "
                f"{iteration}; train.max_skipped_iterations={t.max_skipped_iterations}); "
                + (f"saved the last good weights to {path}" if path else "no --save given, nothing saved"))
        exiting = bool(t.exit_interval) and iteration % t.exit_interval == 0
        if cfg.save and (exiting or iteration == t.train_iters
                         or (t.save_interval and iteration % t.save_interval == 0)):
            print_rank_0(f"> saved checkpoint {save(iteration, consumed)}")
        if exiting:
            print_rank_0(f"> exiting at iteration {iteration} (--exit-interval {t.exit_interval})")
            break
    logger.close()
    return history if is_logging_rank() else []
