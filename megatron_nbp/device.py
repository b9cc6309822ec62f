"""Where every job runs: the one place that chooses devices, the process-group backend and the default
precision, and that moves batches onto the device.

Megatron-LM's conventions: one process per GPU, ``torch.cuda.set_device(LOCAL_RANK)``, the model built
directly on that GPU (``use_cpu_initialization=False``), nccl between GPUs; on a machine without CUDA
everything runs on the CPU with gloo and CPU initialization. Training (both backends) and evaluation
call :func:`device_plan`; nothing else in the project asks ``torch.cuda.is_available()`` to decide a
device. The decision takes CUDA availability as an argument so that it can be tested without a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nbp_common.device import choose_torch_device, distributed_backend

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class DevicePlan:
    """The device decisions of one process.

    Attributes:
        device: ``cuda:LOCAL_RANK`` on a CUDA machine, else ``cpu``: where the model, its gradients, the
            batches and the attention masks live.
        distributed_backend: ``"nccl"`` on CUDA, ``"gloo"`` on CPU (torch.distributed backend).
        use_cpu_initialization: megatron-core's flag: True only on CPU (on GPU the layers allocate and
            initialise their weights on ``device`` directly).
        pin_memory: copy batches through page-locked host memory with ``non_blocking=True`` (CUDA only).
        default_precision: ``"bf16"`` on CUDA (Megatron-LM's ``--bf16``), ``"fp32"`` on CPU.
    """

    device: torch.device
    distributed_backend: str
    use_cpu_initialization: bool
    pin_memory: bool
    default_precision: str

    @property
    def is_cuda(self) -> bool:
        """True when the plan places work on a CUDA device."""
        return self.device.type == "cuda"

    def resolve_precision(self, precision: str) -> str:
        """``"auto"`` -> :attr:`default_precision`; "bf16" / "fp16" / "fp32" unchanged.

        Raises:
            ValueError: an unknown precision name.
        """
        if precision == "auto":
            return self.default_precision
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in ('auto', {', '.join(map(repr, PRECISIONS))})")
        return precision


def device_plan(local_rank: int | None = None, cuda_available: bool | None = None,
                device: str | torch.device | None = None) -> DevicePlan:
    """Choose the device of this process (pure: sets nothing; see :func:`activate`).

    Args:
        local_rank: this process's index on its node (torchrun's LOCAL_RANK; default from the
            environment, 0 for a plain ``python`` run).
        cuda_available: whether CUDA can be used (default ``torch.cuda.is_available()``); tests pass
            True to check the GPU decisions on a CPU machine.
        device: force a device (``--device cpu`` on a GPU machine, or ``cuda:1``); None = automatic.

    Returns:
        DevicePlan: ``cuda:local_rank`` + nccl + GPU initialization + pinned copies + bf16 on a CUDA
        machine; ``cpu`` + gloo + CPU initialization + fp32 otherwise.

    Raises:
        ValueError: ``device`` asks for CUDA on a machine without it or is not cpu / cuda, or ``local_rank``
            is negative (nbp_common.device.choose_torch_device).
    """
    chosen = choose_torch_device(device, local_rank, cuda_available)
    cuda = chosen.type == "cuda"
    return DevicePlan(device=chosen, distributed_backend=distributed_backend(chosen), use_cpu_initialization=not cuda,
                      pin_memory=cuda, default_precision="bf16" if cuda else "fp32")


def activate(plan: DevicePlan) -> None:
    """Make ``plan.device`` this process's current CUDA device (``torch.cuda.set_device``); no-op on CPU.
    Call once, before the process group and any CUDA allocation (megatron-core allocates on
    ``torch.cuda.current_device()``)."""
    if plan.is_cuda:
        torch.cuda.set_device(plan.device)


def to_device(tensor: torch.Tensor | None, plan: DevicePlan) -> torch.Tensor | None:
    """One host tensor onto ``plan.device``: pinned + ``non_blocking`` on CUDA (the copy overlaps the
    work already queued on the GPU), unchanged on CPU. None passes through."""
    if tensor is None or tensor.device == plan.device:
        return tensor
    if plan.pin_memory and tensor.device.type == "cpu":
        return tensor.pin_memory().to(plan.device, non_blocking=True)
    return tensor.to(plan.device, non_blocking=plan.pin_memory)


def move_batch(batch, plan: DevicePlan):
    """Every tensor field of a dataclass batch (e.g. :class:`megatron_nbp.layouts.LayoutBatch`) moved by
    :func:`to_device`; returns a new instance of the same class, the input is unchanged."""
    return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), plan)
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})
