"""Fault tolerance of the training data stream: truncated, corrupt and missing token shards are reported
(missing and truncated ones at start-up, from their sizes; corrupt ones when read) and skipped, their
readable samples are still used every epoch, the data-parallel split and the resume arithmetic stay
exact, and only data with no readable sample at all is refused."""

import itertools
import logging
import tarfile

import numpy as np
import pytest

from data_prep.shards import iter_shard, iter_shard_readable, shard_name
from megatron_nbp.config import ModelConfig
from megatron_nbp.data import DataError, TokenClipStream, check_manifest
from data_prep.synthetic import write_synthetic_shards

LATENT = (5, 4, 4)
PER_SHARD = 7  # 30 clips: shards 0..3 hold 7, shard 4 holds 2
LOGGER = "megatron_nbp.data"


def _members(path, sample):
    """TarInfos of sample ``sample`` (0-based position in the shard), in stored order."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    key = members[2 * sample].name.split(".")[0]
    return [m for m in members if m.name.split(".")[0] == key]


def _overwrite(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _flat(tokens):
    return tokens.astype(np.int64).reshape(-1).tobytes()


@pytest.fixture
def damaged(tmp_path):
    """30 clips in 5 shards, three of them damaged. Returns (dir, clips, readable: clip indices still
    readable, in no particular order, where the intact shards' part is read directly from those shards)."""
    clips = write_synthetic_shards(tmp_path, num_clips=30, clips_per_shard=PER_SHARD, latent_shape=LATENT, vocab=2048)
    # shard 1: truncated inside sample 4's tokens.npy -> samples 0..3 readable
    s1 = tmp_path / shard_name(1)
    tokens4 = _members(s1, 4)[-1]
    s1.write_bytes(s1.read_bytes()[:tokens4.offset_data + tokens4.size // 2])
    # shard 2: sample 3's first tar header overwritten -> tar ends there, samples 0..2 readable
    s2 = tmp_path / shard_name(2)
    _overwrite(s2, _members(s2, 3)[0].offset + 100, b"\xff" * 60)
    # shard 3: sample 2's .npy magic overwritten -> only sample 2 lost, 0, 1, 3..6 readable
    s3 = tmp_path / shard_name(3)
    _overwrite(s3, _members(s3, 2)[-1].offset_data, b"garbage")
    intact = [int(key[4:]) for shard in (0, 4) for key, _, _ in iter_shard(tmp_path / shard_name(shard))]
    readable = intact + [7 + j for j in range(4)] + [14 + j for j in range(3)] + [21 + j for j in (0, 1, 3, 4, 5, 6)]
    return tmp_path, clips, readable


def stream(data, rank=0, size=1, consumed=0, shuffle_buffer=4):
    return TokenClipStream(data, rank, size, seed=5, latent_shape=LATENT, vocab_size=2048,
                           shuffle_buffer=shuffle_buffer, consumed=consumed)


def take(s, n):
    return [x.tobytes() for x, _label in itertools.islice(iter(s), n)]


def test_damaged_shards_are_reported_and_their_readable_samples_used_every_epoch(damaged, caplog):
    data, clips, readable = damaged
    assert len(readable) == 22 == len(set(readable))
    expected = {_flat(clips[i]) for i in readable}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = stream(data)
    # start-up sees only the truncated shard (from its size): its 4 whole samples count, the other 3 do not
    assert s.num_samples == s.samples_per_rank == 30 - 3
    assert [(r["shard"], r["readable"], r["expected"], r["found"]) for r in s.damaged_shards] == [
        (shard_name(1), 4, 7, "at startup")]
    got = take(s, 2 * 27)  # two epochs
    for epoch in (got[:27], got[27:]):  # every readable sample each epoch; the 5 lost places repeat readable ones
        assert set(epoch) == expected and len(epoch) == 27
    assert got[:27] != got[27:]  # and each epoch has its own order

    records = {r["shard"]: r for r in s.damaged_shards}
    assert sorted(records) == [shard_name(1), shard_name(2), shard_name(3)]
    assert [(records[shard_name(k)]["readable"], records[shard_name(k)]["expected"]) for k in (1, 2, 3)] == [
        (4, 7), (3, 7), (6, 7)]
    assert "truncated or corrupt tar" in records[shard_name(1)]["error"]
    assert "tar ends after 3 of the sidecar's 7 samples" in records[shard_name(2)]["error"]
    assert "'clip00023' cannot be decoded" in records[shard_name(3)]["error"]
    assert [records[shard_name(k)]["found"] for k in (2, 3)] == ["in epoch 0", "in epoch 0"]  # when met
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    damaged_warnings = [w for w in warnings if w.startswith("damaged token shard")]
    assert len(damaged_warnings) == 3  # once per damaged shard, not once per epoch
    assert any(shard_name(1) in w and "4 of the 7 samples the manifest lists are readable" in w
               and "truncated or corrupt tar" in w for w in damaged_warnings)
    assert any(shard_name(3) in w and "6 of the 7 samples" in w for w in damaged_warnings)
    assert sum("filled by repeating its stream" in w for w in warnings) == 1


def test_readable_reader_matches_the_strict_one_on_intact_shards(damaged):
    data, _, _ = damaged
    problems = []
    strict = [(k, t.tobytes(), m) for k, t, m in iter_shard(data / shard_name(0))]
    lenient = [(k, t.tobytes(), m) for k, t, m in iter_shard_readable(data / shard_name(0), problems)]
    assert lenient == strict and problems == []


def test_dp_ranks_are_disjoint_equal_and_cover_the_readable_samples(damaged):
    data, clips, readable = damaged
    per_rank = 27 // 2  # 27 usable positions (the truncated shard's 3 lost samples known at start-up)
    ranks = [take(stream(data, r, 2), per_rank) for r in range(2)]
    assert [len(x) for x in ranks] == [13, 13]
    assert not set(ranks[0]) & set(ranks[1])
    # together: the readable samples, less at most the 27 % 2 = 1 position the epoch leaves out
    union = set(ranks[0]) | set(ranks[1])
    assert union <= {_flat(clips[i]) for i in readable} and len(union) >= len(readable) - 27 % 2
    assert stream(data, 1, 2).samples_per_rank == stream(data, 0, 2).samples_per_rank == per_rank


@pytest.mark.parametrize("size", [1, 2, 3])
def test_resume_continues_exactly_across_epochs(damaged, size):
    data, _, _ = damaged
    per_rank = 27 // size
    assert stream(data, 0, size).samples_per_rank == per_rank
    for rank in range(size):
        full = take(stream(data, rank, size), 3 * per_rank)  # crosses two epoch boundaries
        for consumed in (0, 3, per_rank - 1, per_rank, per_rank + 2, 2 * per_rank + 1):
            assert take(stream(data, rank, size, consumed), 3 * per_rank - consumed) == full[consumed:]


def test_missing_shard_is_reported_and_skipped(tmp_path, caplog):
    clips = write_synthetic_shards(tmp_path, num_clips=30, clips_per_shard=PER_SHARD, latent_shape=LATENT, vocab=2048)
    (tmp_path / shard_name(2)).unlink()
    model = ModelConfig(vocab_size=2048, latent_shape=LATENT, block_shape=(1, 1, 4))
    assert check_manifest(tmp_path, model)["num_samples"] == 30  # not refused: the stream skips it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = stream(tmp_path)
    assert s.damaged_shards[0]["shard"] == shard_name(2) and s.damaged_shards[0]["readable"] == 0
    assert "cannot be opened" in s.damaged_shards[0]["error"]
    assert any(shard_name(2) in r.getMessage() and "0 of the 7 samples" in r.getMessage() for r in caplog.records)
    kept = [i for i in range(30) if not 14 <= i < 21]
    assert sorted(take(s, 23)) == sorted(_flat(clips[i]) for i in kept)


def test_damage_after_construction_keeps_every_rank_on_the_same_schedule(damaged, caplog):
    data, _, _ = damaged
    streams = [stream(data, r, 2) for r in range(2)]
    (data / shard_name(0)).write_bytes((data / shard_name(0)).read_bytes()[:3000])  # cut in sample 1: 1 of 7 readable
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = [take(s, 2 * 13) for s in streams]  # the epochs are filled to their counted length
    assert [len(g) for g in got] == [26, 26] and not set(got[0][:13]) & set(got[1][:13])
    assert [s.consumed for s in streams] == [26, 26]
    late = [r for r in streams[0].damaged_shards if r["shard"] == shard_name(0)]
    assert late and late[0]["found"].startswith("in epoch") and late[0]["readable"] == 1
    assert any("filled by repeating its stream" in r.getMessage() for r in caplog.records)


def test_no_readable_sample_is_refused(damaged):
    data, _, _ = damaged
    for k in range(5):
        path = data / shard_name(k)
        path.write_bytes(path.read_bytes()[:300])  # inside the first tar header
    with pytest.raises(DataError, match=r"no readable token samples in .*: its manifest lists 30 samples in 5 shards, "
                                        r"and 5 of those shards are missing or damaged beyond use"):
        stream(data)
    for k in range(5):
        (data / shard_name(k)).unlink()
    with pytest.raises(DataError, match="none of the 5 shards it lists exists"):
        check_manifest(data, ModelConfig(vocab_size=2048, latent_shape=LATENT, block_shape=(1, 1, 4)))
    with pytest.raises(DataError, match="no readable token samples"):
        stream(data)


def test_a_rank_whose_whole_share_is_unreadable_fills_it_from_the_epoch(tmp_path, caplog):
    clips = write_synthetic_shards(tmp_path, num_clips=14, clips_per_shard=PER_SHARD, latent_shape=LATENT, vocab=2048)
    s0 = tmp_path / shard_name(0)
    _overwrite(s0, 0, b"\xff" * 200)  # first tar header: nothing of shard 0 readable, its size unchanged
    streams = [stream(tmp_path, r, 2) for r in range(2)]  # 7 positions each: one rank owns shard 0 each epoch
    assert [s.samples_per_rank for s in streams] == [7, 7] and not streams[0].damaged_shards
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = [take(s, 3 * 7) for s in streams]
    shard1 = {_flat(clips[i]) for i in range(7, 14)}
    for g in got:  # the same count on both ranks, every sample a readable one, nothing stopped
        assert len(g) == 21 and set(g) <= shard1
    assert any("filled from the whole epoch" in r.getMessage() for r in caplog.records)
    assert any(r["shard"] == shard_name(0) and r["readable"] == 0 for s in streams for r in s.damaged_shards)
