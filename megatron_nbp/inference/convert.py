"""Convert a training checkpoint into the single-device inference format
(megatron_nbp.inference.convert_common: ``OUTPUT/model.safetensors`` + ``OUTPUT/config.json`` holding the
trained ModelConfig and provenance).

:func:`convert_checkpoint` takes either backend's checkpoint directory: a megatron dist checkpoint
(``latest_checkpointed_iteration.txt``, any TP/PP) is converted here; a DeepSpeed ZeRO checkpoint (a
``latest`` tag file instead) goes to megatron_nbp.inference.convert_zero. For the former,
megatron-core's dist_checkpointing does the resharding: a TP=1, PP=1 GPTModel is built in one process
and its sharded state dict is loaded from the checkpoint, whatever layout wrote it. Both end in
:func:`megatron_nbp.inference.convert_common.write_inference_checkpoint` (staging directory, fsync,
rename), so a crash never leaves a half-converted model.

Imports: this module -> convert_zero -> convert_common, and this module -> convert_common; convert_zero
never imports this module.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_nbp.checkpointing import (CheckpointError, iteration_dir, read_latest_iteration,
                                        read_weights_from_main_params, verify_checkpoint)
from megatron_nbp.deepspeed_checkpointing import is_deepspeed_checkpoint
from megatron_nbp.inference.convert_common import DEFAULT_MAX_SHARD_SIZE, read_model_config, write_inference_checkpoint
from megatron_nbp.inference.convert_zero import convert_deepspeed_checkpoint

__all__ = ["convert_checkpoint", "convert_megatron_checkpoint", "write_inference_checkpoint"]


def convert_checkpoint(load_dir: str | Path, output_dir: str | Path, iteration: int | None = None,
                       dtype: str | torch.dtype = "fp32", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``output_dir`` (model.safetensors + config.json) from the checkpoint in ``load_dir``, of either
    backend: :func:`convert_megatron_checkpoint`, or for a DeepSpeed checkpoint (a ``latest`` tag file and
    no ``latest_checkpointed_iteration.txt``)
    :func:`megatron_nbp.inference.convert_zero.convert_deepspeed_checkpoint`.

    Args:
        load_dir: training checkpoint directory.
        iteration: which iteration to convert (default: the latest).
        dtype: the weights' dtype, "bf16" | "fp16" | "fp32" (default fp32: the trained fp32 weights unchanged).
        max_shard_size: past this many bytes the weights are sharded with an index file ("5GB", as
            transformers; megatron_nbp.inference.weight_files).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        CheckpointError: as the converter of the checkpoint's kind.
        ValueError: an unknown dtype or a bad shard size.
    """
    if is_deepspeed_checkpoint(load_dir) and read_latest_iteration(load_dir) is None:
        return convert_deepspeed_checkpoint(load_dir, output_dir, iteration, dtype, max_shard_size)
    return convert_megatron_checkpoint(load_dir, output_dir, iteration, dtype, max_shard_size)


def convert_megatron_checkpoint(load_dir: str | Path, output_dir: str | Path, iteration: int | None = None,
                                dtype: str | torch.dtype = "fp32",
                                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``output_dir`` (model.safetensors + config.json) from the megatron dist checkpoint in ``load_dir``.

    Args:
        load_dir: training checkpoint directory (``latest_checkpointed_iteration.txt`` + ``iter_*``).
        iteration: which ``iter_XXXXXXX`` to convert (default: the latest).
        dtype, max_shard_size: as :func:`convert_checkpoint`.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        CheckpointError: no checkpoint in ``load_dir``, the requested iteration is missing or damaged, its
            model config does not fit this version, or a pickled item in it needs more than tensors and
            plain data (refused before it is unpickled).
    """
    from megatron_nbp.model.builder import build_gpt_model
    from megatron_nbp.parallel import destroy_parallel, initialize_parallel

    iteration = iteration if iteration is not None else read_latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {load_dir} (latest_checkpointed_iteration.txt missing)")
    ckpt = iteration_dir(load_dir, iteration)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} does not exist")
    verify_checkpoint(ckpt)  # before torch.distributed.checkpoint unpickles anything
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    model_cfg = read_model_config(common.get("model_config"), ckpt)
    model_cfg.transformer_impl = "local"  # TE checkpoints load into the local spec (same sharded keys)

    initialize_parallel(1, 1, seed=0)
    try:
        model = build_gpt_model(model_cfg, 1, 1)
        request = model.sharded_state_dict()
        read_weights_from_main_params(request, ckpt)  # a bf16 / fp16 run's fp32 main params, where saved
        loaded = dist_checkpointing.load({"model": request}, str(ckpt))
        model.load_state_dict(loaded["model"])
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
                   if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    finally:
        destroy_parallel()
    return write_inference_checkpoint(tensors, model_cfg, output_dir,
                                      {"source_checkpoint": str(ckpt), "iteration": iteration}, dtype, max_shard_size)
