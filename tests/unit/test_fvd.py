"""FVD math and the restricted unpickler (no network, no I3D weights; fast).

Frechet distance is checked against closed forms computed in plain Python (no numpy/scipy linear
algebra): diagonal covariances, and 2x2 non-commuting covariances where
``tr sqrt(A) = sqrt(tr A + 2 sqrt(det A))`` for a 2x2 PSD ``A`` and ``sqrt(S1^1/2 S2 S1^1/2)`` has the
trace ``sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))``.
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch

from megatron_nbp.eval.fvd import (
    frechet_distance,
    frechet_distance_from_stats,
    fvd_folds,
    gaussian_stats,
    preprocess_clips,
    resize_clips,
)
from megatron_nbp.eval.i3d import InceptionI3d, same_padding
from megatron_nbp.eval.weights import (
    UnsafePickleError,
    flax_to_torch_state_dict,
    kinetics400_labels,
    load_numpy_pickle,
)


def _reference_diag(mu1, var1, mu2, var2) -> float:
    """Closed form for diagonal covariances, pure Python."""
    return sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + sum(
        s1 + s2 - 2 * math.sqrt(s1 * s2) for s1, s2 in zip(var1, var2))


def _reference_2x2(mu1, s1, mu2, s2) -> float:
    """Closed form for 2x2 covariances (lists of lists), pure Python."""
    det = lambda m: m[0][0] * m[1][1] - m[0][1] * m[1][0]  # noqa: E731
    tr_prod = sum(s1[i][k] * s2[k][i] for i in range(2) for k in range(2))
    tr_sqrt = math.sqrt(tr_prod + 2 * math.sqrt(det(s1) * det(s2)))
    return (sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + s1[0][0] + s1[1][1] + s2[0][0] + s2[1][1] - 2 * tr_sqrt)


def test_frechet_matches_diagonal_closed_form():
    mu1, var1 = [0.0, 1.0, -2.0, 0.5], [1.0, 4.0, 0.25, 2.0]
    mu2, var2 = [1.0, 1.0, 0.0, -0.5], [9.0, 1.0, 0.25, 0.5]
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = frechet_distance_from_stats(t(mu1), torch.diag(t(var1)), t(mu2), torch.diag(t(var2)))
    want = _reference_diag(mu1, var1, mu2, var2)
    assert want == pytest.approx((1 + 0 + 4 + 1) + (1 + 9 - 6) + (4 + 1 - 4) + 0 + (2 + 0.5 - 2))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_frechet_matches_non_commuting_2x2_closed_form():
    s1, s2 = [[2.0, 0.8], [0.8, 1.0]], [[1.0, -0.3], [-0.3, 3.0]]
    mu1, mu2 = [0.5, -1.0], [0.0, 2.0]
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = frechet_distance_from_stats(t(mu1), t(s1), t(mu2), t(s2))
    assert got == pytest.approx(_reference_2x2(mu1, s1, mu2, s2), rel=1e-10)
    # symmetric in its arguments
    assert frechet_distance_from_stats(t(mu2), t(s2), t(mu1), t(s1)) == pytest.approx(got, rel=1e-10)


def test_frechet_from_samples_identity_and_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 100, generator=g, dtype=torch.float64) * 5
    assert abs(frechet_distance(x, x)) < 1e-8  # rank-deficient covariance (32 < 100) still exact
    # a pure mean shift adds |delta|^2 exactly
    assert frechet_distance(x, x + 0.5) == pytest.approx(100 * 0.25, rel=1e-9)
    # sample estimate of a diagonal-Gaussian pair approaches the closed form
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5]) + 1.0
    want = _reference_diag([0, 0, 0], [1, 4, 0.25], [1, 1, 1], [9, 1, 0.25])
    assert frechet_distance(a, b) == pytest.approx(want, rel=0.05)


def test_gaussian_stats_and_folds():
    x = torch.arange(12, dtype=torch.float64).view(6, 2)
    mu, cov = gaussian_stats(x)
    assert mu.tolist() == [5.0, 6.0] and cov[0, 0].item() == pytest.approx(14.0)  # unbiased (N - 1)
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])
    folds = fvd_folds(torch.cat([x, x + 100]), x, num_folds=2)
    assert folds[0] == pytest.approx(0.0, abs=1e-9) and folds[1] == pytest.approx(2 * 100 ** 2)
    with pytest.raises(ValueError):
        fvd_folds(x, x, num_folds=4)


def test_same_padding_is_tf_semantics():
    # TF: out = ceil(n / s), extra padding element goes AFTER
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(16, 7, 2) == (2, 3)
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(8, 2, 2) == (0, 0)
    assert same_padding(9, 3, 1) == (1, 1)


def test_preprocess_and_resize():
    clips = np.zeros((2, 3, 64, 96, 3), np.uint8)
    clips[..., 0] = 255
    x = preprocess_clips(clips)
    assert x.shape == (2, 3, 3, 224, 224) and x.dtype == torch.float32
    assert x[:, 0].min().item() == pytest.approx(1.0) and x[:, 1].max().item() == pytest.approx(-1.0)
    small = resize_clips(np.full((1, 2, 128, 128, 3), 77, np.uint8), 64)
    assert small.shape == (1, 2, 64, 64, 3) and small.dtype == np.uint8 and (small == 77).all()
    with pytest.raises(ValueError):
        preprocess_clips(clips.astype(np.float32))


def test_i3d_rejects_bad_shapes():
    """Input validation (the forward pass itself is exercised with the real weights in test_i3d.py)."""
    model = InceptionI3d().eval()
    assert sum(p.numel() for p in model.parameters()) == 12_689_984  # = the checkpoint's "params" (BN beta -> bias)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 16, 112, 112))


def test_kinetics_labels():
    labels = kinetics400_labels()
    assert len(labels) == 400 and len(set(labels)) == 400 and labels == sorted(labels, key=str.lower)
    assert labels[0] == "abseiling" and labels[-1] == "zumba" and "riding a bike" in labels


# --- restricted unpickler -------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"params": {"w": np.ones(3, np.float32)}, "x": _Evil(str(marker))})
    with pytest.raises(UnsafePickleError, match="system"):
        load_numpy_pickle(payload)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [
    {"a": eval},                                     # builtins.eval
    {"a": np.array([object()], dtype=object)},       # object array -> allowed globals only, refused after
    {"a": [1, 2, 3]},                                # non-array leaf
    {1: np.zeros(2)},                                # non-string key
])
def test_unpickler_refuses_non_arrays(obj):
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(pickle.dumps(obj))


def test_unpickler_round_trips_numpy_tree(tmp_path):
    tree = {"params": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}},
            "batch_stats": {"m": np.zeros((1, 4), np.float64)}}
    path = tmp_path / "w.ckpt"
    path.write_bytes(pickle.dumps(tree))
    back = load_numpy_pickle(path)
    np.testing.assert_array_equal(back["params"]["Conv_0"]["kernel"], tree["params"]["Conv_0"]["kernel"])


def test_flax_mapping_folds_batchnorm():
    """Name mapping + BN folding on a synthetic Flax tree shaped like the real checkpoint."""
    from megatron_nbp.eval.i3d import INCEPTION_BLOCKS

    rng = np.random.default_rng(0)
    model = InceptionI3d()
    state = model.state_dict()
    params, stats = {}, {}

    def unit(scope_p, scope_s, name, weight_shape):
        cout, cin, kt, kh, kw = weight_shape
        scope_p[name] = {"Conv_0": {"kernel": rng.standard_normal((kt, kh, kw, cin, cout)).astype(np.float32)},
                         "BatchNorm_0": {"bias": rng.standard_normal(cout).astype(np.float32)}}
        scope_s[name] = {"BatchNorm_0": {"mean": rng.standard_normal((1, 1, 1, 1, cout)).astype(np.float32),
                                         "var": rng.uniform(0.5, 2, (1, 1, 1, 1, cout)).astype(np.float32)}}

    for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        unit(params, stats, name, state[f"{name}.conv.weight"].shape)
    branches = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
    for block, _ in INCEPTION_BLOCKS:
        params[block], stats[block] = {}, {}
        for ours, theirs in branches.items():
            unit(params[block], stats[block], theirs, state[f"mixed.{block}.{ours}.conv.weight"].shape)
    params["Logits/Conv3d_0c_1x1"] = {"Conv_0": {"kernel": rng.standard_normal((1, 1, 1, 1024, 400)).astype(np.float32),
                                                 "bias": rng.standard_normal(400).astype(np.float32)}}
    mapped = flax_to_torch_state_dict({"params": params, "batch_stats": stats})
    model.load_state_dict(mapped, strict=True)
    # folded conv == conv followed by BN (x - mean) / sqrt(var + 1e-3) + beta
    p, s = params["Conv3d_2b_1x1"], stats["Conv3d_2b_1x1"]
    x = torch.randn(2, 64)
    conv = x @ torch.from_numpy(p["Conv_0"]["kernel"][0, 0, 0])
    mean = torch.from_numpy(s["BatchNorm_0"]["mean"].reshape(-1))
    var = torch.from_numpy(s["BatchNorm_0"]["var"].reshape(-1))
    want = (conv - mean) / torch.sqrt(var + 1e-3) + torch.from_numpy(p["BatchNorm_0"]["bias"])
    got = x @ mapped["Conv3d_2b_1x1.conv.weight"][:, :, 0, 0, 0].T + mapped["Conv3d_2b_1x1.conv.bias"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_i3d_features_run_without_tf32_and_restore_the_setting():
    """On a GPU cuDNN would run the I3D convolutions in TF32 by default (FVD then differs from a CPU run's
    beyond fp32 rounding): i3d_features turns that off for its own call only."""
    import numpy as np
    import torch

    from megatron_nbp.eval.fvd import i3d_features

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return torch.zeros(x.shape[0], 400)

    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        feats = i3d_features(Probe(), np.zeros((3, 9, 8, 8, 3), np.uint8), batch_size=2)
        assert seen == [False, False] and feats.shape == (3, 400)
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
