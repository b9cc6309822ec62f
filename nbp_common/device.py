"""The one device decision both sides make: which device a process of a (torchrun) job uses.

``megatron_nbp.device.device_plan`` (training, conversion, generation) and ``data_prep.device.choose_device``
(tokenizer training, the tokenization job) add their own settings on top of :func:`choose_torch_device`.
"""

from __future__ import annotations

import os

import torch

__all__ = ["choose_torch_device", "distributed_backend"]


def choose_torch_device(requested: str | torch.device | None = "auto", local_rank: int | None = None,
                        cuda_available: bool | None = None) -> torch.device:
    """Choose this process's device (pure: sets nothing).

    Args:
        requested: ``"auto"`` or None (``cuda:local_rank`` when CUDA is available, else ``cpu``), ``"cpu"``,
            ``"cuda"`` (= ``cuda:local_rank``) or ``"cuda:N"``.
        local_rank: this process's index on its node (default: torchrun's ``LOCAL_RANK``, 0 without it).
        cuda_available: whether CUDA can be used (default ``torch.cuda.is_available()``); tests pass True
            to check the GPU decisions on a CPU machine.

    Returns:
        The torch.device.

    Raises:
        ValueError: CUDA asked for on a machine without it, a device type other than cpu / cuda, an
            unparsable device string, or a negative ``local_rank``.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    if requested is None or (isinstance(requested, str) and requested == "auto"):
        return torch.device("cuda", local_rank) if cuda_available else torch.device("cpu")
    try:
        chosen = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {requested!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if chosen.type == "cuda" and not cuda_available:
        raise ValueError(f"device {requested!r} requested but CUDA is not available on this machine")
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    return chosen


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for processes on ``device``: ``"nccl"`` on CUDA, ``"gloo"`` on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
