"""Loading training checkpoints without trusting pickle: the one place that decides what may be unpickled.

Both backends' checkpoints hold a few pickled non-tensor objects next to the tensors:

* megatron backend (megatron-core ``torch_dist`` format): ``common.pt`` (iteration, scheduler, model
  config), and "bytes" items inside the ``.distcp`` files: our per-rank RNG states (a ShardedObject)
  and megatron's layer ``_extra_state``, plus the ``.metadata`` index itself. torch.distributed.checkpoint
  reads ``.metadata`` with plain ``pickle.load`` and unpickles the bytes items with
  ``torch.load(weights_only=False)`` (``DefaultLoadPlanner.load_bytes``): either would run any code a
  crafted file carries. :func:`verify_megatron_checkpoint` first unpickles ``.metadata`` with
  :class:`CheckpointMetadataUnpickler` (only torch.distributed.checkpoint's record classes, torch sizes
  and dtypes), then reads every bytes item's byte range and loads it with ``torch.load(weights_only=True)``
  and lists the globals of every tensor item's pickle (torch loads those weights-only itself; the check
  names the file and item first); anything beyond tensors, plain containers and :func:`allowed_globals`
  is refused before megatron or torch touch the files.
* DeepSpeed backend: ``*_model_states.pt`` / ``*_optim_states.pt`` (DeepSpeed's
  ``TorchCheckpointEngine`` reads them with ``weights_only=False``) and our ``rng_state_*.pt``.
  :func:`use_weights_only_loading` makes the engine's checkpoint engine (DeepSpeed's pluggable
  ``checkpoint_engine`` interface) read with ``weights_only=True``, allowing only the three plain
  DeepSpeed record classes its optimizer states contain. :func:`verify_torch_files` scans files for the
  converter, which calls DeepSpeed's ``zero_to_fp32`` (also ``weights_only=False``).

Everything else the project reads is pickle-free: safetensors (inference format, tokenizer), JSON
(manifests, sidecars, checkpoint metadata), ``.npy`` with ``allow_pickle=False`` (token shards), and the
I3D weights through their own restricted unpickler (megatron_nbp.eval.weights).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need unpickling something other than tensors, plain containers and the
    allowed record classes; the message names the file and what it asked for. Nothing was executed."""


def allowed_globals() -> list[Any]:
    """Classes and functions a checkpoint may reference besides torch's weights-only set: the numpy pieces
    of ``np.random.get_state()`` (array reconstruction, ndarray, dtypes) and DeepSpeed's plain optimizer
    records (``fragment_address`` dataclass, ``ZeroStageEnum``, ``LossScaler`` and, in fp16 runs with dynamic loss
    scaling, ``DynamicLossScaler``; when DeepSpeed is installed)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed: list[Any] = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return allowed + [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def safe_torch_load(source: str | os.PathLike | io.BytesIO, map_location: Any = "cpu", what: str | None = None) -> Any:
    """``torch.load(source, weights_only=True)`` with :func:`allowed_globals` allowed.

    Args:
        source: file path or in-memory bytes of a ``torch.save`` payload.
        what: how to name the payload in errors (default: the path).

    Raises:
        UnsafeCheckpointError: the payload references any other global (e.g. ``os.system``); the payload
            is not executed.
    """
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(source, map_location=map_location, weights_only=True)
        except pickle_errors() as err:
            first = str(err).strip().splitlines()
            reason = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line),
                          first[0] if first else type(err).__name__)
            raise UnsafeCheckpointError(
                f"refusing to unpickle {what or source}: it needs more than tensors and plain data ({reason}); "
                "load it only if you trust its origin, with torch.load(weights_only=False) yourself") from err


def pickle_errors() -> tuple[type[BaseException], ...]:
    """The exceptions torch's weights-only unpickler raises for a refused payload."""
    return (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError)


def verify_torch_files(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse ``torch.save`` files that reference globals outside torch's weights-only set and
    :func:`allowed_globals`, by scanning their pickle opcodes (no tensor data is read, nothing is run).

    Raises:
        UnsafeCheckpointError: naming the file and the globals it references.
    """
    allowed = {_qualname(g) for g in allowed_globals()}
    for path in paths:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # not a zip archive torch.save wrote: truncated, or another format
            raise UnsafeCheckpointError(f"cannot inspect {path} before loading it: {err}") from err
        refused = sorted(set(unsafe) - allowed)
        if refused:
            raise UnsafeCheckpointError(f"refusing to load {path}: it references {refused}, which are neither "
                                        "tensors nor plain data")


class CheckpointMetadataUnpickler(pickle.Unpickler):
    """Unpickler for torch.distributed.checkpoint's ``.metadata`` file: it may only name the record classes
    of ``torch.distributed.checkpoint.{metadata,planner,filesystem}``, ``torch.Size``, torch dtypes /
    layouts / memory formats and ``collections.OrderedDict``.

    Raises:
        UnsafeCheckpointError: from ``load()`` at the first other global (before it is called).
    """

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
    _NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NAMES:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module in self._MODULES and "." not in name:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        raise UnsafeCheckpointError(f"refusing to unpickle global {module}.{name} in checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing persistent id {pid!r} in checkpoint metadata")


def read_megatron_metadata(ckpt_dir: str | os.PathLike):
    """The ``.metadata`` index of a megatron-core ``torch_dist`` checkpoint, unpickled with
    :class:`CheckpointMetadataUnpickler` (torch.distributed.checkpoint's ``Metadata``: its
    ``state_dict_metadata`` maps every saved key to its size and dtype).

    Raises:
        UnsafeCheckpointError: the index needs a global outside the allowed set.
        FileNotFoundError: no index.
    """
    path = Path(ckpt_dir) / ".metadata"
    with open(path, "rb") as f:
        try:
            return CheckpointMetadataUnpickler(f).load()
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{path}: {err}") from err


class _FileSlice(io.RawIOBase):
    """Read-only, seekable view of the bytes ``[start, start + length)`` of an open binary file."""

    def __init__(self, handle: Any, start: int, length: int) -> None:
        super().__init__()
        self._handle, self._start, self._length, self._pos = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def readinto(self, buffer) -> int:
        self._handle.seek(self._start + self._pos)
        data = self._handle.read(min(len(buffer), self._length - self._pos))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def verify_megatron_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Check every pickled object of a megatron-core ``torch_dist`` checkpoint directory before megatron
    loads it: ``common.pt``, the ``.metadata`` index (:class:`CheckpointMetadataUnpickler`), each bytes
    item of the ``.distcp`` files (loaded here from its byte range, weights-only) and the pickle of each
    tensor item (its globals listed without reading the tensor data; torch.distributed.checkpoint loads
    tensor items weights-only itself, this check names the file and the item before anything is loaded).

    Raises:
        UnsafeCheckpointError: an item needs a global outside the allowed set (names file and item).
        FileNotFoundError / ValueError: metadata unreadable, or an item stored with a transform (compression)
            this check cannot read; the caller reports the checkpoint as damaged.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "common.pt").is_file():
        verify_torch_files([ckpt_dir / "common.pt"])
    metadata = read_megatron_metadata(ckpt_dir)
    allowed = {_qualname(g) for g in allowed_globals()}
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for relative_path, items in sorted(by_file.items()):
        path = ckpt_dir / relative_path
        with open(path, "rb") as f:
            for index, info in items:
                is_bytes = isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)
                if getattr(info, "transform_descriptors", None):
                    if is_bytes:
                        raise ValueError(f"{path}: item {index.fqn} is stored with transforms "
                                         f"{info.transform_descriptors}; cannot verify it before unpickling")
                    continue  # a transformed tensor item: torch.distributed.checkpoint loads it weights-only
                if is_bytes:
                    f.seek(info.offset)
                    payload = f.read(info.length)
                    if len(payload) != info.length:
                        raise ValueError(f"{path} is truncated (item {index.fqn})")
                    safe_torch_load(io.BytesIO(payload), what=f"{path} item {index.fqn}")
                    continue
                item = _FileSlice(f, info.offset, info.length)
                if item.read(4) != b"PK\x03\x04":  # not a torch.save archive: raw tensor bytes, no pickle
                    continue
                item.seek(0)
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(item)
                except Exception as err:  # a truncated or garbled archive
                    raise ValueError(f"{path}: cannot read item {index.fqn}: {err}") from err
                refused = sorted(set(unsafe) - allowed)
                if refused:
                    raise UnsafeCheckpointError(f"refusing to unpickle {path} item {index.fqn}: it references "
                                                f"{refused}, which are neither tensors nor plain data")


def use_weights_only_loading(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoint files with :func:`safe_torch_load`.

    DeepSpeed reads every model/optimizer state file through ``engine.checkpoint_engine.load(path,
    map_location)`` (its pluggable checkpoint-engine interface; the torch, fast and decoupled engines all
    call ``torch.load(weights_only=False)``). This replaces that one method on this engine's instance;
    saving is untouched. Call it before ``engine.load_checkpoint``.
    """
    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    engine.checkpoint_engine.load = load
