"""The token shard format: the ONE place that writes and reads tokenized-video shards.

Layout of a tokenized dataset directory::

    shard-000000.tar    WebDataset tar; per sample: <key>.tokens.npy and <key>.json
    shard-000000.json   sidecar {"num_samples", "keys", "offsets", "failures"}; written last = "shard finished"
    ...
    failures.jsonl      one {"path", "reason"} JSON object per line: input files that gave no clip
    manifest.json       dataset description (see :func:`write_manifest`); written last

Per sample:

* ``__key__``: stable unique clip key from :func:`clip_key` (letters, digits, ``_`` and ``-`` only);
* ``tokens.npy``: ``np.save`` bytes of a ``uint16 [T', H', W']`` array of raw FSQ indices (t-major);
* ``json``: UTF-8 JSON ``{"source": str, "clip_start": int, "num_frames": int, "frame_stride": int,
  "fps": float, "label": str | null, "latent_shape": [T', H', W']}``.

Sidecar ``offsets`` (written since the per-rank reader; older shards lack it): ``num_samples + 1`` byte
offsets into the tar, entry ``i`` where sample ``i``'s first tar header starts, the last one where the
end-of-archive blocks start; a reader seeks to ``offsets[i]`` to read samples ``i..`` without reading the
ones before (:func:`iter_shard_readable` with ``start``). The manifest's shard entries carry ``bytes``
(the tar's size), so a truncated shard is noticed from its size alone (:func:`complete_samples`).

Readers: :func:`iter_shard` is strict (any damage raises ShardFormatError, for tools and tests);
:func:`iter_shard_readable` is the fault-tolerant one the training loader uses (damage is reported
and skipped, the readable samples are still yielded).

Every file is written under a temporary name and ``os.replace``-d into place, so a crash leaves
either the previous state or the finished file, never a half file under the final name.
Nothing here ever unpickles: ``.npy`` payloads are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from nbp_common.files import atomic_output, atomic_write_bytes

SHARD_FORMAT = "megatron-nbp-tokens/1"
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
SAMPLE_META_KEYS = ("source", "clip_start", "num_frames", "frame_stride", "fps", "label", "latent_shape")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")

#: an ``open``-like callable ``(path, mode) -> binary file``; readers take one so a benchmark can count bytes
Opener = Callable[[Any, str], IO[bytes]]


class ShardFormatError(ValueError):
    """A shard, sidecar, sample or manifest does not follow the format (message names the file)."""


def shard_name(index: int) -> str:
    """File name of shard ``index`` (>= 0): ``shard-{index:06d}.tar``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"shard-{index:06d}.tar"


def sidecar_path(shard_path: str | os.PathLike) -> Path:
    """Path of the sidecar JSON of a shard: ``shard-000007.tar`` -> ``shard-000007.json``."""
    return Path(shard_path).with_suffix(".json")


def clip_key(relative_path: str, clip_start: int) -> str:
    """Stable unique sample key of the clip starting at frame ``clip_start`` of a video.

    ``<sanitized relative path>-<8 hex of sha1(relative path)>__c<clip_start:06d>``; the hash keeps
    keys unique when sanitizing maps two paths to the same text (``a/b.mp4`` and ``a_b.mp4``).

    Args:
        relative_path: the video's path relative to the input root, POSIX form.
        clip_start: index of the clip's first frame (>= 0).
    Raises:
        ValueError: empty path or negative ``clip_start``.
    """
    if not relative_path or clip_start < 0:
        raise ValueError(f"need a non-empty path and clip_start >= 0, got {relative_path!r}, {clip_start}")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative_path).strip("_") or "video"
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{digest}__c{clip_start:06d}"


def _json_default(obj: Any) -> Any:
    """JSON fallback: sets (and frozensets) become sorted lists; anything else is a TypeError."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _json_bytes(obj: Any) -> bytes:
    """UTF-8 JSON encoding (NaN/Infinity rejected, so readers in any language can parse it; sets are
    written as sorted lists)."""
    return json.dumps(obj, indent=1, allow_nan=False, default=_json_default).encode("utf-8")


def _check_sample(key: str, tokens: np.ndarray, meta: dict) -> None:
    """Raise ShardFormatError unless ``(key, tokens, meta)`` is a valid sample."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ShardFormatError(f"sample key must be non-empty [A-Za-z0-9_-]+ (no dots), got {key!r}")
    if not isinstance(tokens, np.ndarray) or tokens.dtype != np.uint16 or tokens.ndim != 3:
        got = f"{getattr(tokens, 'dtype', type(tokens).__name__)} {getattr(tokens, 'shape', '')}"
        raise ShardFormatError(f"sample {key}: tokens must be a uint16 array [T', H', W'], got {got}")
    if not isinstance(meta, dict) or any(k not in meta for k in SAMPLE_META_KEYS):
        missing = [k for k in SAMPLE_META_KEYS if not isinstance(meta, dict) or k not in meta]
        raise ShardFormatError(f"sample {key}: meta is missing {missing}")
    if list(meta["latent_shape"]) != list(tokens.shape):
        raise ShardFormatError(f"sample {key}: meta latent_shape {meta['latent_shape']} != tokens shape {tokens.shape}")


def write_shard(
    path: str | os.PathLike,
    samples: Iterable[tuple[str, np.ndarray, dict]],
    failures: Iterable[dict] = (),
    extra: dict | None = None,
) -> int:
    """Write one shard and then its sidecar, both atomically (the sidecar marks the shard finished).

    An existing sidecar is removed first, so an interrupted rewrite is never mistaken for finished.

    Args:
        path: destination ``shard-XXXXXX.tar``.
        samples: ``(key, tokens uint16 [T', H', W'], meta dict)`` triples; consumed lazily.
        failures: ``{"path": str, "reason": str}`` records (videos skipped while building this shard),
            stored in the sidecar so a rerun keeps them. Read only after ``samples`` is exhausted, so
            a list that the ``samples`` generator appends to is fine.
        extra: more JSON-serialisable sidecar fields (e.g. the settings that produced the shard);
            must not use the names ``num_samples``, ``keys`` or ``failures``. Serialised after
            ``samples`` is exhausted (a set the generator fills is fine; sets become sorted lists).
    Returns:
        Number of samples written.
    Raises:
        ShardFormatError: an invalid or duplicate key, tokens that are not ``uint16 [T', H', W']``,
            or meta missing a required field. Nothing is left under the final name in that case.
    """
    path = Path(path)
    extra = dict(extra or {})
    if {"num_samples", "keys", "offsets", "failures"} & set(extra):
        raise ValueError(f"extra sidecar fields may not override num_samples/keys/offsets/failures: {sorted(extra)}")
    sidecar_path(path).unlink(missing_ok=True)
    keys: list[str] = []
    seen: set[str] = set()
    offsets: list[int] = []
    with atomic_output(path, tmp=path.with_name(path.name + ".tmp")) as tmp, open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as writer:
            for key, tokens, meta in samples:
                _check_sample(key, tokens, meta)
                if key in seen:
                    raise ShardFormatError(f"{path}: duplicate sample key {key!r}")
                buf = io.BytesIO()
                np.save(buf, tokens, allow_pickle=False)
                offsets.append(writer.tarstream.offset)  # tarfile's position in the archive: this header
                writer.write({"__key__": key, "tokens.npy": buf.getvalue(), "json": _json_bytes(meta)})
                keys.append(key)
                seen.add(key)
            offsets.append(writer.tarstream.offset)  # end of the last sample
    failures = [{"path": str(x["path"]), "reason": str(x["reason"])} for x in failures]
    atomic_write_bytes(sidecar_path(path), _json_bytes(
        {**extra, "num_samples": len(keys), "keys": keys, "offsets": offsets, "failures": failures}))
    return len(keys)


def read_sidecar(shard_path: str | os.PathLike, opener: Opener = open) -> dict | None:
    """Sidecar of a shard, or ``None`` if the shard is not finished (no sidecar).

    Args:
        opener: ``open``-like callable used to read the file (benchmarks count bytes through it).
    Returns:
        ``{"num_samples": int, "keys": [str], "failures": [{"path", "reason"}], "offsets": [int] (absent
        in shards written before it existed), ...extra fields}``.
    Raises:
        ShardFormatError: the sidecar exists but is not valid JSON of that form (``offsets``, when
            present, must be ``num_samples + 1`` non-decreasing ints).
    """
    side = sidecar_path(shard_path)
    if not side.is_file():
        return None
    try:
        with opener(side, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{side}: sidecar is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or data.get("num_samples") != len(data["keys"]):
        raise ShardFormatError(f"{side}: sidecar needs 'keys' (list) and a matching 'num_samples'")
    offsets = data.get("offsets")
    if offsets is not None and not (isinstance(offsets, list) and len(offsets) == len(data["keys"]) + 1
                                    and all(isinstance(o, int) for o in offsets)
                                    and all(a <= b for a, b in zip(offsets, offsets[1:]))):
        raise ShardFormatError(f"{side}: sidecar 'offsets' must be num_samples + 1 non-decreasing byte offsets")
    data.setdefault("failures", [])
    return data


def manifest_entry(shard_path: str | os.PathLike, num_samples: int) -> dict:
    """The manifest's entry for a finished shard: ``{"name", "num_samples", "bytes"}``, ``bytes`` the
    tar's size now (readers compare it with the file's size to notice a truncated shard without reading it)."""
    path = Path(shard_path)
    return {"name": path.name, "num_samples": int(num_samples), "bytes": path.stat().st_size}


def complete_samples(offsets: list[int], size: int) -> int:
    """How many leading samples of a shard lie wholly within its first ``size`` bytes (a truncated
    shard keeps those): the largest ``n`` with ``offsets[n] <= size``, ``offsets`` from the sidecar."""
    n = 0
    while n + 1 < len(offsets) and offsets[n + 1] <= size:
        n += 1
    return n


def _decode_sample(shard: Path, sample: dict) -> tuple[str, np.ndarray, dict]:
    """Turn a raw WebDataset sample (bytes per extension) into ``(key, tokens, meta)``."""
    key = sample.get("__key__")
    if "tokens.npy" not in sample or "json" not in sample:
        raise ShardFormatError(f"{shard}: sample {key!r} lacks tokens.npy or json (has {sorted(sample)})")
    try:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        meta = json.loads(sample["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ShardFormatError(f"{shard}: sample {key!r} cannot be decoded: {exc}") from exc
    _check_sample(key, tokens, meta)
    return key, tokens, meta


def iter_shard(path: str | os.PathLike, verify: bool = True) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield every sample of ONE shard, in stored order.

    No rank or worker splitting happens here (``nodesplitter=None``, ``workersplitter=None``): under
    torchrun (``RANK``/``WORLD_SIZE`` set) or in a DataLoader worker the caller gets ALL samples of the
    shard; assigning shards to data-parallel ranks/workers is the caller's job.

    Args:
        path: a ``shard-XXXXXX.tar``.
        verify: if the sidecar exists, check that the yielded keys equal its ``keys`` (catches a tar
            truncated exactly at a member boundary, which tar itself cannot detect).
    Yields:
        ``(key, tokens uint16 [T', H', W'], meta dict)``.
    Raises:
        FileNotFoundError: the shard does not exist.
        ShardFormatError: the tar is truncated or corrupt, a sample is malformed, or (``verify``)
            the samples disagree with the sidecar; the message names the shard.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    expected = read_sidecar(path)["keys"] if verify and sidecar_path(path).is_file() else None
    dataset = wds.WebDataset(
        str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    seen: list[str] = []
    try:
        for sample in dataset:
            key, tokens, meta = _decode_sample(path, sample)
            if expected is not None and (len(seen) >= len(expected) or expected[len(seen)] != key):
                raise ShardFormatError(f"{path}: sample {key!r} at position {len(seen)} disagrees with the sidecar")
            seen.append(key)
            yield key, tokens, meta
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, ShardFormatError):
            raise
        raise ShardFormatError(f"{path}: truncated or corrupt shard: {exc}") from exc
    if expected is not None and len(seen) != len(expected):
        raise ShardFormatError(f"{path}: truncated shard: {len(seen)} samples, sidecar lists {len(expected)}")


_SKIP_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members it never groups


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    """``dir/key.tokens.npy`` -> (``dir/key``, ``tokens.npy``), as webdataset groups tar members."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


class _Window:
    """Read-only view of ``length`` bytes of a binary file from its current position (a reader past
    the end sees end-of-file: tarfile takes that as the archive's end)."""

    def __init__(self, f: IO[bytes], length: int) -> None:
        self._f, self._left = f, max(length, 0)

    def read(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._f.read(size)
        self._left -= len(data)
        return data


def iter_shard_readable(path: str | os.PathLike, problems: list[str], verify: bool = True, start: int = 0,
                        stop: int | None = None, opener: Opener = open,
                        sidecar: dict | None = None) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield the readable samples of ONE shard (or of its sample positions ``[start, stop)``) in stored
    order, skipping damage instead of raising.

    The fault-tolerant twin of :func:`iter_shard` (same member grouping and sample decoding, no rank
    splitting), used by the training loader so that a damaged shard never stops a run and never costs
    the good samples it still holds:

    * a missing file, or one that does not open as tar (corrupt first header, empty file): nothing;
    * a sample that does not decode or is malformed (bad ``.npy``/JSON, a member missing, a duplicate
      key, or (``verify``) a key the sidecar does not list): that sample is skipped, reading goes on
      with the next one (the tar structure around it is intact);
    * a tar that breaks off (truncated inside a member, a corrupt header, a file cut at a member
      boundary, which tar reads as a clean end): the complete samples before the break are yielded,
      the rest of the file is skipped.

    Every skip appends one message naming the shard to ``problems``; a shard that ends early also gets
    "ends after n of the sidecar's m samples". The result depends only on the file's bytes, so every
    reader of the same file (every data-parallel rank) gets the same samples and messages.

    A sample range is read by seeking to the sidecar's ``offsets[start]`` and reading no further than
    ``offsets[stop]``, so only its own bytes (plus the sidecar) are read; a shard whose sidecar has no
    offsets (written before them) is read from its start and the first ``start`` samples are passed
    over unchecked.

    Args:
        path: a ``shard-XXXXXX.tar``.
        problems: list the messages are appended to (left as is when the shard is intact).
        verify: use the sidecar (if present) to refuse keys it does not list (for a range: keys outside
            the range) and to notice a tar that ends early at a member boundary; an unreadable sidecar
            is a problem, not an error.
        start, stop: sample positions to read (``stop`` None: to the end of the shard).
        opener: ``open``-like callable for the shard and its sidecar (benchmarks count bytes with it).
        sidecar: the shard's sidecar if the caller has already read it (:func:`read_sidecar`).
    Yields:
        ``(key, tokens uint16 [T', H', W'], meta dict)`` for each readable, valid sample in the range.
    Raises:
        Nothing for damaged data (not ShardFormatError, not OSError).
    """
    path = Path(path)
    side = sidecar
    if side is None and (verify or start or stop is not None):
        try:
            side = read_sidecar(path, opener)
        except (ShardFormatError, OSError) as exc:
            problems.append(f"{path}: sidecar unreadable, samples not checked against it: {exc}")
    expected: list[str] | None = side["keys"] if verify and side is not None else None
    offsets: list[int] | None = side.get("offsets") if side is not None else None
    if stop is None and expected is not None:
        stop = len(expected)
    allowed = set(expected[start:stop]) if expected is not None else None
    seen: set[str] = set()

    def check(group: dict, quiet: bool = False) -> tuple[str, np.ndarray, dict] | None:
        """The decoded sample of a group of members, or None (problem recorded unless ``quiet``)."""
        if group.get("__bad__") or group["__pos__"] < start:
            return None
        try:
            key, tokens, meta = _decode_sample(path, group)
        except Exception as exc:  # any failure to decode one sample is damage of that sample
            if not quiet:
                problems.append(str(exc) if isinstance(exc, ShardFormatError) else
                                f"{path}: sample {group['__key__']!r} cannot be decoded: {type(exc).__name__}: {exc}")
            return None
        if allowed is not None and key not in allowed:
            problems.append(f"{path}: sample {key!r} is not listed in the sidecar"
                            + (f" at positions {start}..{stop - 1}" if start or stop != len(expected) else "")
                            + "; skipped")
            return None
        if key in seen:
            problems.append(f"{path}: duplicate sample key {key!r}; the repeat is skipped")
            return None
        seen.add(key)
        return key, tokens, meta

    try:
        fileobj = opener(path, "rb")
    except OSError as exc:
        problems.append(f"{path}: shard cannot be opened: {exc}")
        return
    seek = offsets is not None and (start > 0 or stop is not None)
    position = start if seek else 0  # sample position of the next new group
    broke = False
    with fileobj:
        group: dict | None = None
        try:
            source: Any = fileobj
            if seek:
                end = offsets[min(stop, len(offsets) - 1)] if stop is not None else offsets[-1]
                fileobj.seek(offsets[min(start, len(offsets) - 1)])
                source = _Window(fileobj, end - offsets[min(start, len(offsets) - 1)])
            with tarfile.open(fileobj=source, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg() or _SKIP_META_RE.match(info.name):
                        continue
                    prefix, suffix = _split_member_name(info.name)
                    if prefix is None:
                        continue
                    if group is None or prefix != group["__key__"]:
                        sample = check(group) if group is not None else None
                        if sample is not None:
                            yield sample
                        group = None
                        if stop is not None and position >= stop:
                            break
                        group = {"__key__": prefix, "__pos__": position}
                        position += 1
                    data = tar.extractfile(info).read()
                    tar.members = []  # streaming: do not keep every TarInfo
                    suffix = suffix.lower()
                    if suffix in group:
                        problems.append(f"{path}: sample {prefix!r} has two {suffix} members; skipped")
                        group["__bad__"] = True
                    group[suffix] = data
        except Exception as exc:  # tarfile.ReadError, OSError, zlib.error, UnicodeDecodeError, ...
            broke = True
            problems.append(f"{path}: truncated or corrupt tar after {len(seen)} readable samples: "
                            f"{type(exc).__name__}: {exc}")
        if group is not None:
            # After a break the last group holds only fully read members: keep it if it is complete.
            sample = check(group, quiet=broke)
            if sample is not None:
                yield sample
    if expected is not None and not broke and position < stop:
        problems.append(f"{path}: tar ends after {position} of the sidecar's {len(expected)} samples "
                        f"(truncated at a member boundary, or a corrupt tar header)")


def _require(cond: bool, where: Path, what: str) -> None:
    """Raise ShardFormatError(``where: what``) unless ``cond``."""
    if not cond:
        raise ShardFormatError(f"{where}: {what}")


def validate_manifest(manifest: dict, out_dir: str | os.PathLike, require_shards: bool = True) -> None:
    """Check a manifest's structure and (``require_shards``) that every listed shard exists in ``out_dir``.

    Args:
        manifest: the parsed ``manifest.json``.
        out_dir: the dataset directory.
        require_shards: refuse a listed shard that is missing on disk. The training loader passes
            False: it reports and skips missing shards instead (see :func:`iter_shard_readable`).
    Raises:
        ShardFormatError: a missing/ill-typed key, wrong format tag, sample counts that do not add up,
            a malformed shard name, or (``require_shards``) a listed shard missing on disk.
    """
    where = Path(out_dir) / MANIFEST_NAME
    _require(isinstance(manifest, dict), where, "manifest must be a JSON object")
    for k in ("format", "tokenizer", "clip", "shards", "num_samples", "failures"):
        _require(k in manifest, where, f"missing key {k!r}")
    _require(manifest["format"] == SHARD_FORMAT, where, f"format {manifest['format']!r} != {SHARD_FORMAT!r}")
    tok, clip = manifest["tokenizer"], manifest["clip"]
    for k in ("path", "sha256", "levels", "codebook_size", "latent_shape"):
        _require(isinstance(tok, dict) and k in tok, where, f"missing key tokenizer.{k}")
    _require(len(tok["latent_shape"]) == 3, where, "tokenizer.latent_shape must be [T', H', W']")
    for k in ("num_frames", "frame_stride", "resolution"):
        _require(isinstance(clip, dict) and k in clip, where, f"missing key clip.{k}")
    _require(isinstance(manifest["shards"], list), where, "shards must be a list")
    total = 0
    for entry in manifest["shards"]:
        _require(isinstance(entry, dict) and {"name", "num_samples"} <= set(entry), where, f"bad shard entry {entry!r}")
        _require(bool(_SHARD_RE.match(str(entry["name"]))), where, f"bad shard name {entry['name']!r}")
        _require(isinstance(entry.get("bytes", 0), int) and entry.get("bytes", 0) >= 0, where,
                 f"shard {entry['name']}: bytes must be a non-negative int, got {entry.get('bytes')!r}")
        if require_shards:
            _require((Path(out_dir) / entry["name"]).is_file(), where, f"listed shard {entry['name']} does not exist")
        total += int(entry["num_samples"])
    _require(total == manifest["num_samples"], where, f"num_samples {manifest['num_samples']} != sum over shards {total}")
    for f in manifest["failures"]:
        _require(isinstance(f, dict) and {"path", "reason"} <= set(f), where, f"bad failure entry {f!r}")


def write_failures(out_dir: str | os.PathLike, failures: Iterable[dict]) -> Path:
    """Write ``out_dir/failures.jsonl`` atomically: one ``{"path": str, "reason": str}`` per line.

    Returns:
        The file's path (written even when there are no failures: an empty file says "none").
    Raises:
        ShardFormatError: an entry without ``path`` and ``reason``.
    """
    lines = []
    for f in failures:
        if not isinstance(f, dict) or not {"path", "reason"} <= set(f):
            raise ShardFormatError(f"bad failure entry {f!r}: needs 'path' and 'reason'")
        lines.append(json.dumps({"path": str(f["path"]), "reason": str(f["reason"])}, ensure_ascii=False) + "\n")
    path = Path(out_dir) / FAILURES_NAME
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return path


def read_failures(out_dir: str | os.PathLike) -> list[dict]:
    """Read ``out_dir/failures.jsonl`` as a list of ``{"path", "reason"}``.

    Raises:
        FileNotFoundError: the file does not exist (job not finished).
        ShardFormatError: a line that is not such a JSON object.
    """
    path = Path(out_dir) / FAILURES_NAME
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ShardFormatError(f"{path}:{n}: not JSON: {exc}") from exc
        _require(isinstance(entry, dict) and {"path", "reason"} <= set(entry), path, f"line {n}: bad entry {entry!r}")
        out.append(entry)
    return out


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Validate ``manifest`` and write it atomically to ``out_dir/manifest.json``.

    Manifest: ``{"format": "megatron-nbp-tokens/1", "tokenizer": {"path", "sha256", "levels",
    "codebook_size", "latent_shape"}, "clip": {"num_frames", "frame_stride", "resolution": [H, W], ...},
    "shards": [{"name", "num_samples", "bytes"}], "num_samples": int, "failures": [{"path", "reason"}]}``
    (``bytes``, the shard's size from :func:`manifest_entry`, is optional: older manifests lack it);
    the tokenization job also writes ``"media"`` ("video" or "image"), ``"labels"`` (sorted distinct
    clip labels) and the clip sampling settings (``clip.fps``, ``clip_hop``, ``clip_placement``,
    ``max_clips_per_video``); readers must treat these as optional (older manifests lack them).

    Returns:
        The manifest path.
    Raises:
        ShardFormatError: see :func:`validate_manifest`.
    """
    validate_manifest(manifest, out_dir)
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_bytes(path, _json_bytes(manifest))
    return path


def read_manifest(out_dir: str | os.PathLike, require_shards: bool = True, opener: Opener = open) -> dict:
    """Read and validate ``out_dir/manifest.json``.

    Args:
        out_dir: the dataset directory.
        require_shards: refuse the manifest if a listed shard is missing (see :func:`validate_manifest`).
        opener: ``open``-like callable used to read it (benchmarks count bytes through it).
    Raises:
        FileNotFoundError: no manifest in ``out_dir`` (was the tokenization job finished?).
        ShardFormatError: invalid JSON or content (see :func:`validate_manifest`).
    """
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir} (tokenization job not finished?)")
    try:
        with opener(path, "rb") as f:
            manifest = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{path}: not valid JSON: {exc}") from exc
    validate_manifest(manifest, out_dir, require_shards)
    return manifest
