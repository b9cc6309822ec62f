"""launchers/evaluate.py protocol plumbing on CPU with stubs (no I3D, no trained model): the real
``generate_hybrid`` / ``generate_frame_prediction`` are replaced by recorders, features are cheap
pixel statistics. Checks which condition each generation gets, the K600 prompt length and 64x64
evaluation resolution, the 16-frame cut, rank sharding and folds. The full path (real model, real
I3D) is documented in docs/evaluation.md."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_prep.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluate():
    """The evaluation protocols (megatron_nbp.eval.protocols) and the command line around them."""
    import megatron_nbp.cli.evaluate as cli
    import megatron_nbp.eval.protocols as protocols

    return SimpleNamespace(**vars(protocols), main=cli.main)


class _Tokenizer(torch.nn.Module):
    """decode: tokens [B, 5, 2, 2] -> [B, 3, 17, 16, 16], value = mean token id (mod 2) - 0.5."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def decode(self, tokens):
        b = tokens.shape[0]
        v = (tokens.float().mean(dim=(1, 2, 3)) % 2 - 0.5).view(b, 1, 1, 1, 1)
        return v.expand(b, 3, 17, 16, 16).clone()


def _first_seed(seeding: dict) -> int:
    """The first row's seed of the seeding keywords the pipeline passed (per-row ``seeds`` or a ``generator``)."""
    return seeding["seeds"][0] if "seeds" in seeding else seeding["generator"].initial_seed()


def _features(clips):
    x = torch.as_tensor(clips).double()
    return torch.stack([x.mean(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4)), torch.full((len(x),), float(x.shape[1])),
                        torch.full((len(x),), float(x.shape[2]))], 1)


def test_protocols(evaluate, tmp_path, monkeypatch):
    import megatron_nbp.inference.generate as gen
    from megatron_nbp.inference.sampling import SamplingConfig

    data = tmp_path / "shards"
    write_synthetic_shards(data, num_clips=10, clips_per_shard=4, latent_shape=(5, 2, 2), vocab=100)
    calls = []

    from megatron_nbp.inference.pipeline import NBPPipeline

    def fake_hybrid(model, condition, condition_padding=None, sampling=None, progress=False, **seeding):
        calls.append(("hybrid", condition.clone(), seeding))
        return gen.GenerationResult(condition.repeat(1, 20) * 0 + 3, 95, 0.0)

    def fake_frames(model, prompt, sampling=None, progress=False, **seeding):
        calls.append(("frames", prompt.clone(), seeding))
        return gen.GenerationResult(torch.cat([prompt, prompt, prompt[:, :4]], 1), 3, 0.0)

    monkeypatch.setattr(gen, "generate_hybrid", fake_hybrid)
    monkeypatch.setattr(gen, "generate_frame_prediction", fake_frames)
    model = SimpleNamespace(config=SimpleNamespace(latent_shape=[5, 2, 2], condition_frames=2,
                                                   condition_labels=["other", "synthetic"]),
                            parameters=lambda: iter([torch.zeros(1)]))
    pipe = NBPPipeline(model, _Tokenizer())
    real_shapes = []

    def load_real(meta):
        real_shapes.append(meta["source"])
        return np.full((17, 16, 16, 3), 200, np.uint8)

    sampling = SamplingConfig()
    # UCF: class id of the label "synthetic" = 1; 7 samples over 2 ranks (indices 1, 3, 5 on rank 1)
    samples = list(evaluate.iter_samples(data, 7, rank=1, world_size=2))
    assert [i for i, _ in samples] == [1, 3, 5]
    real, fake = evaluate.run_protocol("ucf101", pipe, iter(samples), load_real, _features, sampling, batch_size=2,
                                       seed=100)
    assert [c[0] for c in calls] == ["hybrid", "hybrid"] and calls[0][1].tolist() == [[1], [1]]
    # the batch's seeding starts at seed + its first global index (1, then 5)
    assert [_first_seed(c[2]) for c in calls] == [101, 105]
    assert real.shape == (3, 4) and real[0, 2] == 16 and real[0, 3] == 16  # 16 frames, native 16x16
    assert fake[0, 0] == 191 and real[0, 0] == 200  # decoded tokens (value 0.5 -> 191) vs real pixels
    # K600: prompt = first 2 latent frames (8 tokens), clips resized to 64x64, dataset cycled (10 < 12)
    calls.clear()
    samples = list(evaluate.iter_samples(data, 12))
    assert len(samples) == 12 and samples[10][1][1]["source"] == samples[0][1][1]["source"]
    real, fake = evaluate.run_protocol("k600", pipe, iter(samples), load_real, _features, sampling, batch_size=5,
                                       eval_resolution=64)
    assert [c[1].shape for c in calls] == [(5, 8), (5, 8), (2, 8)]
    assert real.shape == (12, 4) and real[0, 3] == 64 and real[0, 2] == 16
    result = evaluate.summarize(real, fake, num_folds=3)
    assert len(result["folds"]) == 3 and result["num_generated"] == 12 and result["fvd"] > 0
    with pytest.raises(ValueError, match="condition_labels"):
        model.config.condition_labels = ["other"]
        evaluate.run_protocol("ucf101", pipe, iter(samples[:1]), load_real, _features, sampling)


def test_rank_features_merge_back_into_global_sample_order():
    """Rank r featurizes samples r, r + W, ...: merged, row i is sample i for any W (so the folds, and the
    FVD mean and std over them, do not depend on the number of GPUs); a concatenation would not be."""
    import pytest
    import torch

    from megatron_nbp.eval.protocols import merge_rank_features

    samples = torch.arange(10, dtype=torch.float64)[:, None].repeat(1, 3)  # row i holds i
    for world in (1, 2, 3, 4, 10, 12):
        parts = [samples[r::world] for r in range(world)]
        assert torch.equal(merge_rank_features(parts), samples), world
    assert not torch.equal(torch.cat([samples[r::3] for r in range(3)]), samples)
    with pytest.raises(ValueError, match="round-robin"):
        merge_rank_features([samples[:6], samples[6:]])
