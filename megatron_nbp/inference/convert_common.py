"""The single-device inference format, and what both checkpoint converters share to produce it.

Format (``FORMAT`` below), one directory::

    OUTPUT/model.safetensors   megatron GPTModel TP1 PP1 parameter names -> tensors (no ``_extra_state``;
                               a tied ``output_layer.weight`` is left out), safetensors metadata
                               {"format": FORMAT}
    OUTPUT/config.json         {"format_version", "model": the trained ModelConfig (every field), "extra":
                               provenance (source checkpoint, iteration, ...)}
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
from megatron_nbp.inference.model import converted_config
from nbp_common.files import publish_directory, staging_path

FORMAT = "megatron-nbp-inference/1"
"""The ``format`` entry of model.safetensors' metadata."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
                               output_dir: str | Path, extra: dict) -> Path:
    """Write the inference format (module doc) from a TP1 megatron GPTModel state dict (both converters).

    Args:
        tensors: megatron TP1 PP1 parameter names -> CPU tensors (no ``_extra_state``); a tied
            ``output_layer.weight`` is dropped (from this dict as well).
        model_cfg: the trained model's config (stored whole in config.json, read back by
            megatron_nbp.inference.model.load_converted_config).
        output_dir: the directory to publish; an existing one is replaced as a whole.
        extra: provenance stored in config.json (source checkpoint, iteration, ...).

    Returns:
        ``output_dir`` as a Path, filled under ``OUTPUT.tmp`` and published with
        :func:`nbp_common.files.publish_directory`.
    """
    from safetensors.torch import save_file

    if model_cfg.share_embeddings_and_output_weights:
        tensors.pop("output_layer.weight", None)
    output_dir = Path(output_dir)
    staging = staging_path(output_dir)
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted conversion to the same output
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
    (staging / CONFIG_FILE).write_text(json.dumps(converted_config(model_cfg, extra), indent=2))
    return publish_directory(staging, output_dir)
