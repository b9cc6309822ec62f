"""Where the data side runs: the device, process-group backend and precision of tokenizer training, the
tokenization job and the throughput benchmark.

One process per GPU (torchrun's convention): ``cuda:LOCAL_RANK`` with nccl between ranks on a CUDA machine,
the CPU with gloo otherwise. The decision takes CUDA availability as an argument (:func:`choose_device`) so
that tests can check the GPU decisions on a CPU machine; :func:`activate` applies it. ``data_prep`` keeps its
own small chooser because it must not import ``megatron_nbp`` (whose ``device`` module plans the model side).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from nbp_common.device import choose_torch_device, distributed_backend

__all__ = ["DataDevice", "PRECISIONS", "choose_device", "activate", "autocast", "to_device"]

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class DataDevice:
    """The device decisions of one data-side process.

    Attributes:
        device: ``cuda:LOCAL_RANK`` (or the CUDA device asked for) or ``cpu``.
        distributed_backend: ``"nccl"`` on CUDA, ``"gloo"`` on CPU (torch.distributed backend).
    """

    device: torch.device
    distributed_backend: str

    @property
    def is_cuda(self) -> bool:
        """True when work goes to a CUDA device."""
        return self.device.type == "cuda"

    def resolve_precision(self, precision: str) -> str:
        """``"auto"`` -> ``"bf16"`` on CUDA, ``"fp32"`` on CPU; ``"bf16"`` / ``"fp32"`` unchanged.

        Raises:
            ValueError: a precision name not in :data:`PRECISIONS`.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {PRECISIONS}")
        if precision == "auto":
            return "bf16" if self.is_cuda else "fp32"
        return precision


def choose_device(requested: str | torch.device = "auto", local_rank: int | None = None,
                  cuda_available: bool | None = None) -> DataDevice:
    """Choose this process's device (pure: sets nothing; see :func:`activate`).

    Args:
        requested: ``"auto"`` (``cuda:local_rank`` when CUDA is available, else ``cpu``), ``"cpu"``,
            ``"cuda"`` (= ``cuda:local_rank``) or ``"cuda:N"``.
        local_rank: this process's index on its node (default: torchrun's ``LOCAL_RANK``, 0 without it).
        cuda_available: whether CUDA can be used (default ``torch.cuda.is_available()``); tests pass True.

    Returns:
        DataDevice: ``cuda:local_rank`` + nccl, or ``cpu`` + gloo.

    Raises:
        ValueError: CUDA asked for on a machine without it, a device type other than cpu / cuda, an
            unparsable device string or a negative ``local_rank``.
    """
    chosen = choose_torch_device(requested, local_rank, cuda_available)
    return DataDevice(chosen, distributed_backend(chosen))


def activate(choice: DataDevice, cudnn_benchmark: bool = True) -> None:
    """Make ``choice.device`` the current CUDA device (before the process group and any allocation) and
    let cuDNN pick the fastest convolution algorithms for the fixed clip shapes (``cudnn.benchmark``;
    results then depend on the algorithms chosen, not bitwise reproducible across runs). No-op on CPU."""
    if choice.is_cuda:
        torch.cuda.set_device(choice.device)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` in bfloat16 on ``device``'s type when ``precision`` is ``"bf16"``, disabled for
    ``"fp32"`` (CPU autocast runs bf16 too, which is how the CPU tests exercise this path).

    Raises:
        ValueError: ``precision`` other than "bf16" / "fp32" (resolve "auto" first).
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' here, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto ``device``: through pinned memory with ``non_blocking=True`` on CUDA (the copy
    overlaps the work queued on the GPU), unchanged when it is already there."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
