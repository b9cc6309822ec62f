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

Resumable *training* checkpoints (``save/iter_XXXXXXX/`` of ``train.py``) are also handled here::

    save/latest_checkpointed_iteration.txt   the published iteration (replaced atomically)
    save/iter_0000100/state.pt               model, optimizers, discriminator, EMA, LeCam (torch.save)
    save/iter_0000100/rng_rank{r}.pt         every rank's data-order generator, torch RNG and LeCam anchors
    save/iter_0000100/manifest.json          format, step, run settings, size + SHA-256 of every file

A checkpoint is filled in ``save/.iter_0000100.tmp/`` (manifest last) and published by
:func:`nbp_common.files.publish_directory` (files fsync-ed, ``os.replace`` of the directory, then of the
latest file), so an interrupted save is never read as latest.
Loading verifies the manifest (missing / truncated / altered files), compares the run settings (model
config, codebook size, latent shape, discriminator, EMA, world size) and reads only with
``torch.load(weights_only=True)``: no pickle of arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nbp_common.files import atomic_output, publish_directory, remove_leftovers, sha256_file, staging_path

from .config import TokenizerConfig
from .model import VideoTokenizer

__all__ = ["save_tokenizer", "load_tokenizer", "read_tokenizer_metadata", "tokenizer_sha256", "FORMAT_NAME",
           "TrainingCheckpointError", "training_iteration_dir", "training_staging_dir",
           "read_latest_training_iteration", "stage_training_checkpoint", "write_training_file", "publish_training_checkpoint",
           "verify_training_checkpoint", "check_training_settings", "load_training_checkpoint"]

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
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
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
    return sha256_file(path)


# ------------------------------------------------------------------------- training checkpoints

TRAIN_LATEST_FILE = "latest_checkpointed_iteration.txt"
TRAIN_MANIFEST = "manifest.json"
TRAIN_FORMAT = "megatron-nbp-tokenizer-training-state"
TRAIN_FORMAT_VERSION = 1


class TrainingCheckpointError(ValueError):
    """A training checkpoint is unreadable, damaged, or was written for other settings than this run's."""


def training_iteration_dir(save_dir: str | os.PathLike, step: int) -> Path:
    """``save_dir/iter_XXXXXXX`` (7 digits, as Megatron-LM)."""
    return Path(save_dir) / f"iter_{step:07d}"


def training_staging_dir(save_dir: str | os.PathLike, step: int) -> Path:
    """``save_dir/.iter_XXXXXXX.tmp``: where a checkpoint is written before it is published."""
    return staging_path(training_iteration_dir(save_dir, step), hidden=True)


def read_latest_training_iteration(save_dir: str | os.PathLike) -> int | None:
    """Iteration named in ``save_dir/latest_checkpointed_iteration.txt``; ``None`` if that file does not exist.

    Only published checkpoints are ever named there: a ``.iter_XXXXXXX.tmp`` left by an interrupted save
    is never returned.

    Raises:
        TrainingCheckpointError: the file does not hold an iteration number, or names a missing directory.
    """
    path = Path(save_dir) / TRAIN_LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise TrainingCheckpointError(f"{path} does not hold an iteration number: {text!r}")
    step = int(text)
    if not training_iteration_dir(save_dir, step).is_dir():
        raise TrainingCheckpointError(
            f"{path} names iteration {step} but {training_iteration_dir(save_dir, step)} is missing")
    return step


def stage_training_checkpoint(save_dir: str | os.PathLike, step: int) -> Path:
    """Create an empty staging directory ``save_dir/.iter_XXXXXXX.tmp`` (one process: rank 0) and return it.

    Staging directories (and latest-file temporaries) left behind by interrupted saves are removed first.
    """
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root, ".iter_*.tmp", TRAIN_LATEST_FILE)
    staging = training_staging_dir(root, step)
    staging.mkdir()
    return staging


def write_training_file(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` and fsync (``obj``: tensors and plain containers, loadable with weights_only)."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def publish_training_checkpoint(save_dir: str | os.PathLike, step: int, settings: Mapping[str, Any]) -> Path:
    """Publish the staged ``.iter_XXXXXXX.tmp`` as ``iter_XXXXXXX`` and mark it latest (one process: rank 0).

    Writes ``manifest.json`` (format, step, ``settings``, size and SHA-256 of every staged file), then
    :func:`nbp_common.files.publish_directory`: every staged file fsync-ed, the directory renamed into place
    (an older directory of the same iteration, e.g. published by a run that died before updating the latest
    file, is moved aside first) and the latest file replaced atomically.

    Returns:
        The published directory.

    Raises:
        FileNotFoundError: nothing is staged for ``step``.
    """
    root = Path(save_dir)
    staging = training_staging_dir(root, step)
    if not staging.is_dir():
        raise FileNotFoundError(f"no staged checkpoint {staging}")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(staging.iterdir()) if p.is_file() and p.name != TRAIN_MANIFEST}
    manifest = {"format": TRAIN_FORMAT, "format_version": TRAIN_FORMAT_VERSION, "step": int(step),
                "settings": dict(settings), "files": files}
    (staging / TRAIN_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return publish_directory(staging, training_iteration_dir(root, step), root / TRAIN_LATEST_FILE, f"{step}\n")


def verify_training_checkpoint(folder: str | os.PathLike, hash_files: tuple[str, ...] | None = None) -> dict | None:
    """Check a published training checkpoint against its ``manifest.json``.

    Every listed file must exist with its recorded size; those in ``hash_files`` (all when ``None``) must
    also have their recorded SHA-256.

    Returns:
        The manifest, or ``None`` for a checkpoint written before manifests existed (no manifest and a
        ``state.pt``).

    Raises:
        TrainingCheckpointError: missing, truncated or altered files, or an unreadable / foreign manifest.
    """
    folder = Path(folder)
    path = folder / TRAIN_MANIFEST
    if not path.is_file():
        if (folder / "state.pt").is_file():
            return None
        raise TrainingCheckpointError(f"checkpoint {folder} is damaged: no {TRAIN_MANIFEST} and no state.pt")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingCheckpointError(f"checkpoint {folder} is damaged: unreadable {TRAIN_MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != TRAIN_FORMAT:
        raise TrainingCheckpointError(f"checkpoint {folder}: {TRAIN_MANIFEST} is not a {TRAIN_FORMAT} manifest")
    if manifest.get("format_version") != TRAIN_FORMAT_VERSION:
        raise TrainingCheckpointError(
            f"checkpoint {folder}: unsupported format_version {manifest.get('format_version')!r}")
    problems = []
    for name, info in sorted(manifest.get("files", {}).items()):
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != info["bytes"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, expected {info['bytes']} (truncated?)")
        elif (hash_files is None or name in hash_files) and sha256_file(file) != info["sha256"]:
            problems.append(f"{name} has another SHA-256 than when it was written")
    if problems:
        raise TrainingCheckpointError(f"checkpoint {folder} is damaged: " + "; ".join(problems))
    return manifest


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def check_training_settings(saved: Mapping[str, Any], current: Mapping[str, Any], where: Any) -> None:
    """Refuse a checkpoint (``where``) whose run settings differ from this run's.

    Settings are nested dicts (e.g. ``{"model": TokenizerConfig.to_dict(), "codebook_size": ...,
    "latent_shape": [...], ...}``); nested keys are compared one by one. A value of ``None`` in ``current``
    means "not used by this run" and is not compared.

    Raises:
        TrainingCheckpointError: naming the checkpoint and every differing setting as
            ``name: checkpoint <value> vs current <value>``.
    """
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    diffs = [f"{key}: checkpoint {saved_flat.get(key, 'absent')} vs current {value}"
             for key, value in current_flat.items() if value is not None and saved_flat.get(key) != value]
    if diffs:
        raise TrainingCheckpointError(f"checkpoint {where} does not match this run: " + "; ".join(diffs))


def load_training_checkpoint(
    save_dir: str | os.PathLike, rank: int, settings: Mapping[str, Any], step: int | None = None
) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """Read the latest published training checkpoint under ``save_dir`` for ``rank`` (or the one of
    ``step``: a distributed run passes the step rank 0 read, so no rank reads a stale latest file).

    The manifest is verified (sizes of all files, SHA-256 of the two read here), the settings are compared
    with :func:`check_training_settings`, then ``state.pt`` and ``rng_rank{rank}.pt`` are read with
    ``torch.load(weights_only=True)``.

    Returns:
        ``(step, state, rng)``, or ``None`` when ``save_dir`` has no latest file.

    Raises:
        TrainingCheckpointError: bad latest file, damaged checkpoint, other settings, unreadable files.
    """
    if step is None:
        step = read_latest_training_iteration(save_dir)
    if step is None:
        return None
    folder = training_iteration_dir(save_dir, step)
    wanted = ("state.pt", f"rng_rank{rank}.pt")
    manifest = verify_training_checkpoint(folder, hash_files=wanted)
    if manifest is not None:
        check_training_settings(manifest.get("settings", {}), settings, folder)
    loaded = []
    for name in wanted:
        try:
            loaded.append(torch.load(folder / name, map_location="cpu", weights_only=True))
        except FileNotFoundError as exc:
            raise TrainingCheckpointError(f"checkpoint {folder} is damaged: {name} is missing") from exc
        except Exception as exc:  # truncated zip, foreign pickle refused by weights_only, ...
            raise TrainingCheckpointError(f"checkpoint {folder} is damaged: cannot read {name}: {exc}") from exc
    state, rng = loaded
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise TrainingCheckpointError(f"checkpoint {folder} is damaged: state.pt is not a tokenizer training state")
    if int(state["step"]) != step:
        raise TrainingCheckpointError(f"checkpoint {folder} holds step {state['step']}, expected {step}")
    return step, state, rng
