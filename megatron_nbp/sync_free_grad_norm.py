"""A gradient norm without host synchronisation for megatron-core installs without Transformer Engine or apex.

megatron-core 0.16.1 computes the gradient norm for clipping with a fused multi-tensor kernel from
Transformer Engine or apex. With neither installed it falls back to
``megatron.core.utils.local_multi_tensor_l2_norm``, which takes ``torch.norm`` of every gradient tensor
and builds a host tensor from the results: one device-to-host read, so on a GPU one synchronisation, per
parameter tensor (293 per nbp-xl iteration), where megatron itself needs one for the whole norm.

:func:`use_sync_free_grad_norm` replaces that fallback, and only that fallback, with
:func:`sync_free_l2_norm` (``torch.nn.utils.get_total_norm``: per-tensor norms with ``torch._foreach_norm``
and their norm, all on the device). Installs with Transformer Engine or apex keep their kernel. The value
is the same 2-norm (fp32 arithmetic throughout, where the fallback combined the per-tensor norms in
float64 on the host: the results differ in the last bits).
"""

from __future__ import annotations

import torch

__all__ = ["sync_free_l2_norm", "use_sync_free_grad_norm"]


def sync_free_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                      per_tensor: bool, *args) -> tuple[torch.Tensor, None]:
    """Drop-in for megatron-core's ``l2_norm_impl`` (the ``amp_C.multi_tensor_l2norm`` calling convention)
    that never reads a value back to the host.

    Args:
        chunk_size, noop_flag: unused (the fused kernels' chunking and overflow flag).
        tensor_lists: ``[tensors]``: the gradients (any float dtype, one device).
        per_tensor: must be False (megatron's gradient norm never asks for per-tensor norms).

    Returns:
        ``(norm, None)``: the 2-norm of all the tensors together, float32 ``[1]`` on their device.

    Raises:
        NotImplementedError: ``per_tensor`` True.
    """
    if per_tensor:
        raise NotImplementedError("sync_free_l2_norm computes the total norm only (per_tensor=False)")
    tensors = tensor_lists[0]
    return torch.nn.utils.get_total_norm(tensors, norm_type=2.0).float().reshape(1), None


def use_sync_free_grad_norm() -> bool:
    """Make megatron-core's gradient clipping use :func:`sync_free_l2_norm` where it would use its local
    fallback (no Transformer Engine, no apex). Idempotent; changes nothing where a fused kernel is in use.

    Returns:
        True when megatron-core's gradient norm is now :func:`sync_free_l2_norm`.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = sync_free_l2_norm
    return clip_grads.l2_norm_impl is sync_free_l2_norm
