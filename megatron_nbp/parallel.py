"""Process groups and seeds: torch.distributed from torchrun's environment, then megatron's
parallel_state. Also the one caller of the CPU adapter."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_nbp.cpu_adapter import apply_cpu_adapter
from megatron_nbp.device import DevicePlan, activate, device_plan
from megatron_nbp.process_utils import free_port
from megatron_nbp.sync_free_grad_norm import use_sync_free_grad_norm


def initialize_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                        seed: int = 1234, timeout_minutes: int = 30) -> DevicePlan:
    """Choose this process's device (:func:`megatron_nbp.device.device_plan`: ``cuda:LOCAL_RANK`` and
    nccl on GPU, the CPU and gloo elsewhere), start torch.distributed and megatron's TP/PP/DP groups;
    seed RNGs. megatron-core's gradient norm becomes sync-free where it would use its local fallback
    (:mod:`megatron_nbp.sync_free_grad_norm`).

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as set by torchrun; a plain
    ``python`` run becomes a world of one (a free local port is used).

    Returns:
        The device plan every later step of the job uses (model, batches, masks).

    Raises:
        ValueError: if WORLD_SIZE is not divisible by TP x PP.
    """
    apply_cpu_adapter()
    use_sync_free_grad_norm()  # without Transformer Engine / apex: no host read per parameter tensor
    plan = device_plan()
    activate(plan)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(
            f"world size {world} not divisible by TP x PP = {tensor_parallel_size} x {pipeline_parallel_size}"
        )
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend=plan.distributed_backend, timeout=timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
        )
    set_seed(seed)
    return plan


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker (Megatron-LM's scheme:
    the same seed on every rank of a stage's data-parallel replicas, offset per pipeline stage)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    """The last rank logs (it holds the loss on the last pipeline stage), as in Megatron-LM."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(*args) -> None:
    """print on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)
