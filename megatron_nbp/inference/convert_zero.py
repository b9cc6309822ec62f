"""Convert a DeepSpeed ZeRO checkpoint (any stage, any TP) into the single-device inference format.

1. Per tensor-parallel rank, DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32``) gathers
   the fp32 master weights of that rank's data-parallel partitions into the rank's megatron
   TP-sharded state dict. zero_to_fp32 reads every ``*_optim_states.pt`` of a tag directory, so each
   TP rank gets a view directory that links only its ``mp_rank_XX`` files.
2. :func:`merge_tensor_parallel_shards` joins the TP shards into TP1 tensors following megatron-core's
   own partitioning attributes of a TP1 GPTModel built on the meta device (``tensor_model_parallel``,
   ``partition_dim``, ``partition_stride``: stride 2 is the SwiGLU fc1 [gate; up] interleave).
3. megatron_nbp.inference.convert_common.write_inference_checkpoint writes model.safetensors +
   config.json, exactly as for megatron checkpoints.

megatron_nbp.inference.convert.convert_checkpoint sends DeepSpeed checkpoints here; this module imports
only convert_common of the conversion code.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.deepspeed_checkpointing import read_latest_tag, read_meta, tag_name
from megatron_nbp.device import device_plan
from megatron_nbp.inference.convert_common import (
    DEFAULT_MAX_SHARD_SIZE,
    read_model_config,
    write_inference_checkpoint,
)
from megatron_nbp.safe_loading import UnsafeCheckpointError, verify_torch_files


def join_tensor_parallel(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The TP1 tensor of one tensor-parallel parameter from its shards of TP rank 0, 1, ...: concatenated
    along ``dim``, each shard cut into ``stride`` chunks and the chunks interleaved as megatron's
    ``_initialize_affine_weight_cpu`` splits them (stride 2: SwiGLU fc1, each rank [gate; up] -> all
    gates, then all ups). Shapes: TP-local in, TP1 out (``dim`` grows TP-fold); dtype and device kept."""
    chunks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([c[j] for j in range(stride) for c in chunks], dim)


def merge_tensor_parallel_shards(shards: list[dict[str, torch.Tensor]],
                                 reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Join per-TP-rank state dicts into TP1 tensors.

    Args:
        shards: state dict of TP rank 0, 1, ... (megatron GPTModel names, TP-local shapes).
        reference: a TP1 megatron GPTModel (the meta device is enough) whose parameters carry
            megatron-core's tensor-parallel attributes. Tensor-parallel parameters are concatenated
            along ``partition_dim``, interleaving ``partition_stride`` chunks per rank as megatron's
            ``_initialize_affine_weight_cpu`` splits them; the others are replicated and taken from rank 0.

    Returns:
        TP1 name -> contiguous tensor, for every tensor of ``reference.state_dict()`` but ``_extra_state``.

    Raises:
        CheckpointError: names missing or unexpected in the shards, or a merged shape differs from TP1's.
    """
    expected = {k: v for k, v in reference.state_dict(keep_vars=True).items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    missing = sorted({k for shard in shards for k in expected if k not in shard})
    unexpected = sorted({k for shard in shards for k in shard if k not in expected and not k.endswith("_extra_state")})
    if missing or unexpected:
        raise CheckpointError(f"ZeRO checkpoint does not match the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    merged = {}
    for name, ref in expected.items():
        parts = [shard[name] for shard in shards]
        if len(parts) > 1 and getattr(ref, "tensor_model_parallel", False):
            tensor = join_tensor_parallel(parts, ref.partition_dim, getattr(ref, "partition_stride", 1))
        else:
            tensor = parts[0]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}: merged shape {tuple(tensor.shape)} != TP1 shape {tuple(ref.shape)}")
        merged[name] = tensor.contiguous()
    return merged


def tp_rank_state_dict(ckpt_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """fp32 state dict of one tensor-parallel rank from ZeRO checkpoint directory ``ckpt_dir``
    (all its data-parallel partitions consolidated by DeepSpeed's zero_to_fp32).

    Raises:
        CheckpointError: no files of this TP rank in ``ckpt_dir``, or one references globals beyond tensors
            and plain data (megatron_nbp.safe_loading.verify_torch_files; nothing is unpickled then).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    marker = f"mp_rank_{tp_rank:02d}_"
    files = [f for f in ckpt_dir.iterdir() if marker in f.name and f.name.endswith("_states.pt")]
    if not files:
        raise CheckpointError(f"no files of tensor-parallel rank {tp_rank} ({marker}*) in {ckpt_dir}")
    try:  # zero_to_fp32 reads them with torch.load(weights_only=False)
        verify_torch_files(files)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from err
    with tempfile.TemporaryDirectory() as view:
        (Path(view) / ckpt_dir.name).mkdir()
        for f in files:
            os.symlink(f.resolve(), Path(view) / ckpt_dir.name / f.name)
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints per-file progress
            return get_fp32_state_dict_from_zero_checkpoint(view, tag=ckpt_dir.name)


def convert_deepspeed_checkpoint(load_dir: str | Path, output_dir: str | Path, iteration: int | None = None,
                                 dtype: str | torch.dtype = "fp32",
                                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``output_dir`` (model.safetensors + config.json, megatron TP1 names) from the DeepSpeed
    checkpoint in ``load_dir`` (megatron_nbp.deepspeed_checkpointing layout). One process, no GPU.

    Args:
        iteration: which ``global_stepN`` to convert (default: the one named in ``latest``).
        dtype: the weights' dtype, "bf16" | "fp16" | "fp32" (default fp32: the fp32 master weights).
        max_shard_size: past this many bytes the weights are sharded with an index file.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        CheckpointError: no checkpoint, a missing tag, a model config this version does not know, or
            tensors that do not match the model config.
    """
    from megatron_nbp.model.builder import build_gpt_model
    from megatron_nbp.parallel import destroy_parallel, initialize_parallel

    tag = tag_name(iteration) if iteration is not None else read_latest_tag(load_dir)
    if tag is None:
        raise CheckpointError(f"no DeepSpeed checkpoint in {load_dir} ('latest' missing)")
    meta = read_meta(load_dir, tag)
    ckpt = Path(load_dir) / tag
    model_cfg = read_model_config(meta.get("model_config"), ckpt)
    tp = int(meta["tensor_model_parallel_size"])
    print(f"> consolidating ZeRO-{meta['zero_stage']} checkpoint {ckpt}: {tp} tensor-parallel rank(s) x "
          f"{meta['data_parallel_size']} data-parallel partitions", flush=True)
    shards = [tp_rank_state_dict(ckpt, r) for r in range(tp)]
    initialize_parallel(1, 1, seed=0)
    try:
        # the reference only gives names, shapes and partition dims: on the meta device, and never on a GPU
        # (a CUDA plan would allocate megatron's layers on cuda:0 and then fail to move the meta ones)
        with torch.device("meta"):
            reference = build_gpt_model(model_cfg, 1, 1, plan=device_plan(device="cpu"))
        tensors = merge_tensor_parallel_shards(shards, reference)
    finally:
        destroy_parallel()
    return write_inference_checkpoint(tensors, model_cfg, output_dir,
                                      {"source_checkpoint": str(ckpt), "iteration": meta["iteration"],
                                       "zero_stage": meta["zero_stage"], "tensor_model_parallel_size": tp},
                                      dtype, max_shard_size)
