"""Run megatron-core 0.16.1 on CPU-only machines (gloo), and nowhere else.

megatron-core 0.16.1 assumes CUDA in four ways (found by running it on CPU with gloo):

1. ``torch.cuda.current_device()`` used as a device (p2p receive buffers, DDP grad buffers, ...);
2. ``torch.cuda.synchronize()`` after every pipeline transfer;
3. the model-parallel RNG tracker stores and swaps *CUDA* generator states;
4. literal ``device="cuda"`` factory calls (schedules, optimizer, grad clipping, the fp16 loss
   scaler), ``tensor.type() == 'torch.cuda.FloatTensor'`` checks in grad clipping and in the
   constructors of the mixed-precision and distributed optimizers (which sort parameters into
   fp32 / fp16 / bf16 by their CUDA type name), and ``tensor.cuda()`` (e.g. the tied-embedding
   all-reduce between first and last pipeline stage).

:func:`apply_cpu_adapter` patches exactly those places, and only when ``torch.cuda.is_available()``
is False: on a GPU machine it returns without touching anything, so GPU behaviour is never changed.
Nothing else in the project knows these patches exist; entry points call
:func:`megatron_nbp.parallel.initialize_parallel`, which calls this first.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any, Callable

import torch

_APPLIED = False

# megatron-core modules that build tensors with a literal device="cuda".
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex/TE)
    "megatron.core.optimizer.grad_scaler",  # fp16 loss scale tensors
)
_FACTORY_FUNCTIONS = ("zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_factory(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside one megatron-core module: factory calls asking for a CUDA
    device get the CPU; every other attribute is the real ``torch``."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORY_FUNCTIONS:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Model-parallel RNG tracker over the CPU default generator.

    Same contract as ``megatron.core.tensor_parallel.random.CudaRNGStatesTracker`` (``add``, ``fork``,
    ``get_states``, ``set_states``, ``reset``): inside ``fork(name)`` random ops (dropout in
    tensor-parallel regions) draw from the named stream, outside it from the default stream.
    States are ``torch.ByteTensor`` generator states, so they checkpoint like the CUDA ones.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (whose
    ``grad.type() == 'torch.cuda.FloatTensor'`` assertion cannot hold on CPU). Same arithmetic:
    grads *= max_norm / (total_norm + 1e-6) when that factor is below 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _cuda_type_name(tensor: torch.Tensor, *args, **kwargs):
    """``Tensor.type()`` as megatron's optimizers expect it: with no argument, a CPU tensor reports the
    CUDA type name of its dtype ('torch.cuda.BFloat16Tensor'); with an argument it converts as usual."""
    if args or kwargs or tensor.device.type != "cpu":
        return _TENSOR_TYPE(tensor, *args, **kwargs)
    return _TENSOR_TYPE(tensor).replace("torch.", "torch.cuda.", 1)


_TENSOR_TYPE = torch.Tensor.type


def _with_cuda_type_names(cls: type) -> None:
    """Run ``cls.__init__`` with :func:`_cuda_type_name` as ``Tensor.type`` (restored afterwards)."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        torch.Tensor.type = _cuda_type_name
        try:
            init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__


def apply_cpu_adapter() -> bool:
    """Patch megatron-core for CPU execution if (and only if) CUDA is unavailable.

    Idempotent. Must run before the model, optimizer or pipeline schedule is built.

    Returns:
        True if the patches are active (CPU machine), False on a CUDA machine (nothing changed).
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # 1 + 2: CUDA device queries and synchronisation.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # On a CPU-only torch, Tensor.cuda() can only raise; here it keeps the tensor where it is.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    # 3: the model-parallel RNG tracker.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.initialize_rng_tracker = lambda *args, **kwargs: None
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    # 4: literal device="cuda" factories, and the CUDA-typed grad clipping.
    cpu_torch = _CpuTorch()
    for module_name in _MODULES_WITH_CUDA_LITERALS:
        importlib.import_module(module_name).torch = cpu_torch
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _with_cuda_type_names(optimizer.Float16OptimizerWithFloat16Params)
    _with_cuda_type_names(DistributedOptimizer)

    _APPLIED = True
    return True
