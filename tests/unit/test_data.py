"""The training data stream: disjoint and complete across data-parallel ranks, identical for TP/PP
partners (same DP rank), resumable at any sample, and refusing shards that do not fit the model."""

import itertools

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
