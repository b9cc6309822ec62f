"""Weighted dataset blending (``--data-path W1 DIR1 W2 DIR2``): the folders' proportions follow the
weights, the blend resumes exactly at any sample, and the config refuses malformed or doubled data flags."""

import itertools
import math

import numpy as np
import torch
import pytest

from data_prep.synthetic import write_synthetic_shards
from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.data import DataError
from megatron_nbp.data_blend import BlendedStream, blend_counts, build_token_stream, parse_data_path

LATENT = (5, 4, 4)
TINY = "configs/tiny_frame_prediction.yaml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of different clips (30 in shards of 7, 44 in shards of 9)."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    clips_a = write_synthetic_shards(a, num_clips=30, clips_per_shard=7, latent_shape=LATENT, vocab=2048, seed=1)
    clips_b = write_synthetic_shards(b, num_clips=44, clips_per_shard=9, latent_shape=LATENT, vocab=2048, seed=2)
    flat = lambda clips: {c.astype(np.int64).reshape(-1).tobytes() for c in clips}  # noqa: E731
    assert not flat(clips_a) & flat(clips_b)
    return (a, flat(clips_a)), (b, flat(clips_b))


def blend(folders, weights, rank=0, size=1, consumed=0):
    return build_token_stream([(w, str(f)) for w, (f, _) in zip(weights, folders)], rank, size, seed=5,
                              latent_shape=LATENT, vocab_size=2048, shuffle_buffer=4, consumed=consumed)


def take(stream, n):
    return [x.tobytes() for x, _label in itertools.islice(iter(stream), n)]


def test_two_folder_blend_follows_the_weights_within_binomial_error(folders):
    (_, in_a), (_, in_b) = folders
    n = 400  # several epochs of each folder
    for weight_a in (0.25, 0.6):
        for rank in range(2):
            got = take(blend(folders, [weight_a, 1 - weight_a], rank, 2), n)
            from_a = sum(x in in_a for x in got)
            assert from_a + sum(x in in_b for x in got) == n  # every sample comes from one of the folders
            assert abs(from_a - weight_a * n) <= 3 * math.sqrt(n * weight_a * (1 - weight_a))
            # each folder's part is that folder's own stream, in order (its epochs complete and disjoint by rank)
            own = take(blend(folders[:1], [1.0], rank, 2), from_a)
            assert [x for x in got if x in in_a] == own


def test_blend_resumes_exactly_at_any_sample(folders):
    full = take(blend(folders, [0.3, 0.7], 1, 2), 90)
    for consumed in (1, 17, 44, 89):
        resumed = blend(folders, [0.3, 0.7], 1, 2, consumed)
        assert resumed.consumed == consumed
        assert take(resumed, 90 - consumed) == full[consumed:]


def test_blend_schedule_counts_track_the_weights():
    weights = [0.2, 0.5, 0.3]
    for n in (1, 7, 100, 1001):
        counts = blend_counts(weights, n)
        assert sum(counts) == n and all(abs(c - w * n) <= 1 for c, w in zip(counts, weights))


def test_data_path_forms_and_refusals(folders, tmp_path):
    assert parse_data_path(["/d"]) == [(1.0, "/d")]
    assert parse_data_path(["1", "/a", "3", "/b"]) == [(0.25, "/a"), (0.75, "/b")]
    for bad, message in ((["1", "/a", "2"], "weight-folder pairs"), (["x", "/a", "1", "/b"], "is not a number"),
                         (["0", "/a", "1", "/b"], "positive number"), ([], "weight-folder pairs")):
        with pytest.raises(ValueError, match=message):
            parse_data_path(bad)
    with pytest.raises(ValueError):
        BlendedStream([], [])
    # YAML: numbers and text mixed; flags: all text; --data is the one-folder case
    cfg = NBPConfig.from_yaml(TINY, {"data_path": [0.3, "/a", 7, "/b"]})
    assert cfg.data_path == ["0.3", "/a", "7", "/b"] and cfg.data_folders() == [(0.3 / 7.3, "/a"), (7 / 7.3, "/b")]
    assert NBPConfig.from_yaml(TINY, {"data": "/d"}).data_folders() == [(1.0, "/d")]
    from megatron_nbp.cli import pretrain

    parsed = pretrain.parse_args(["--config", TINY, "--data-path", "2", "/a", "1", "/b"])
    assert parsed.data_folders() == [(2 / 3, "/a"), (1 / 3, "/b")]
    both = NBPConfig.from_yaml(TINY, {"data": "/d", "data_path": ["/e"]})
    with pytest.raises(ConfigError, match="give the training data once: --data /d or --data-path /e, not both"):
        both.validate()
    with pytest.raises(ConfigError, match="weight-folder pairs"):
        NBPConfig.from_yaml(TINY, {"data_path": ["1", "/a", "2"]}).validate()
    with pytest.raises(ValueError, match="is required"):
        NBPConfig.from_yaml(TINY).data_folders()
    # every folder is checked against the model
    other = tmp_path / "other"
    write_synthetic_shards(other, num_clips=4, clips_per_shard=2, latent_shape=(5, 8, 8), vocab=2048)
    with pytest.raises(DataError, match="latent shape"):
        build_token_stream([(0.5, str(folders[0][0])), (0.5, str(other))], 0, 1, 5, LATENT, 2048)


def test_pretrain_checks_every_folder_and_streams_the_blend(folders, tmp_path, monkeypatch):
    from megatron_nbp.data import micro_batches
    from megatron_nbp.training import loop

    other = tmp_path / "other"
    write_synthetic_shards(other, num_clips=4, clips_per_shard=2, latent_shape=LATENT, vocab=4096)
    model = {"model.latent_shape": list(LATENT), "model.block_shape": [1, 1, 4], "model.vocab_size": 2048,
             "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.seed": 5, "train.shuffle_buffer": 4}
    monkeypatch.setattr(loop, "initialize_parallel", lambda *a, **k: pytest.fail("started before checking the data"))
    bad = NBPConfig.from_yaml(TINY, {**model, "data_path": ["1", str(folders[0][0]), "1", str(other)]})
    with pytest.raises(DataError, match=f"{other}.*codebook 4096"):  # the second folder, before any process group
        loop.start_job(bad)
    monkeypatch.setattr(loop.parallel_state, "get_data_parallel_world_size", lambda: 2)
    monkeypatch.setattr(loop.parallel_state, "get_data_parallel_rank", lambda: 1)
    cfg = NBPConfig.from_yaml(TINY, {**model, "data_path": ["1", str(folders[0][0]), "3", str(folders[1][0])]})
    batches = loop.build_data_iterator(cfg, consumed=2 * 6)  # 6 samples of this rank consumed
    reference = micro_batches(blend(folders, [0.25, 0.75], 1, 2, consumed=6), 2, cfg.model)
    for got, want in itertools.islice(zip(batches, reference), 4):
        assert torch.equal(got.tokens, want.tokens)
