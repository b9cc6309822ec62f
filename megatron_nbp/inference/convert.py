"""Convert a sharded training checkpoint (any TP/PP) into the single-device inference format:

    OUTPUT/model.safetensors   megatron GPTModel TP1PP1 parameter names (no _extra_state)
    OUTPUT/config.json         the trained ModelConfig (model shape + NBP layout) and provenance

megatron-core's dist_checkpointing does the resharding: a TP=1, PP=1 GPTModel is built in one process
and its sharded state dict is loaded from the checkpoint, whatever layout wrote it. The output is
written to a temporary directory and renamed, so a crash never leaves a half-converted model.
A DeepSpeed ZeRO checkpoint (a ``latest`` tag file instead) goes to
megatron_nbp.inference.convert_zero; both end in :func:`write_inference_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_nbp.checkpointing import (CheckpointError, iteration_dir, read_latest_iteration,
                                        read_weights_from_main_params, verify_checkpoint)
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.model import converted_config


def convert_checkpoint(load_dir: str | Path, output_dir: str | Path, iteration: int | None = None) -> Path:
    """Write ``output_dir`` (model.safetensors + config.json) from the checkpoint in ``load_dir``.

    Args:
        load_dir: training checkpoint directory (``latest_checkpointed_iteration.txt`` + ``iter_*``).
        iteration: which ``iter_XXXXXXX`` to convert (default: the latest).

    Returns:
        ``output_dir`` as a Path.

    Raises:
        CheckpointError: no checkpoint in ``load_dir``, the requested iteration is missing or damaged, or a
            pickled item in it needs more than tensors and plain data (refused before it is unpickled).
    """
    from megatron_nbp.deepspeed_checkpointing import is_deepspeed_checkpoint
    from megatron_nbp.model.builder import build_gpt_model
    from megatron_nbp.parallel import destroy_parallel, initialize_parallel

    if is_deepspeed_checkpoint(load_dir) and read_latest_iteration(load_dir) is None:
        from megatron_nbp.inference.convert_zero import convert_deepspeed_checkpoint

        return convert_deepspeed_checkpoint(load_dir, output_dir, iteration)
    iteration = iteration if iteration is not None else read_latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {load_dir} (latest_checkpointed_iteration.txt missing)")
    ckpt = iteration_dir(load_dir, iteration)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} does not exist")
    verify_checkpoint(ckpt)  # before torch.distributed.checkpoint unpickles anything
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    model_cfg = ModelConfig(**common["model_config"])
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
                                      {"source_checkpoint": str(ckpt), "iteration": iteration})


def write_inference_checkpoint(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig,
                               output_dir: str | Path, extra: dict) -> Path:
    """Write the inference format from a TP1 megatron GPTModel state dict (both backends' converters).

    Args:
        tensors: megatron TP1 PP1 parameter names -> tensors (no ``_extra_state``); a tied
            ``output_layer.weight`` is dropped.
        model_cfg: the trained model's config (stored in config.json, read back by
            megatron_nbp.inference.model.load_converted_config).
        extra: provenance stored in config.json (source checkpoint, iteration, ...).

    Returns:
        ``output_dir`` as a Path, written via a temporary directory and a rename.
    """
    from safetensors.torch import save_file

    if model_cfg.share_embeddings_and_output_weights:
        tensors.pop("output_layer.weight", None)
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "megatron-nbp-inference/1"})
    (tmp / "config.json").write_text(json.dumps(converted_config(model_cfg, extra), indent=2))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir
