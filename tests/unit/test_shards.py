"""Tests of data_prep.shards: the token shard format (write/read, sidecar, manifest, corruption)."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import numpy as np
import pytest

from data_prep import shards
from data_prep.shards import (
    ShardFormatError,
    clip_key,
    iter_shard,
    read_manifest,
    read_sidecar,
    shard_name,
    write_manifest,
    write_shard,
)


def _samples(n: int, shape=(5, 4, 4), seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rel = f"class_{i % 2}/video {i}.v1.mp4"
        meta = {"source": rel, "clip_start": 17 * i, "num_frames": 17, "frame_stride": 1, "fps": 29.97,
                "label": f"class_{i % 2}" if i else None, "latent_shape": list(shape)}
        out.append((clip_key(rel, 17 * i), rng.integers(0, 64000, size=shape, dtype=np.uint16), meta))
    return out


def _manifest(names_counts: list[tuple[str, int]]) -> dict:
    return {
        "format": shards.SHARD_FORMAT,
        "tokenizer": {"path": "tok.safetensors", "sha256": "ab" * 32, "levels": [8, 8, 8, 5, 5, 5],
                      "codebook_size": 64000, "latent_shape": [5, 4, 4]},
        "clip": {"num_frames": 17, "frame_stride": 1, "resolution": [32, 32]},
        "shards": [{"name": n, "num_samples": c} for n, c in names_counts],
        "num_samples": sum(c for _, c in names_counts),
        "failures": [{"path": "bad.mp4", "reason": "cannot decode"}],
    }


def test_clip_key_stable_unique_and_tar_safe():
    assert clip_key("a/b.mp4", 3) == clip_key("a/b.mp4", 3)
    keys = {clip_key("a/b.mp4", 0), clip_key("a_b.mp4", 0), clip_key("a/b.mp4", 17), clip_key("a.b.mp4", 0)}
    assert len(keys) == 4
    assert all("." not in k and "/" not in k for k in keys)
    assert clip_key("a/b.mp4", 17).endswith("__c000017")


def test_round_trip_under_torchrun_env(tmp_path, monkeypatch):
    # torchrun sets these; a node splitter would then hand this "rank" only part of the shard.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    samples = _samples(7)
    path = tmp_path / shard_name(3)
    assert write_shard(path, iter(samples), failures=[{"path": "x.mp4", "reason": "too short"}]) == 7
    assert path.name == "shard-000003.tar"
    got = list(iter_shard(path))
    assert [k for k, _, _ in got] == [k for k, _, _ in samples]
    for (_, tok_a, meta_a), (_, tok_b, meta_b) in zip(samples, got):
        assert tok_b.dtype == np.uint16 and tok_b.shape == (5, 4, 4)
        np.testing.assert_array_equal(tok_a, tok_b)
        assert meta_a == meta_b
    side = read_sidecar(path)
    assert side["num_samples"] == 7 and side["keys"] == [k for k, _, _ in samples]
    assert side["failures"] == [{"path": "x.mp4", "reason": "too short"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000003.json", "shard-000003.tar"]


def test_tar_members_are_plain_npy_and_json(tmp_path):
    """Other tools (tar, numpy, any JSON reader) can read a shard without this module."""
    samples = _samples(2)
    write_shard(tmp_path / shard_name(0), samples)
    with tarfile.open(tmp_path / shard_name(0)) as tf:
        names = tf.getnames()
        assert names == [f"{samples[0][0]}.json", f"{samples[0][0]}.tokens.npy",
                         f"{samples[1][0]}.json", f"{samples[1][0]}.tokens.npy"]
        arr = np.load(io.BytesIO(tf.extractfile(names[1]).read()), allow_pickle=False)
        np.testing.assert_array_equal(arr, samples[0][1])
        assert json.loads(tf.extractfile(names[0]).read())["source"] == samples[0][2]["source"]


def test_empty_shard_and_extra_sidecar_fields(tmp_path):
    path = tmp_path / shard_name(0)
    assert write_shard(path, [], extra={"videos": ["a.mp4"]}) == 0
    assert list(iter_shard(path)) == []
    assert read_sidecar(path)["videos"] == ["a.mp4"]
    with pytest.raises(ValueError, match="override"):
        write_shard(path, [], extra={"keys": []})


@pytest.mark.parametrize("mutate, match", [
    (lambda s: (s[0].replace("__", ".", 1), s[1], s[2]), "no dots"),
    (lambda s: (s[0], s[1].astype(np.int32), s[2]), "uint16"),
    (lambda s: (s[0], s[1][0], s[2]), "uint16"),
    (lambda s: (s[0], s[1], {k: v for k, v in s[2].items() if k != "fps"}), "fps"),
    (lambda s: (s[0], s[1], {**s[2], "latent_shape": [1, 2, 3]}), "latent_shape"),
])
def test_write_rejects_bad_samples_and_leaves_nothing(tmp_path, mutate, match):
    good = _samples(2)
    path = tmp_path / shard_name(0)
    with pytest.raises(ShardFormatError, match=match):
        write_shard(path, [good[0], mutate(good[1])])
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_duplicate_keys(tmp_path):
    s = _samples(1)[0]
    with pytest.raises(ShardFormatError, match="duplicate"):
        write_shard(tmp_path / shard_name(0), [s, s])
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_previous_shard(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, _samples(3, seed=0))
    new = _samples(2, seed=1)
    write_shard(path, new)
    got = list(iter_shard(path))
    assert len(got) == 2 and all(np.array_equal(a[1], b[1]) for a, b in zip(new, got))


def test_truncated_tar_names_the_shard(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, _samples(6))
    data = path.read_bytes()
    for cut in (len(data) // 3, 700):  # inside a member / inside the first header
        bad = tmp_path / shard_name(1)
        bad.write_bytes(data[:cut])
        with pytest.raises(ShardFormatError, match="shard-000001.tar"):
            list(iter_shard(bad, verify=False))


def test_truncation_at_member_boundary_caught_by_sidecar(tmp_path):
    path = tmp_path / shard_name(0)
    samples = _samples(4)
    write_shard(path, samples)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    # End the file right after sample 2's last member: tar itself sees a clean end of archive.
    end = members[3].offset_data + ((members[3].size + 511) // 512) * 512
    path.write_bytes(path.read_bytes()[:end])
    with pytest.raises(ShardFormatError, match="truncated shard: 2 samples, sidecar lists 4"):
        list(iter_shard(path))


def test_iter_shard_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_shard(tmp_path / shard_name(0)))


def test_manifest_round_trip_and_validation(tmp_path):
    write_shard(tmp_path / shard_name(0), _samples(3))
    write_shard(tmp_path / shard_name(1), _samples(2, seed=1))
    manifest = _manifest([(shard_name(0), 3), (shard_name(1), 2)])
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest

    bad = copy.deepcopy(manifest)
    del bad["tokenizer"]["sha256"]
    with pytest.raises(ShardFormatError, match="tokenizer.sha256"):
        write_manifest(tmp_path, bad)
    bad = copy.deepcopy(manifest)
    bad["num_samples"] = 6
    with pytest.raises(ShardFormatError, match="num_samples"):
        write_manifest(tmp_path, bad)
    with pytest.raises(ShardFormatError, match="does not exist"):
        write_manifest(tmp_path, _manifest([(shard_name(7), 1)]))
    assert read_manifest(tmp_path) == manifest  # failed writes left the good manifest alone

    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(ShardFormatError, match="shard-000001.tar does not exist"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nowhere")


def test_failures_file_round_trip(tmp_path):
    from data_prep.shards import FAILURES_NAME, read_failures, write_failures

    entries = [{"path": "a/ü.mp4", "reason": "cannot decode: x"}, {"path": "b.txt", "reason": "not video media"}]
    write_failures(tmp_path, entries)
    lines = (tmp_path / FAILURES_NAME).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == entries  # one JSON object per line
    assert read_failures(tmp_path) == entries
    write_failures(tmp_path, [])
    assert read_failures(tmp_path) == [] and (tmp_path / FAILURES_NAME).read_bytes() == b""
    with pytest.raises(ShardFormatError):
        write_failures(tmp_path, [{"path": "x"}])


def test_a_sample_range_is_read_by_seeking_with_or_without_sidecar_offsets(tmp_path):
    from data_prep.shards import complete_samples, iter_shard, iter_shard_readable, read_sidecar
    from data_prep.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path, num_clips=9, clips_per_shard=9, latent_shape=(5, 4, 4), vocab=2048)
    path = tmp_path / shard_name(0)
    full = [(k, t.tobytes()) for k, t, _ in iter_shard(path)]
    side = read_sidecar(path)
    assert len(side["offsets"]) == 10 and side["offsets"][-1] <= path.stat().st_size
    assert complete_samples(side["offsets"], side["offsets"][4] + 10) == 4
    read = []

    def opener(p, mode="rb"):
        f = open(p, mode)
        inner = f.read
        f.read = lambda size=-1: read.append(len(data := inner(size))) or data
        return f

    problems = []
    part = [(k, t.tobytes()) for k, t, _ in iter_shard_readable(path, problems, start=3, stop=7, opener=opener,
                                                               sidecar=side)]
    assert part == full[3:7] and problems == []
    assert sum(read) == side["offsets"][7] - side["offsets"][3]  # exactly the range's bytes
    json_path = shards.sidecar_path(path)  # a sidecar of before the offsets: same samples, read from the start
    old = json.loads(json_path.read_text())
    del old["offsets"]
    json_path.write_text(json.dumps(old))
    assert [(k, t.tobytes()) for k, t, _ in iter_shard_readable(path, problems, start=3, stop=7)] == full[3:7]
    assert problems == []
