"""Crash-safe files and directories: atomic file writes, one routine publishing a directory, file hashes.

Files. A file is written under a temporary name in its destination folder, flushed to disk (fsync),
``os.replace``-d into place and the folder's entry flushed too, so after a crash at any moment the
destination holds either its old content or the complete new one, never a prefix. Temporary names
start with ``.`` and end in ``.tmp`` (:func:`temp_path`); a crash can leave one behind, which readers
never take for a finished file.

Directories (checkpoints, converted models). A directory is filled under a staging name next to its
final name (:func:`staging_path`) and published by :func:`publish_directory`:

1. every file and folder under the staging directory is fsync-ed;
2. an older directory already under the final name (published by a run that died before naming it in
   its pointer: an orphan) is renamed aside (:func:`aside_path`), then deleted;
3. the staging directory is renamed to the final name, and the parent folder fsync-ed;
4. the pointer file naming the newest directory (``latest_checkpointed_iteration.txt``, DeepSpeed's
   ``latest``), if any, is replaced atomically (temporary file, fsync, ``os.replace``, fsync of the folder).

A crash before step 4 leaves the pointer naming the previous directory; what the crash left (the
staging directory, a directory renamed aside, a temporary of the pointer) is deleted by
:func:`remove_leftovers` before the next save. Every rename goes through ``os.replace`` (looked up on
the ``os`` module at each call), the single place a test can intercept to stop the sequence between
two steps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["temp_path", "fsync_file", "fsync_dir", "fsync_tree", "atomic_output", "atomic_write_bytes",
           "atomic_write_text", "atomic_copy", "sha256_file", "staging_path", "aside_path", "remove_leftovers",
           "publish_directory"]


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so ``os.replace`` is atomic):
    ``.NAME.PID.RANDOM.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk.

    Raises:
        OSError: the file cannot be opened (e.g. it does not exist) or flushed.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened
    or flushed (some platforms and file systems)."""
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


def fsync_tree(root: str | os.PathLike) -> int:
    """Flush every regular file under ``root`` (recursively, symbolic links not followed), then every
    folder from the deepest up to ``root`` itself.

    Returns:
        The number of files flushed.

    Raises:
        OSError: a file cannot be opened or flushed.
    """
    files = 0
    folders = []
    for folder, _, names in os.walk(root):
        folders.append(folder)
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
                files += 1
    for folder in reversed(folders):
        fsync_dir(folder)
    return files


@contextmanager
def atomic_output(path: str | os.PathLike, tmp: str | os.PathLike | None = None,
                  fsync: bool = True) -> Iterator[Path]:
    """Context manager giving a temporary path to write; on normal exit it is fsync-ed, ``os.replace``-d
    onto ``path`` and the folder fsync-ed; on an exception it is removed and ``path`` is left as it was.

    Args:
        path: the destination (its parent folders are created).
        tmp: the temporary name to use (default :func:`temp_path`); must be in ``path``'s folder.
        fsync: flush the data and the folder to disk (turn off only for throw-away files).

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
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_output` (temporary name, fsync, ``os.replace``)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` (encoded with ``encoding``) to ``path`` through :func:`atomic_output`."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks).

    Raises:
        OSError: the file cannot be read (FileNotFoundError when it does not exist).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ publishing directories


def staging_path(final: str | os.PathLike, hidden: bool = False) -> Path:
    """Where a directory published as ``final`` is filled: ``NAME.tmp`` next to it, or ``.NAME.tmp`` with
    ``hidden`` (kept per writer so that the leftovers of older runs keep their names)."""
    final = Path(final)
    return final.with_name(f"{'.' if hidden else ''}{final.name}.tmp")


def aside_path(staging: str | os.PathLike) -> Path:
    """A fresh name for an older directory moved out of the way of a publication from ``staging``:
    ``STAGING_STEM.old.RANDOM.tmp`` (``iter_0000002.tmp`` -> ``iter_0000002.old.1a2b....tmp``), so that
    the glob that finds leftover staging directories finds it as well."""
    staging = Path(staging)
    return staging.with_name(f"{staging.name.removesuffix('.tmp')}.old.{uuid.uuid4().hex}.tmp")


def remove_leftovers(folder: str | os.PathLike, staging_glob: str, pointer: str | None = None) -> None:
    """Delete what interrupted publications left in ``folder`` (one process, before it stages a new
    directory): directories (or files) matching the glob ``staging_glob`` (staging directories and the
    directories renamed aside, see :func:`aside_path`) and temporaries of the ``pointer`` file
    (``.POINTER.*.tmp``, see :func:`temp_path`). Neither is ever read as published; without this they
    would pile up."""
    folder = Path(folder)
    for stale in folder.glob(staging_glob):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if pointer is not None:
        for stale in folder.glob(f".{pointer}.*.tmp"):
            stale.unlink(missing_ok=True)


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike, pointer: str | os.PathLike | None = None,
                      pointer_text: str = "") -> Path:
    """Publish the filled directory ``staging`` as ``final`` and name it in ``pointer`` (module doc, steps
    1-4). One process does this, after every writer of ``staging`` has finished.

    Args:
        staging: the filled directory; its name must end in ``.tmp`` and it must be in ``final``'s folder
            (a rename within one folder is atomic).
        final: the published name. An existing directory or file there is renamed aside, then deleted.
        pointer: the file naming the newest published directory (None: no pointer, e.g. a converted model).
        pointer_text: what ``pointer`` then holds (e.g. ``"120"`` or ``"global_step120"``).

    Returns:
        ``final`` as a Path.

    Raises:
        FileNotFoundError: ``staging`` is not a directory.
        ValueError: ``staging`` is not named ``*.tmp`` or is in another folder than ``final``.
        OSError: a file cannot be flushed or renamed.
    """
    staging, final = Path(staging), Path(final)
    if not staging.is_dir():
        raise FileNotFoundError(f"nothing staged to publish: {staging} is not a directory")
    if not staging.name.endswith(".tmp") or staging.parent.resolve() != final.parent.resolve():
        raise ValueError(f"staging directory {staging} must be named *.tmp and sit next to {final}")
    fsync_tree(staging)
    if os.path.lexists(final):
        old = aside_path(staging)
        os.replace(final, old)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if pointer is not None:
        atomic_write_text(pointer, pointer_text)
    return final
