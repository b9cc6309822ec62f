"""The single-device inference format, and what both checkpoint converters share to produce it.

Format (``FORMAT`` below), one directory::

    OUTPUT/model.safetensors   megatron GPTModel TP1 PP1 parameter names -> tensors (no ``_extra_state``;
                               a tied ``output_layer.weight`` is left out), safetensors metadata
                               {"format": FORMAT}
    OUTPUT/config.json         megatron_nbp.inference.model.InferenceConfig: model shape, NBP layout and
                               ``extra`` (provenance: source checkpoint, iteration, ...)

read by :func:`megatron_nbp.inference.model.load_inference_model`. The directory is filled under
``OUTPUT.tmp`` and published by :func:`nbp_common.files.publish_directory` (files fsync-ed, then one
rename), so a crash never leaves a half-converted model under the output name.

Users: megatron_nbp.inference.convert (megatron dist checkpoints) and
megatron_nbp.inference.convert_zero (DeepSpeed ZeRO checkpoints); they import this module, never each
other's code for these pieces.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.model import InferenceConfig
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


def inference_config(model_cfg: ModelConfig, extra: dict[str, Any]) -> InferenceConfig:
    """The ``config.json`` content for a model trained with ``model_cfg``; ``extra``: provenance
    (JSON-serialisable) stored with it."""
    return InferenceConfig(
        num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads, ffn_hidden_size=model_cfg.ffn_hidden_size,
        vocab_size=model_cfg.vocab_size, padded_vocab_size=model_cfg.padded_vocab_size,
        max_seq_length=model_cfg.position_table_size, latent_shape=list(model_cfg.latent_shape),
        block_shape=list(model_cfg.block_shape), layout=model_cfg.layout,
        condition_frames=model_cfg.condition_frames, layernorm_epsilon=model_cfg.layernorm_epsilon,
        condition_labels=model_cfg.condition_labels, video_token_offset=model_cfg.video_token_offset,
        normalization=model_cfg.normalization, activation=model_cfg.activation,
        add_bias_linear=model_cfg.add_bias_linear,
        share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
        condition_type=model_cfg.condition_type, text_vocab_size=model_cfg.text_vocab_size,
        num_condition_tokens=model_cfg.num_prefix_tokens,
        position_embedding_type=model_cfg.position_embedding_type, rotary_base=model_cfg.rotary_base,
        mrope_section=model_cfg.mrope_section, null_condition=model_cfg.null_condition,
        extra=extra,
    )


def write_inference_checkpoint(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig,
                               output_dir: str | Path, extra: dict) -> Path:
    """Write the inference format (module doc) from a TP1 megatron GPTModel state dict (both converters).

    Args:
        tensors: megatron TP1 PP1 parameter names -> CPU tensors (no ``_extra_state``); a tied
            ``output_layer.weight`` is dropped (from this dict as well).
        model_cfg: the trained model's config (becomes config.json's InferenceConfig).
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
    inference_config(model_cfg, extra).save(staging / CONFIG_FILE)
    return publish_directory(staging, output_dir)
