"""Import of the official NBP release's MAGVITv2 checkpoints (module names, layout math, FSQ bound variant).

The reference below is written from the release's module layout (nbp/magvit2.py: ``encoder_layers`` /
``decoder_layers`` lists of CausalConv3d (F.pad replicate), ``Residual(fn=Sequential(GroupNorm3D, Swish(beta),
conv, GroupNorm3D, Swish, conv), residual_fn=1x1x1 conv)``, ``Depth2Space3D`` with channels read as
``(t_block, h_block, w_block, c_out)``) and the FSQ paper's bound with ``(1 - eps)`` and ``tan``. It walks a
state dict keyed by the official names with plain torch functionals and shares no code with our model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_prep.tokenizer import FSQ, VideoTokenizer
from data_prep.tokenizer.official_import import (
    convert_official_state_dict,
    load_official_tokenizer,
    official_nbp_config,
)

LEVELS = [8, 8, 8, 5, 5, 5]


def _official_layout(c: int, embed: int = 6, channels: int = 3):
    """(encoder, decoder) entry lists of the release's VideoTokenizer with widths c, 2c, 2c, 4c."""
    c1, c2, c4 = c, 2 * c, 4 * c
    res = lambda a, b: ("res", a, b)  # noqa: E731
    enc = [("conv", channels, c1, 3, (1, 1, 1)), *[res(c1, c1)] * 4, ("conv", c1, c1, 3, (1, 2, 2)),
           res(c1, c2), *[res(c2, c2)] * 3, ("conv", c2, c2, 3, (2, 2, 2)), *[res(c2, c2)] * 4,
           ("conv", c2, c2, 3, (2, 2, 2)), res(c2, c4), *[res(c4, c4)] * 3, *[res(c4, c4)] * 4,
           ("gn", c4), ("swish", c4), ("conv1x1", c4, embed)]
    dec = [("conv", embed, c4, 3, (1, 1, 1)), *[res(c4, c4)] * 8, ("conv", c4, c4 * 8, 3, (1, 1, 1)),
           ("d2s", (2, 2, 2)), res(c4, c2), *[res(c2, c2)] * 3, ("conv", c2, c2 * 8, 3, (1, 1, 1)),
           ("d2s", (2, 2, 2)), *[res(c2, c2)] * 4, ("conv", c2, c2 * 4, 3, (1, 1, 1)), ("d2s", (1, 2, 2)),
           res(c2, c1), *[res(c1, c1)] * 3, ("gn", c1), ("swish", c1), ("conv", c1, channels, 3, (1, 1, 1))]
    return enc, dec


def _official_state_dict(c: int, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's key names (``module.`` prefix as saved by its DDP trainer)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, mean=0.0):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return mean + scale * torch.randn(*shape, generator=g)

    state = {}
    enc, dec = _official_layout(c)
    for prefix, layers in (("encoder_layers", enc), ("decoder_layers", dec)):
        for i, entry in enumerate(layers):
            p = f"module.{prefix}.{i}"
            kind = entry[0]
            if kind == "conv":
                _, a, b, k, _ = entry
                state[f"{p}.conv.weight"] = rnd(b, a, k, k, k, scale=1.0 / math.sqrt(a * k**3))
                state[f"{p}.conv.bias"] = rnd(b, scale=0.05)
            elif kind == "conv1x1":
                _, a, b = entry
                state[f"{p}.weight"] = rnd(b, a, 1, 1, 1, scale=1.0 / math.sqrt(a))
                state[f"{p}.bias"] = rnd(b, scale=0.05)
            elif kind == "gn":
                state[f"{p}.weight"] = rnd(entry[1], scale=0.1, mean=1.0)
                state[f"{p}.bias"] = rnd(entry[1], scale=0.1)
            elif kind == "swish":
                state[f"{p}.beta"] = rnd(1, entry[1], 1, 1, 1, scale=0.2, mean=1.0)
            elif kind == "res":
                _, a, b = entry
                state[f"{p}.fn.0.weight"], state[f"{p}.fn.0.bias"] = rnd(a, scale=0.1, mean=1.0), rnd(a, scale=0.1)
                state[f"{p}.fn.1.beta"] = rnd(1, a, 1, 1, 1, scale=0.2, mean=1.0)
                state[f"{p}.fn.2.conv.weight"] = rnd(b, a, 3, 3, 3, scale=0.5 / math.sqrt(a * 27))
                state[f"{p}.fn.2.conv.bias"] = rnd(b, scale=0.05)
                state[f"{p}.fn.3.weight"], state[f"{p}.fn.3.bias"] = rnd(b, scale=0.1, mean=1.0), rnd(b, scale=0.1)
                state[f"{p}.fn.4.beta"] = rnd(1, b, 1, 1, 1, scale=0.2, mean=1.0)
                state[f"{p}.fn.5.conv.weight"] = rnd(b, b, 3, 3, 3, scale=0.5 / math.sqrt(b * 27))
                state[f"{p}.fn.5.conv.bias"] = rnd(b, scale=0.05)
                if a != b:
                    state[f"{p}.residual_fn.0.conv.weight"] = rnd(b, a, 1, 1, 1, scale=1.0 / math.sqrt(a))
                    state[f"{p}.residual_fn.0.conv.bias"] = rnd(b, scale=0.05)
    return state


# ------------------------------------------------------------- reference math of the official layout


def _ref_conv(x, state, p, stride, k):
    if k > 1:  # F.pad(..., (w, w, h, h, 2 * (k // 2), 0), mode="replicate") then a padding-free conv
        x = F.pad(x, (k // 2, k // 2, k // 2, k // 2, 2 * (k // 2), 0), mode="replicate")
    return F.conv3d(x, state[f"{p}.conv.weight"], state[f"{p}.conv.bias"], stride=stride)


def _ref_gn(x, weight, bias, groups):
    b, c, t, h, w = x.shape
    y = F.group_norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), groups, weight, bias, 1e-5)
    return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def _ref_swish(x, beta):
    return x * torch.sigmoid(beta * x)


def _ref_d2s(x, factors):
    b, c, t, h, w = x.shape
    st, sh, sw = factors
    co = c // (st * sh * sw)
    x = x.view(b, st, sh, sw, co, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(b, co, t * st, h * sh, w * sw)
    return x[:, :, st - 1:]


def _ref_run(x, state, prefix, layers, groups):
    for i, entry in enumerate(layers):
        p, kind = f"module.{prefix}.{i}", entry[0]
        if kind == "conv":
            x = _ref_conv(x, state, p, entry[4], entry[3])
        elif kind == "conv1x1":
            x = F.conv3d(x, state[f"{p}.weight"], state[f"{p}.bias"])
        elif kind == "gn":
            x = _ref_gn(x, state[f"{p}.weight"], state[f"{p}.bias"], groups)
        elif kind == "swish":
            x = _ref_swish(x, state[f"{p}.beta"])
        elif kind == "d2s":
            x = _ref_d2s(x, entry[1])
        else:
            h = _ref_swish(_ref_gn(x, state[f"{p}.fn.0.weight"], state[f"{p}.fn.0.bias"], groups), state[f"{p}.fn.1.beta"])
            h = _ref_conv(h, state, f"{p}.fn.2", (1, 1, 1), 3)
            h = _ref_swish(_ref_gn(h, state[f"{p}.fn.3.weight"], state[f"{p}.fn.3.bias"], groups), state[f"{p}.fn.4.beta"])
            h = _ref_conv(h, state, f"{p}.fn.5", (1, 1, 1), 3)
            skip = F.conv3d(x, state[f"{p}.residual_fn.0.conv.weight"], state[f"{p}.residual_fn.0.conv.bias"]) \
                if f"{p}.residual_fn.0.conv.weight" in state else x
            x = h + skip
    return x


def _ref_fsq_quantize(z, levels=LEVELS, eps=1e-3):
    """The release's FSQ (FSQ paper Appendix A): channels-last codes and mixed-radix indices."""
    z = z.movedim(1, -1).double()
    L = torch.tensor(levels, dtype=torch.float64)
    half_l = (L - 1) * (1 - eps) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0)
    shift = torch.tan(offset / half_l)
    bounded = torch.tanh(z + shift) * half_l - offset
    half_width = torch.floor(L / 2)
    codes = torch.round(bounded) / half_width
    basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.float64), 0)
    indices = ((codes * half_width + half_width) * basis).sum(-1).round().long()
    return codes.movedim(-1, 1).float(), indices


@pytest.fixture(scope="module")
def toy():
    width, groups = 8, 4
    state = _official_state_dict(width)
    model = VideoTokenizer(official_nbp_config(base_channels=width, norm_groups=groups)).eval()
    model.load_state_dict(convert_official_state_dict(state, model), strict=True)
    return state, model, groups


def test_official_layout_matches_reference_math_encode_and_decode(toy):
    state, model, groups = toy
    enc, dec = _official_layout(8)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_latent = _ref_run(x, state, "encoder_layers", enc, groups)
        ours_latent = model.encoder(x)
        assert ours_latent.shape == (1, 6, 2, 2, 2)
        torch.testing.assert_close(ours_latent, ref_latent, rtol=1e-4, atol=1e-4)
        ref_codes, ref_indices = _ref_fsq_quantize(ref_latent)
        assert torch.equal(model.encode(x), ref_indices)
        ref_video = _ref_run(ref_codes, state, "decoder_layers", dec, groups)
        ours_video = model.decode(ref_indices)
        assert ours_video.shape == x.shape
        torch.testing.assert_close(ours_video, ref_video, rtol=1e-4, atol=1e-4)


def test_load_official_checkpoint_file_and_errors(toy, tmp_path):
    state, model, _ = toy
    path = tmp_path / "magvit2.pt"
    torch.save({"model_state_dict": state, "version": "0.0.0", "config": b"pickled-config-bytes"}, path)
    loaded = load_official_tokenizer(path, norm_groups=4)
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
    broken = dict(state)
    broken["module.quantizers.project_in.weight"] = torch.zeros(6, 6)
    with pytest.raises(ValueError, match="project_in"):
        convert_official_state_dict(broken, model)
    missing = {k: v for k, v in state.items() if "decoder_layers.3." not in k}
    with pytest.raises(ValueError, match="missing"):
        convert_official_state_dict(missing, model)


def test_full_size_official_key_set_maps_onto_the_370m_layout():
    with torch.device("meta"):
        model = VideoTokenizer(official_nbp_config())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(370.4e6, rel=1e-3)
    state = _official_state_dict(128, device="meta")
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters())
    converted = convert_official_state_dict(state, model)  # raises on any unmapped / missing / mis-shaped key
    assert set(converted) == set(model.state_dict())


def test_official_fsq_bound_variant_and_index_round_trip():
    fsq = FSQ(LEVELS)
    z = torch.linspace(-4, 4, 801).view(1, 1, -1).expand(1, 6, -1).contiguous()
    L = torch.tensor(LEVELS, dtype=torch.float32).view(1, 6, 1)
    half_l = (L - 1) * (1 - 1e-3) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0)
    official = torch.tanh(z + torch.tan(offset / half_l)) * half_l - offset
    torch.testing.assert_close(fsq.bound(z), official)
    # the newer vector-quantize-pytorch variant ((1 + eps), atanh) is numerically different
    half_new = (L - 1) * (1 + 1e-3) / 2
    newer = torch.tanh(z + torch.atanh(offset / half_new)) * half_new - offset
    assert (fsq.bound(z) - newer).abs().max() > 1e-3
    # every index -> code -> a pre-activation whose official bound lands on the code -> same index
    indices = torch.arange(64000).view(1, 64000)
    codes = fsq.indices_to_codes(indices).double()
    Ld = L.double()
    half_ld, off_d = (Ld - 1) * (1 - 1e-3) / 2, torch.where(Ld % 2 == 0, 0.5, 0.0).double()
    target = codes * torch.floor(Ld / 2)
    # the extreme even-level code -1 is the limit of the bound (never reached exactly): stay just inside
    pre = torch.atanh(((target + off_d) / half_ld).clamp(-1 + 1e-9, 1 - 1e-9)) - torch.tan(off_d / half_ld)
    z_q, idx = fsq(pre.float())
    assert torch.equal(idx, indices)
    assert torch.equal(_ref_fsq_quantize(pre.float().unsqueeze(-1).unsqueeze(-1))[1].view(1, -1), indices)
