"""NBP pretraining with megatron-core: model, DDP, optimizer, scheduler, 1F1B schedule, the loop.

Follows Megatron-LM's ``pretrain`` structure: ``forward_step`` / ``loss_func`` for
``get_forward_backward_func()`` (1F1B when PP > 1), megatron DDP with ``finalize_model_grads``
(data-parallel all-reduce and tied-embedding reduction across pipeline stages), the megatron
optimizer with gradient clipping, and ``OptimizerParamScheduler`` stepped once per iteration.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_nbp.checkpointing import load_checkpoint, save_checkpoint
from megatron_nbp.config import ModelConfig, NBPConfig, TrainingConfig
from megatron_nbp.data import TokenClipStream, check_manifest, condition_key, micro_batches
from megatron_nbp.layouts import LayoutBatch, corrupt_video_tokens
from megatron_nbp.model.attention import ATTENTION_BACKENDS
from megatron_nbp.model.builder import build_gpt_model
from megatron_nbp.model.params import count_parameters, format_count
from megatron_nbp.parallel import initialize_parallel, is_logging_rank, print_rank_0
from megatron_nbp.training_log import TrainingLogger


@dataclass
class TrainingState:
    """Everything one rank trains: the DDP-wrapped model stage, optimizer, LR scheduler and the
    megatron forward_step_func for the model's layout and attention backend."""

    model: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler
    forward_step: Callable


def build_training_state(cfg: NBPConfig) -> TrainingState:
    """Model stage of this rank wrapped in megatron DDP, megatron optimizer (Adam, clipping) and the
    warmup + decay LR schedule. parallel_state must be initialised."""
    t = cfg.train
    module = build_gpt_model(cfg.model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
    optimizer = get_megatron_optimizer(optimizer_config(t), [model])
    scheduler = build_scheduler(optimizer, t)
    config = module.config
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return TrainingState(model, optimizer, scheduler, make_forward_step(cfg.model, t.pkeep))


def optimizer_config(t: TrainingConfig) -> OptimizerConfig:
    """megatron-core OptimizerConfig of the run: Adam (AdamW-style decoupled weight decay), fp32 main
    params, gradient clipping ``t.clip_grad``. The DeepSpeed backend builds its parameter groups from it."""
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, params_dtype=torch.float32, use_distributed_optimizer=False,
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
        loss_mask: float32 [B, S], 1 where the target is a video token.
        output_tensor: float32 [B, S] per-token cross entropy from GPTModel.

    Returns:
        (sum of masked losses, number of loss tokens (int), {"lm loss": [sum, count]} for logging).
    """
    losses = output_tensor.float()
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}


class MaskCache:
    """The attention mask of a layout (dense tensor or FlexAttention BlockMask, per the model's
    attention backend) is the same for every micro-batch without padding: it is built once per
    block-id pattern (the block ids are shared by the batch in every layout here) and broadcast over
    the batch. A batch with padded text conditions gets its own [B, ...] mask, rebuilt only when the
    padding pattern changes."""

    def __init__(self, backend: str) -> None:
        self.build = ATTENTION_BACKENDS[backend][1]
        self._key, self._mask = None, None

    def __call__(self, block_ids: torch.Tensor, key_padding: torch.Tensor | None = None) -> Any:
        key = (tuple(block_ids.shape[1:]), block_ids[0].tolist(),
               None if key_padding is None else key_padding.tolist())
        if key != self._key:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            if key_padding is None:
                mask = self.build(block_ids[:1], device=device)
            else:
                mask = self.build(block_ids, key_padding, device=device)
            self._key, self._mask = key, mask
        return self._mask


def make_forward_step(model_cfg: ModelConfig, pkeep: float = 1.0):
    """megatron ``forward_step_func`` for this model: one micro-batch through this rank's stage,
    with the attention mask of the model's backend built once per layout, and (in training) the
    ``pkeep`` corruption of input video tokens."""
    masks = MaskCache(model_cfg.attention_backend)
    rope3d = model_cfg.position_embedding_type == "rope3d"

    def forward_step(data_iterator: Iterator[LayoutBatch], model):
        batch = next(data_iterator)
        tokens = batch.tokens
        if model.training and pkeep < 1.0:
            tokens = corrupt_video_tokens(tokens, pkeep, model_cfg.video_token_offset, model_cfg.total_vocab_size)
        positions = batch.grid_position_ids if rope3d else batch.position_ids
        output = model(tokens, positions, masks(batch.block_ids, batch.key_padding), labels=batch.labels)
        return output, partial(loss_func, batch.loss_mask)

    return forward_step


def train_step(state: TrainingState, data_iterator, cfg: NBPConfig, num_microbatches: int):
    """One iteration: forward/backward over the micro-batches (1F1B when PP > 1), optimizer step,
    scheduler step.

    Returns:
        (loss: float mean token loss on the last stage, else nan; grad_norm: float; update_ok: bool)
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
    if not all_finite(state.model, losses):
        state.optimizer.zero_grad()  # skip: neither weights, optimizer state nor the LR schedule move
        return reduce_losses(losses), float("nan"), False
    update_ok, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(increment=1)
    return reduce_losses(losses), float(grad_norm or 0.0), bool(update_ok)


def all_finite(model: DistributedDataParallel, losses: list[dict[str, torch.Tensor]]) -> bool:
    """True when every gradient of every rank and every micro-batch loss (last stage) is finite.

    All ranks get the same answer (a MIN all-reduce over the world), so they skip together.
    """
    ok = all(bool(torch.isfinite(p.main_grad).all()) for p in model.module.parameters()
             if getattr(p, "main_grad", None) is not None)
    if parallel_state.is_pipeline_last_stage():
        ok = ok and all(bool(torch.isfinite(x["lm loss"]).all()) for x in losses)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32,
                        device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def reduce_losses(losses: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over micro-batches and data-parallel ranks (last stage), else nan."""
    if not parallel_state.is_pipeline_last_stage():
        return float("nan")
    total = torch.stack([x["lm loss"] for x in losses]).sum(0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


def start_job(cfg: NBPConfig, pipeline_parallel: int) -> tuple[int, int]:
    """What both backends do before building a model: validate the config, check the data manifest
    against the model (no process group or allocation yet), start the process groups, print the
    parameter count.

    Returns:
        (data-parallel size, micro-batches per iteration).

    Raises:
        ConfigError, DataError, ValueError: a bad config, mismatched data, or no ``--data``.
    """
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.data is None:
        raise ValueError("--data (directory of token shards with manifest.json) is required")
    check_manifest(cfg.data, cfg.model, cfg.train.tokenizer_sha256)  # before any model is built
    t = cfg.train
    initialize_parallel(cfg.parallel.tensor_model_parallel_size, pipeline_parallel, seed=t.seed)
    dp_size = parallel_state.get_data_parallel_world_size()
    count = count_parameters(cfg.model)
    print_rank_0(f"> parameters: transformer {format_count(count.transformer)}, total {format_count(count.total)}")
    return dp_size, t.global_batch_size // (t.micro_batch_size * dp_size)


def report_resume(cfg: NBPConfig, iteration: int) -> None:
    """The Megatron-style line saying where ``--load`` resumed."""
    print_rank_0(f"> loaded checkpoint from {cfg.load} at iteration {iteration}" if iteration
                 else f"> no checkpoint in {cfg.load}, starting from scratch")


def pretrain(cfg: NBPConfig) -> list[float]:
    """The training job (launchers/pretrain_nbp.py): returns the per-iteration losses seen on the
    logging rank (empty elsewhere). Resumes from ``cfg.load`` if it holds a checkpoint."""
    p = cfg.parallel
    dp_size, num_microbatches = start_job(cfg, p.pipeline_model_parallel_size)
    state = build_training_state(cfg)
    print_rank_0(
        f"> TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} DP={dp_size} | "
        f"micro-batches per iteration: {num_microbatches} | seq length {cfg.model.seq_length} | "
        f"block size {cfg.model.block_size} | padded vocab {cfg.model.padded_vocab_size}"
    )
    iteration, consumed = 0, 0
    if cfg.load:
        iteration, consumed = load_checkpoint(cfg.load, state.model, state.optimizer, state.scheduler,
                                              cfg.to_dict()["model"])
        report_resume(cfg, iteration)
    data_iterator = build_data_iterator(cfg, consumed)
    return training_loop(
        cfg, iteration, consumed,
        step=lambda: train_step(state, data_iterator, cfg, num_microbatches),
        save=lambda it, seen: save_checkpoint(cfg.save, it, state.model, state.optimizer, state.scheduler,
                                              seen, cfg.to_dict()["model"]),
        current_lr=lambda: state.optimizer.param_groups[0]["lr"],
    )


def training_loop(cfg: NBPConfig, iteration: int, consumed: int,
                  step: Callable[[], tuple[float, float, bool]], save: Callable[[int, int], Any],
                  current_lr: Callable[[], float]) -> list[float]:
    """The iteration loop both backends share: step, Megatron-style log line + TensorBoard, checkpoint at
    ``save_interval`` / the last iteration / ``exit_interval`` (which then stops, as in Megatron-LM).
    An iteration whose step reports no update (non-finite loss or gradient, skipped) is logged and
    counted; ``train.max_skipped_iterations`` of them in a row save a final checkpoint (of the last
    good weights: skipped steps change nothing) and abort.

    Raises:
        FloatingPointError: too many consecutive skipped iterations.

    Args:
        iteration, consumed: where training resumes (0, 0 from scratch).
        step: one iteration -> (loss, grad norm, update applied).
        save: (iteration, consumed samples) -> checkpoint path; called only when ``cfg.save`` is set.
        current_lr: the learning rate after the step.

    Returns:
        per-iteration losses on the logging rank (empty elsewhere).
    """
    t = cfg.train
    logger = TrainingLogger(cfg, enabled=is_logging_rank())
    history: list[float] = []
    skipped_in_a_row = 0
    while iteration < t.train_iters:
        start = time.perf_counter()
        loss, grad_norm, update_ok = step()
        iteration += 1
        consumed += t.global_batch_size
        history.append(loss)
        logger.log(iteration, loss, current_lr(), grad_norm, update_ok, time.perf_counter() - start, consumed)
        skipped_in_a_row = 0 if update_ok else skipped_in_a_row + 1
        if not update_ok:
            print_rank_0(f"> iteration {iteration}: non-finite loss or gradient, update skipped "
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
