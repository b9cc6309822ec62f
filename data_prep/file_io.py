"""Crash-safe file writes and file hashing, shared by the data job, the tokenizer and the checkpointers.

A file is written under a temporary name in its destination folder, flushed to disk (fsync) and
``os.replace``-d into place, so after a crash at any moment the destination holds either its old
content or the complete new one, never a prefix. Temporary names start with ``.`` and end in ``.tmp``;
a crash can leave one behind, which readers never take for a finished file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so ``os.replace`` is atomic):
    ``.NAME.PID.RANDOM.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike, tmp: str | os.PathLike | None = None,
                  fsync: bool = True) -> Iterator[Path]:
    """Context manager giving a temporary path to write; on normal exit it is fsync-ed and
    ``os.replace``-d onto ``path``; on an exception it is removed and ``path`` is left as it was.

    Args:
        path: the destination (its parent folders are created).
        tmp: the temporary name to use (default :func:`temp_path`); must be in ``path``'s folder.
        fsync: flush the data to disk before the rename (turn off only for throw-away files).

    Yields:
        the temporary ``Path`` to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else temp_path(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_output` (temporary name, fsync, ``os.replace``)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
