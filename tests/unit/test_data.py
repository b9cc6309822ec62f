"""The training data stream: disjoint and complete across data-parallel ranks, identical for TP/PP
partners (same DP rank), resumable at any sample, and refusing shards that do not fit the model."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_nbp.config import ModelConfig
from megatron_nbp.data import DataError, TokenClipStream, micro_batches
from data_prep.synthetic import write_synthetic_shards

LATENT = (5, 4, 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    clips = write_synthetic_shards(out, num_clips=30, clips_per_shard=7, latent_shape=LATENT, vocab=2048)
    return out, clips


def take(stream, n):
    return [x.tobytes() for x, _label in itertools.islice(iter(stream), n)]


def stream(data, rank, size, consumed=0):
    return TokenClipStream(data, rank, size, seed=5, latent_shape=LATENT, vocab_size=2048, shuffle_buffer=4,
                           consumed=consumed)


def test_dp_ranks_are_disjoint_and_cover_the_epoch(shards):
    data, clips = shards
    per_rank = 30 // 3
    epochs = [take(stream(data, r, 3), per_rank) for r in range(3)]
    flat = [x for e in epochs for x in e]
    assert len(set(flat)) == len(flat) == 30  # disjoint and, 30 = 3 x 10, complete
    assert set(flat) == {c.astype(np.int64).reshape(-1).tobytes() for c in clips}


def test_same_dp_rank_reads_the_same_samples(shards):
    data, _ = shards
    assert take(stream(data, 1, 2), 25) == take(stream(data, 1, 2), 25)


def test_resume_continues_exactly_across_epochs(shards):
    data, _ = shards
    full = take(stream(data, 0, 2), 40)  # 15 per epoch: crosses two epoch boundaries
    for consumed in (0, 7, 15, 22):
        assert take(stream(data, 0, 2, consumed), 40 - consumed) == full[consumed:]
    assert full[:15] != full[15:30]  # each epoch has its own order


def test_micro_batches_have_the_frame_prediction_layout(shards):
    data, _ = shards
    model = ModelConfig(vocab_size=2048, latent_shape=LATENT, block_shape=(1, 1, 4))
    batch = next(micro_batches(stream(data, 0, 1), 3, model))
    assert batch.tokens.shape == (3, 80 - 4) and batch.labels.shape == (3, 76)
    hybrid = ModelConfig(vocab_size=2048, latent_shape=LATENT, block_shape=(1, 1, 4), layout="hybrid",
                         condition_labels=["other", "synthetic"])
    batch = next(micro_batches(stream(data, 0, 1), 3, hybrid))
    assert batch.tokens.shape == (3, 1 + 80) and torch.all(batch.tokens[:, 0] == 4 + 1)  # "synthetic" = id 1
    with pytest.raises(DataError, match="not in model.condition_labels"):
        next(micro_batches(stream(data, 0, 1), 3, ModelConfig(
            vocab_size=2048, latent_shape=LATENT, block_shape=(1, 1, 4), layout="hybrid", condition_labels=["x"])))


def test_mismatched_shards_are_refused(shards):
    data, _ = shards
    with pytest.raises(DataError, match="latent shape"):
        TokenClipStream(data, 0, 1, seed=0, latent_shape=(5, 8, 8), vocab_size=2048)
    with pytest.raises(DataError, match="codebook"):
        TokenClipStream(data, 0, 1, seed=0, latent_shape=LATENT, vocab_size=1000)
    with pytest.raises(DataError, match="cannot feed"):
        TokenClipStream(data, 0, 64, seed=0, latent_shape=LATENT, vocab_size=2048)


class CountingOpener:
    """``open`` that counts the bytes read through it, per file suffix (``.tar`` shards, ``.json`` sidecars
    and manifest)."""

    def __init__(self):
        self.read = {".tar": 0, ".json": 0}

    def __call__(self, path, mode="rb"):
        f = open(path, mode)
        counter, suffix, inner_read = self, Path(path).suffix, f.read

        def read(size=-1):
            data = inner_read(size)
            counter.read[suffix] += len(data)
            return data

        f.read = read
        return f


def test_each_rank_reads_only_its_share_and_startup_reads_no_shard(shards):
    from data_prep.shards import read_sidecar

    data, clips = shards
    offsets = [read_sidecar(p)["offsets"] for p in data.glob("shard-*.tar")]
    total = sum(o[-1] - o[0] for o in offsets)  # the samples' bytes (the tars' end padding is never read)
    for size in (2, 4):  # 30 = 4 x 7 + 2: 2 samples left out per epoch, 7 per rank
        per_rank = 30 // size
        openers = [CountingOpener() for _ in range(size)]
        streams = [TokenClipStream(data, r, size, seed=5, latent_shape=LATENT, vocab_size=2048, shuffle_buffer=4,
                                   opener=o) for r, o in enumerate(openers)]
        assert all(o.read[".tar"] == 0 for o in openers)  # start-up: the manifest only
        epochs = [take(s, 2 * per_rank) for s in streams]
        for e in (0, 1):
            parts = [got[e * per_rank:(e + 1) * per_rank] for got in epochs]
            flat = [x for p in parts for x in p]
            assert len(set(flat)) == len(flat) == size * per_rank  # disjoint, the same count on every rank
            assert set(flat) <= {c.astype(np.int64).reshape(-1).tobytes() for c in clips}
        # two epochs read each sample at most twice, and each rank within 10% of its share (data / DP)
        assert sum(o.read[".tar"] for o in openers) <= 2 * total
        assert max(o.read[".tar"] for o in openers) <= 2 * total / size * 1.1


def test_uneven_shards_give_every_rank_the_same_count_and_resume_exactly(tmp_path):
    from data_prep.shards import manifest_entry, shard_name, write_manifest, write_shard
    from data_prep.synthetic import synthetic_clips

    sizes = [1, 9, 3, 12, 2, 5, 7]  # 39 samples; 4 ranks: 9 each, 3 left out per epoch
    clips = synthetic_clips(sum(sizes), LATENT, vocab=2048, seed=3)
    entries, start = [], 0
    for k, n in enumerate(sizes):
        meta = {"source": "s", "clip_start": 0, "num_frames": 17, "frame_stride": 1, "fps": 8.0, "label": None,
                "latent_shape": list(LATENT)}
        write_shard(tmp_path / shard_name(k), [(f"c{i}", clips[i], meta) for i in range(start, start + n)])
        entries.append(manifest_entry(tmp_path / shard_name(k), n))
        start += n
    write_manifest(tmp_path, {"format": "megatron-nbp-tokens/1", "shards": entries, "num_samples": 39, "failures": [],
                              "tokenizer": {"path": "t", "sha256": "0" * 64, "levels": [8], "codebook_size": 2048,
                                            "latent_shape": list(LATENT)},
                              "clip": {"num_frames": 17, "frame_stride": 1, "resolution": [64, 64]}})
    got = [take(stream(tmp_path, r, 4), 27) for r in range(4)]  # three epochs
    everything = {c.astype(np.int64).reshape(-1).tobytes() for c in clips}
    for e in range(3):
        flat = [x for g in got for x in g[9 * e:9 * (e + 1)]]
        assert len(set(flat)) == len(flat) == 36 and set(flat) <= everything
    for consumed in (4, 9, 20):
        assert take(stream(tmp_path, 2, 4, consumed), 27 - consumed) == got[2][consumed:]
