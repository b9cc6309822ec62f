"""nbp_common.files: atomic file writes and the one routine that publishes a directory (checkpoints of
both training backends and of the tokenizer, converted models).

The order of the durable steps is observed by recording every ``os.fsync`` (which path, through
/proc/self/fd) and every ``os.replace`` in one list: each file under the staging directory and the
staging directory itself are flushed before the rename, the parent after it, the pointer's temporary
before it replaces the pointer and the folder after that. tests/faults/test_publish_crash.py crashes real
writers between these steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbp_common import files
from nbp_common.files import (atomic_output, atomic_write_text, publish_directory, remove_leftovers, sha256_file,
                              staging_path)


@pytest.fixture
def journal(monkeypatch):
    """Records ``("fsync", path)`` and ``("replace", src, dst)`` in call order (the real calls still run)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _stage(root: Path, name: str = "iter_0000002") -> tuple[Path, Path]:
    final = root / name
    staging = staging_path(final)
    (staging / "sub").mkdir(parents=True)
    (staging / "a.bin").write_bytes(b"a" * 10)
    (staging / "sub" / "b.bin").write_bytes(b"b" * 3)
    return staging, final


def test_publish_flushes_every_staged_file_then_renames_then_names_it(tmp_path, journal):
    staging, final = _stage(tmp_path)
    pointer = tmp_path / "latest_checkpointed_iteration.txt"
    assert publish_directory(staging, final, pointer, "2") == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert (final / "sub" / "b.bin").read_bytes() == b"bbb" and pointer.read_text() == "2"

    rename = journal.index(("replace", str(staging), str(final)))
    before = {e[1] for e in journal[:rename] if e[0] == "fsync"}
    assert before == {str(staging / "a.bin"), str(staging / "sub" / "b.bin"), str(staging / "sub"), str(staging)}
    # the parent's entry after the rename, the pointer only after that, the folder again after the pointer
    after = journal[rename + 1:]
    assert after[0] == ("fsync", str(tmp_path))
    kinds = [e[0] for e in after[1:]]
    assert kinds == ["fsync", "replace", "fsync"], after
    tmp_pointer = Path(after[1][1])
    assert tmp_pointer.parent == tmp_path and tmp_pointer.name.startswith(".latest_checkpointed_iteration.txt.")
    assert after[2] == ("replace", str(tmp_pointer), str(pointer)) and after[3] == ("fsync", str(tmp_path))
    assert [e for e in journal if e[0] == "replace"] == [journal[rename], after[2]]  # no other rename


def test_publish_moves_an_orphan_aside_before_the_rename_and_deletes_it(tmp_path, journal):
    staging, final = _stage(tmp_path)
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")  # published by a run that died before naming it in the pointer
    publish_directory(staging, final, tmp_path / "latest", "global_step2")
    replaces = [e for e in journal if e[0] == "replace"]
    assert replaces[0][1] == str(final)
    aside = Path(replaces[0][2])
    assert aside.name.startswith("iter_0000002.old.") and aside.name.endswith(".tmp") and not aside.exists()
    assert replaces[1] == ("replace", str(staging), str(final))
    assert sorted(p.name for p in final.iterdir()) == ["a.bin", "sub"]
    assert (tmp_path / "latest").read_text() == "global_step2"


def test_publish_without_a_pointer_and_with_a_hidden_staging_name(tmp_path):
    final = tmp_path / "converted"
    staging = staging_path(final, hidden=True)
    assert staging.name == ".converted.tmp"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    publish_directory(staging, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_publish_refuses_what_it_cannot_rename_atomically(tmp_path):
    final = tmp_path / "out" / "iter_0000001"
    with pytest.raises(FileNotFoundError, match="nothing staged"):
        publish_directory(staging_path(final), final)
    elsewhere = tmp_path / "iter_0000001.tmp"
    elsewhere.mkdir()
    with pytest.raises(ValueError, match="must be named \\*.tmp and sit next to"):
        publish_directory(elsewhere, final)
    wrong_name = tmp_path / "staging"
    wrong_name.mkdir()
    with pytest.raises(ValueError, match="must be named"):
        publish_directory(wrong_name, tmp_path / "iter_0000001")


def test_remove_leftovers_takes_only_what_interrupted_publications_leave(tmp_path):
    for name in ("iter_0000001", "iter_0000003.tmp", "iter_0000002.old.0123abcd.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    (tmp_path / ".latest_checkpointed_iteration.txt.12.0123abcd.tmp").write_text("3")
    (tmp_path / ".other.12.0123abcd.tmp").write_text("not ours")
    remove_leftovers(tmp_path, "iter_*.tmp", "latest_checkpointed_iteration.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.12.0123abcd.tmp", "iter_0000001",
                                                         "latest_checkpointed_iteration.txt"]


def test_atomic_output_leaves_the_old_file_on_an_error_and_flushes_the_folder(tmp_path, journal):
    path = tmp_path / "deep" / "pointer.txt"
    atomic_write_text(path, "1")
    assert path.read_text() == "1" and journal[-1] == ("fsync", str(path.parent))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "1" and sorted(p.name for p in path.parent.iterdir()) == ["pointer.txt"]


def test_sha256_and_fsync_tree(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert sha256_file(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "y").write_bytes(b"")
    os.symlink(tmp_path / "x", tmp_path / "d" / "link")
    assert files.fsync_tree(tmp_path) == 2  # regular files only; the link is not followed
