"""Tokenizer checkpoints: one safetensors file, config JSON in its metadata, no pickle.

Format (``FORMAT_NAME`` / ``FORMAT_VERSION`` below)::

    tensors:   the VideoTokenizer state_dict (float32, names as in ``model.state_dict()``)
    metadata:  {"megatron_nbp_tokenizer": JSON text of
                  {"format": "megatron-nbp-video-tokenizer", "format_version": 1,
                   "config": TokenizerConfig.to_dict(), "codebook_size": 64000,
                   "extra": extra_metadata}}

All metadata sits under ONE key as key-sorted JSON: safetensors stores its metadata in a hash map with
an unspecified order, so several keys would make two saves of the same model differ byte-wise. With one
key the file bytes (and :func:`tokenizer_sha256`) depend only on the weights and the metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import TokenizerConfig
from .model import VideoTokenizer

__all__ = ["save_tokenizer", "load_tokenizer", "read_tokenizer_metadata", "tokenizer_sha256", "FORMAT_NAME"]

FORMAT_NAME = "megatron-nbp-video-tokenizer"
FORMAT_VERSION = 1
METADATA_KEY = "megatron_nbp_tokenizer"


def _unwrap(model: torch.nn.Module) -> VideoTokenizer:
    """Return the VideoTokenizer inside a DDP / DataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, VideoTokenizer):
        raise TypeError(f"expected a VideoTokenizer (optionally DDP-wrapped), got {type(model).__name__}")
    return inner


def save_tokenizer(
    model: torch.nn.Module, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (a VideoTokenizer, possibly DDP-wrapped) to one safetensors file, atomically.

    The file is written under a temporary name in the same directory and ``os.replace``-d into place,
    so ``path`` is either the old file or the complete new one. Tensors are saved as contiguous CPU
    copies in their current dtype (float32 for trained models).

    Args:
        model: the tokenizer.
        path: destination file (parent directories are created).
        extra_metadata: optional JSON-serializable dict with string keys, stored under ``"extra"``.

    Returns:
        ``Path(path)``.

    Raises:
        TypeError: ``model`` is not a VideoTokenizer.
        ValueError: ``extra_metadata`` has non-string keys or is not JSON-serializable.
    """
    tokenizer = _unwrap(model)
    extra = dict(extra_metadata or {})
    if any(not isinstance(key, str) for key in extra):
        raise ValueError(f"extra_metadata keys must be strings, got {sorted(map(repr, extra))}")
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": tokenizer.config.to_dict(),
        "codebook_size": tokenizer.codebook_size,
        "extra": extra,
    }
    try:
        metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    except TypeError as exc:
        raise ValueError(f"extra_metadata must be JSON-serializable: {exc}") from exc
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tokenizer.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read the metadata of a tokenizer checkpoint without loading tensors.

    Returns:
        ``{"format", "format_version", "config" (dict), "codebook_size", "extra" (dict)}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or not a megatron-nbp tokenizer checkpoint (or a newer version).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a safetensors file: {exc}") from exc
    try:
        header = json.loads(raw[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a megatron-nbp tokenizer checkpoint (no {METADATA_KEY!r} metadata with "
            f"format {FORMAT_NAME!r}; metadata keys: {sorted(raw)})"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported tokenizer format_version {header.get('format_version')!r}")
    return header


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> VideoTokenizer:
    """Build a :class:`VideoTokenizer` from a checkpoint written by :func:`save_tokenizer`.

    Args:
        path: the safetensors file.
        device: where to place the model.

    Returns:
        The model in eval mode on ``device`` (all weights loaded strictly).

    Raises:
        FileNotFoundError: no such file.
        ValueError: foreign / corrupt file, invalid config, or tensors that do not match the config.
    """
    metadata = read_tokenizer_metadata(path)
    try:
        config = TokenizerConfig.from_dict(metadata["config"])
    except KeyError as exc:
        raise ValueError(f"{path}: missing or unreadable config in metadata: {exc}") from exc
    model = VideoTokenizer(config)
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():
            state[name] = handle.get_tensor(name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the stored config: {exc}") from exc
    return model.to(device).eval()


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the checkpoint file's bytes (identifies the tokenizer used for a token dataset).

    Raises:
        FileNotFoundError: no such file.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
