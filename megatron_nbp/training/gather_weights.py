"""The training model's current weights as one single-device model, in memory: what a checkpoint
conversion (megatron_nbp.inference.convert) produces from disk, without the checkpoint.

Every rank holds one tensor-parallel shard of one pipeline stage (replicated over data-parallel ranks).
:func:`gather_full_state_dict` all-gathers the tensor-parallel shards within each TP group (along each
parameter's ``partition_dim``, megatron-core's ``tensor_model_parallel`` attributes), renames each
stage's local layer numbers to global ones (``layer_number - 1``), and collects the stages of data-parallel
rank 0 on one rank with ``torch.distributed.gather_object`` over a gloo group of just those ranks (host
memory, one slot per stage). The result has the TP1 PP1 names and layout of
megatron's GPTModel, which :class:`megatron_nbp.inference.model.NBPDecoder` loads.

SwiGLU's ``linear_fc1`` is the one parameter whose shards do not simply concatenate: each rank holds
[gate shard; up shard], and the whole tensor is [all gate shards; all up shards] (megatron-core's
``apply_swiglu_sharded_factory`` layout, which its checkpoints use too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.convert_zero import join_tensor_parallel

__all__ = ["gather_full_state_dict", "unwrap_module"]


def unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP, ``Float16Module`` or a DeepSpeed engine (each keeps it as
    ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


#: Transformer Engine layer spec -> local spec names: TE fuses each pre-norm into the following linear
#: layer (megatron-core's TE spec maps them back the same way in its sharded state dict)
TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _global_name(model: torch.nn.Module, name: str) -> str:
    """The TP1 PP1 local-spec name of this stage's parameter ``name``: ``decoder.layers.<i>`` gets the
    layer's global index (megatron numbers a stage's layers locally; ``layer_number`` is global and
    1-based), and a Transformer Engine fused norm its local name (:data:`TE_TO_LOCAL`)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        rest = ".".join(parts[3:])
        if rest in TE_TO_LOCAL:
            parts = parts[:3] + TE_TO_LOCAL[rest].split(".")
    return ".".join(parts)


def _gather_tensor_parallel(name: str, param: torch.Tensor, model_cfg: ModelConfig) -> torch.Tensor:
    """The whole (TP1) tensor of a tensor-parallel parameter from the shards of this rank's TP group
    (collective over the TP group); any other parameter is returned as it is."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    dim = int(getattr(param, "partition_dim", 0))
    shards = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(shards, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    swiglu_fc1 = model_cfg.activation == "swiglu" and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"))
    return join_tensor_parallel(shards, dim, 2 if swiglu_fc1 else 1)


def gather_full_state_dict(model: torch.nn.Module, model_cfg: ModelConfig, dst: int) -> dict[str, torch.Tensor] | None:
    """This job's current weights as a TP1 PP1 state dict on global rank ``dst`` (module doc). Collective:
    every rank of the world calls it (with ZeRO-3, inside ``deepspeed.zero.GatheredParameters``, so the
    parameters are whole).

    Args:
        model: this rank's model stage (wrapped or not, see :func:`unwrap_module`).
        model_cfg: the model's config (the SwiGLU layout).
        dst: the global rank that receives the result.

    Returns:
        {TP1 PP1 parameter name: fp32 CPU tensor} on ``dst`` (no tied ``output_layer.weight``: the first
        stage's word embedding is that weight), None elsewhere.
    """
    module = unwrap_module(model)
    keep = (parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0)
    tied = model_cfg.share_embeddings_and_output_weights
    local: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if tied and name == "output_layer.weight":
            continue  # the last stage's copy of the word embedding
        whole = _gather_tensor_parallel(name, param, model_cfg)  # every TP rank takes part
        if keep:
            local[_global_name(module, name)] = whole.to("cpu", torch.float32, copy=True)
    group, members = _holders_group(keep, dst)
    if dist.get_rank() not in members:
        return None
    gathered = [None] * len(members) if dist.get_rank() == dst else None
    dist.gather_object(local, gathered, dst=dst, group=group)
    if dist.get_rank() != dst:
        return None
    state: dict[str, torch.Tensor] = {}
    for part in gathered:
        state.update(part)
    return state


_GROUPS: dict[tuple[int, ...], object] = {}


def _holders_group(keep: bool, dst: int) -> tuple[object, tuple[int, ...]]:
    """(a gloo process group of the ranks that hold a stage's weights plus ``dst``, its global ranks).
    Collective over the world (every rank learns who holds weights; the group is created once per member
    set, as ``new_group`` requires every rank to call it).

    ``gather_object`` over the whole world would pad every rank's pickled object to the largest (a whole
    stage) and, under nccl, stage them on the GPU: world size x stage size on ``dst``'s GPU, tens of GB at
    scale. Within this group only the PP stage holders take part (PP + 1 slots at most), through host memory.
    """
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    flags[dist.get_rank()] = int(keep)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = flags.to(device)
    dist.all_reduce(flags)
    members = tuple(sorted(set(torch.nonzero(flags.cpu()).flatten().tolist()) | {dst}))
    if members not in _GROUPS:
        _GROUPS[members] = dist.new_group(list(members), backend="gloo")
    return _GROUPS[members], members
