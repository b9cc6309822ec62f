"""The pieces of one training iteration both backends share: the megatron ``forward_step_func`` of the
NBP model (:func:`make_forward_step`, with its attention :class:`MaskCache`), the masked token-mean loss
(:func:`loss_func`, Megatron-LM's 3-tuple convention), and the reduction of the micro-batch losses over
data-parallel ranks, fused with the non-finite check in the megatron backend (:func:`check_and_reduce`).

Host synchronisation: none here except the one read of :func:`check_and_reduce` /
:func:`reduce_losses`; batches arrive on the host and masks are keyed by host tensors.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel

from megatron_nbp.config import ModelConfig
from megatron_nbp.device import DevicePlan, device_plan, move_batch
from megatron_nbp.layouts import LayoutBatch, corrupt_video_tokens
from megatron_nbp.model.attention import ATTENTION_BACKENDS


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
    ``plan.device`` (pinned, non-blocking on CUDA), then goes through this rank's stage.

    The returned function takes (data_iterator, model) and returns (per-token loss output [B, S],
    :func:`loss_func` bound to the batch's loss mask); the DeepSpeed backend calls it with its engine
    as the model."""
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


def loss_contribution(losses: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """This rank's [loss sum, token count] (fp32, on ``device``): its micro-batches' on tensor-parallel
    rank 0 of the last pipeline stage (the other TP ranks hold the same values), zeros elsewhere, so
    that a SUM over the world is the sum over data-parallel ranks.

    Args:
        losses: the per-micro-batch logging dicts of :func:`loss_func` ({"lm loss": [sum, count]}).
    """
    if (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and losses):
        return torch.stack([x["lm loss"] for x in losses]).sum(0).float()
    return torch.zeros(2, dtype=torch.float32, device=device)


def check_and_reduce(model: DistributedDataParallel, losses: list[dict[str, torch.Tensor]],
                     check_grads: bool = True) -> tuple[bool, float]:
    """The non-finite check and the loss reduction of one iteration, fused: every gradient buffer of
    megatron DDP (one sum over each contiguous buffer, finite or not, not one check per parameter) and
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
    # One reduction pass per buffer: its sum is finite only if every element is (NaN and +-inf propagate,
    # +inf + -inf is NaN); finite gradients summing past fp32's 3.4e38 also count as non-finite.
    flags = [torch.isfinite(b.grad_data.sum()) for b in model.buffers + model.expert_parallel_buffers] \
        if check_grads else []
    if losses:
        flags.append(torch.isfinite(torch.stack([x["lm loss"] for x in losses])).all())
    bad = (~torch.stack(flags).all()).float().reshape(1) if flags else torch.zeros(1, device=device)
    total = torch.cat([bad.to(device), loss_contribution(losses, device).to(device)])
    dist.all_reduce(total)
    bad_ranks, loss_sum, tokens = total.tolist()
    return bad_ranks == 0, loss_sum / max(tokens, 1.0)


def reduce_losses(losses: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over micro-batches and data-parallel ranks, on every rank (collective:
    a SUM all-reduce over the world, see :func:`loss_contribution`)."""
    total = loss_contribution(losses, device_plan().device)
    dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0)
