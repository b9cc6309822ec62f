"""The single-device inference format, and what both checkpoint converters share to produce it.

Format (``FORMAT`` below), one directory::

    OUTPUT/model.safetensors   megatron GPTModel TP1 PP1 parameter names -> tensors (no ``_extra_state``;
                               a tied ``output_layer.weight`` is left out) in the converted dtype,
                               safetensors metadata {"format": FORMAT, "dtype": "bf16" | "fp16" | "fp32"};
                               past ``max_shard_size`` bytes instead numbered shards
                               ``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``
                               (weight_map; megatron_nbp.inference.weight_files)
    OUTPUT/config.json         {"format_version", "model": the trained ModelConfig (every field), "extra":
                               provenance (source checkpoint, iteration, ...), "dtype": the weights' dtype}
                               (megatron_nbp.inference.model.converted_config)

read by :func:`megatron_nbp.inference.model.load_inference_model`. The directory is filled under
``OUTPUT.tmp`` and published by :func:`nbp_common.files.publish_directory` (files fsync-ed, then one
rename), so a crash never leaves a half-converted model under the output name.

Users: megatron_nbp.inference.convert (megatron dist checkpoints) and
megatron_nbp.inference.convert_zero (DeepSpeed ZeRO checkpoints); they import this module, never each
other's code for these pieces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.dtypes import CONFIG_DTYPE_KEY, dtype_name, to_torch_dtype
from megatron_nbp.inference.model import converted_config
from megatron_nbp.inference.weight_files import (DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, WEIGHTS_FILE, parse_size,
                                                 write_weight_files)
from nbp_common.files import publish_directory, staging_path

FORMAT = "megatron-nbp-inference/1"
"""The ``format`` entry of the weight files' metadata."""
CONFIG_FILE = "config.json"
__all__ = ["FORMAT", "WEIGHTS_FILE", "INDEX_FILE", "CONFIG_FILE", "DEFAULT_MAX_SHARD_SIZE", "read_model_config",
           "write_inference_checkpoint"]


def read_model_config(saved: dict[str, Any], where: Any) -> ModelConfig:
    """The trained model's :class:`ModelConfig` from the dict a checkpoint stores (megatron common state
    ``model_config``, DeepSpeed ``nbp_checkpoint.json``'s ``model_config``).

    Raises:
        CheckpointError: ``saved`` is not a dict or does not make a ModelConfig (a setting this version does
            not know, a missing one); the message names the checkpoint ``where``.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {where} stores no model config (found {type(saved).__name__})")
    try:
        return ModelConfig(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {where}: its model config does not fit this version: {err}") from err


def write_inference_checkpoint(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig,
                               output_dir: str | Path, extra: dict, dtype: str | torch.dtype = "fp32",
                               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the inference format (module doc) from a TP1 megatron GPTModel state dict (both converters).

    Args:
        tensors: megatron TP1 PP1 parameter names -> CPU tensors (no ``_extra_state``); a tied
            ``output_layer.weight`` is dropped (from this dict as well).
        model_cfg: the trained model's config (stored whole in config.json, read back by
            megatron_nbp.inference.model.load_converted_config).
        output_dir: the directory to publish; an existing one is replaced as a whole.
        extra: provenance stored in config.json (source checkpoint, iteration, ...).
        dtype: "bf16" | "fp16" | "fp32" (or the torch dtype): every floating tensor is written in it
            (``tensor.to(dtype)``: round to nearest even from fp32) and config.json records it.
        max_shard_size: bytes per weight file (int, or "5GB" / "500MiB"); past it the weights are
            sharded with an index file (megatron_nbp.inference.weight_files).

    Returns:
        ``output_dir`` as a Path, filled under ``OUTPUT.tmp`` and published with
        :func:`nbp_common.files.publish_directory`.

    Raises:
        ValueError: an unknown ``dtype`` or a bad ``max_shard_size`` (before anything is written).
    """
    target = to_torch_dtype(dtype)
    parse_size(max_shard_size)
    if model_cfg.share_embeddings_and_output_weights:
        tensors.pop("output_layer.weight", None)
    cast = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    config = converted_config(model_cfg, extra)
    config[CONFIG_DTYPE_KEY] = dtype_name(target)
    output_dir = Path(output_dir)
    staging = staging_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted conversion to the same output
    staging.mkdir(parents=True)
    write_weight_files(cast, staging, max_shard_size, metadata={"format": FORMAT, "dtype": dtype_name(target)})
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return publish_directory(staging, output_dir)
