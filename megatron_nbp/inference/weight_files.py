"""The weight files of a converted model: one ``model.safetensors``, or shards past a size threshold.

Layout (the convention of Hugging Face transformers' ``save_pretrained``, written here independently)::

    model.safetensors                              all tensors, when they fit in one shard
    model-00001-of-00003.safetensors ...           otherwise: tensors in name order, a new shard whenever
                                                   the next tensor would take the current one past the limit
    model.safetensors.index.json                   {"metadata": {"total_size": bytes, ...},
                                                    "weight_map": {tensor name: shard file name}}

A tensor larger than the limit gets a shard of its own. :func:`write_weight_files` writes either form,
:func:`read_weight_files` reads either back. The writer of a whole converted checkpoint is
megatron_nbp.inference.convert_common; the reader megatron_nbp.inference.model.load_inference_model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
"""The default shard limit of ``nbp-convert --max-shard-size`` (as transformers' ``save_pretrained``)."""

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or a string such as ``"5GB"`` (decimal units KB, MB, GB, TB) or
    ``"500MiB"`` (binary units KiB, MiB, GiB, TiB); case-insensitive, a plain number is bytes.

    Raises:
        ValueError: not a positive size in one of those forms (the message quotes it).
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"size {size!r} is not a number of bytes or a number with a unit "
                             f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's data takes in a safetensors file (numel x element size)."""
    return tensor.numel() * tensor.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_size`` bytes (a larger tensor alone),
    in sorted name order so that the grouping does not depend on the dict's order.

    Raises:
        ValueError: a bad ``max_shard_size`` (:func:`parse_size`).
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(tensors):
        size = tensor_bytes(tensors[name])
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_name(index: int, count: int) -> str:
    """``model-00001-of-00003.safetensors`` for index 0 of 3 (1-based, five digits)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_weight_files(tensors: dict[str, torch.Tensor], folder: str | Path, max_shard_size: int | str,
                       metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into ``folder``: one :data:`WEIGHTS_FILE` when they fit in ``max_shard_size``
    bytes, else numbered shards and :data:`INDEX_FILE` (module doc). Each file carries ``metadata``
    (safetensors string metadata); the index holds it too, beside ``total_size``.

    Args:
        tensors: name -> contiguous CPU tensor.
        folder: an existing directory (the caller publishes it).
        max_shard_size: bytes, or a string for :func:`parse_size`.

    Returns:
        The names of the files written, in order (the index last).

    Raises:
        ValueError: a bad ``max_shard_size``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    metadata = dict(metadata or {})
    shards = plan_shards(tensors, max_shard_size)
    if len(shards) == 1:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
        return [WEIGHTS_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = shard_file_name(i, len(shards))
        save_file({k: tensors[k] for k in shard}, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
    index = {"metadata": {**metadata, "total_size": sum(tensor_bytes(t) for t in tensors.values())},
             "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names + [INDEX_FILE]


def weight_file_names(folder: str | Path) -> list[str]:
    """The weight files of ``folder``: the shards named by :data:`INDEX_FILE` when it exists, else
    ``[WEIGHTS_FILE]``.

    Raises:
        FileNotFoundError: neither an index nor :data:`WEIGHTS_FILE`, or a shard the index names is missing.
        ValueError: an index without a ``weight_map`` object.
    """
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map (tensor name -> shard file)")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
        return names
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS_FILE} (or {INDEX_FILE}) not found")
    return [WEIGHTS_FILE]


def read_weight_files(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``folder``'s weight files (:func:`weight_file_names`), loaded onto ``device`` in
    their stored dtype.

    Raises:
        FileNotFoundError / ValueError: as :func:`weight_file_names`.
        RuntimeError: the index's weight_map and the shards' contents disagree.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    names = weight_file_names(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        tensors.update(load_file(str(folder / name), device=str(device)))
    if names != [WEIGHTS_FILE]:
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        if set(weight_map) != set(tensors):
            raise RuntimeError(f"{folder / INDEX_FILE}: weight_map lists {len(weight_map)} tensors, the shards hold "
                               f"{len(tensors)} (differing: {sorted(set(weight_map) ^ set(tensors))[:8]})")
    return tensors


def weight_files_size(folder: str | Path) -> int:
    """Bytes of ``folder``'s weight files together (:func:`weight_file_names`)."""
    return sum((Path(folder) / n).stat().st_size for n in weight_file_names(folder))
