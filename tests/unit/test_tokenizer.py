"""Tests of the FSQ quantizer, the causal video tokenizer, its checkpoints and its training loop."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data_prep.tokenizer.checkpoint import read_tokenizer_metadata
from data_prep.tokenizer import (
    FSQ,
    TokenizerConfig,
    VideoTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_sha256,
)

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tokenizer" / "tiny.yaml"
PAPER_YAML = REPO / "configs" / "tokenizer" / "magvit2.yaml"
LEVELS = [8, 8, 8, 5, 5, 5]


@pytest.fixture(scope="module")
def tiny() -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig.from_yaml(TINY_YAML)).eval()


def _video(b=1, t=17, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------- FSQ


def test_fsq_codebook_size_and_index_round_trip_over_all_codes():
    fsq = FSQ(LEVELS)
    assert fsq.codebook_size == 8 * 8 * 8 * 5 * 5 * 5 == 64000
    indices = torch.arange(64000).view(2, 32000)
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (2, 6, 32000) and codes.dtype == torch.float32
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    # all 64,000 code vectors are distinct grid points in [-1, 1]
    flat = codes.permute(0, 2, 1).reshape(-1, 6)
    assert torch.unique(flat, dim=0).shape[0] == 64000
    assert flat.min() == -1.0 and flat.max() <= 1.0


def test_fsq_mixed_radix_order_first_channel_least_significant():
    fsq = FSQ(LEVELS)
    # digits d -> code (d - L//2) / (L//2); index = d0 + 8 d1 + 64 d2 + 512 d3 + 2560 d4 + 12800 d5
    for digits in [(1, 0, 0, 0, 0, 0), (0, 1, 0, 0, 0, 0), (0, 0, 0, 1, 0, 0), (7, 7, 7, 4, 4, 4), (3, 2, 5, 1, 0, 4)]:
        code = torch.tensor([(d - L // 2) / (L // 2) for d, L in zip(digits, LEVELS)]).view(1, 6)
        expected = sum(d * b for d, b in zip(digits, [1, 8, 64, 512, 2560, 12800]))
        assert int(fsq.codes_to_indices(code)) == expected


def test_fsq_forward_values_on_grid_within_bounds_and_consistent():
    fsq = FSQ(LEVELS)
    z = torch.randn(3, 6, 4, 5, 5) * 4
    z_q, idx = fsq(z)
    assert z_q.shape == z.shape and idx.shape == (3, 4, 5, 5) and idx.dtype == torch.int64
    assert z_q.min() >= -1 and z_q.max() <= 1
    assert idx.min() >= 0 and idx.max() < 64000
    assert torch.equal(fsq.indices_to_codes(idx), z_q)
    # every level is reachable and nothing else: even L -> {-L/2..L/2-1}/(L/2), odd L -> {-(L-1)/2..}/((L-1)/2)
    sweep = torch.linspace(-20, 20, 4001).view(1, 1, -1).expand(1, 6, -1).contiguous()
    q = fsq.quantize(sweep)
    for c, L in enumerate(LEVELS):
        half = L // 2
        expected = torch.tensor([(k - half) / half for k in range(L)])
        assert torch.equal(torch.unique(q[0, c]), expected)


def test_fsq_bound_matches_paper_formula_and_zero_maps_to_zero():
    fsq = FSQ(LEVELS)
    z = torch.linspace(-3, 3, 61, dtype=torch.float64).view(1, 1, -1).expand(1, 6, -1)
    got = fsq.bound(z)
    for c, L in enumerate(LEVELS):
        half_l = (L - 1) * (1 - 1e-3) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        expected = torch.tanh(z[0, c] + math.tan(offset / half_l)) * half_l - offset
        torch.testing.assert_close(got[0, c], expected, rtol=0, atol=1e-12)
    z_q, _ = fsq(torch.zeros(1, 6, 1))
    assert torch.equal(z_q, torch.zeros(1, 6, 1))


def test_fsq_straight_through_gradient_equals_bound_derivative():
    fsq = FSQ(LEVELS)
    z = (torch.randn(2, 6, 7, dtype=torch.float64) * 0.7).requires_grad_()
    z_q, _ = fsq(z)
    z_q.sum().backward()
    # d/dz [round_ste(bound(z)) / (L//2)] = half_l * (1 - tanh^2(z + shift)) / (L//2)
    for c, L in enumerate(LEVELS):
        half_l = (L - 1) * (1 - 1e-3) / 2
        shift = math.tan((0.5 if L % 2 == 0 else 0.0) / half_l)
        expected = half_l * (1 - torch.tanh(z.detach()[:, c] + shift) ** 2) / (L // 2)
        torch.testing.assert_close(z.grad[:, c], expected)
    assert (z.grad.abs() > 0).all()


def test_fsq_errors():
    with pytest.raises(ValueError, match="levels"):
        FSQ([8, 1])
    fsq = FSQ(LEVELS)
    with pytest.raises(ValueError, match="D=6"):
        fsq(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match=r"\[0, 64000\)"):
        fsq.indices_to_codes(torch.tensor([64000]))
    with pytest.raises(TypeError, match="integer"):
        fsq.indices_to_codes(torch.tensor([1.0]))


# ------------------------------------------------------------------------------ config / shapes


def test_tiny_config_shapes_video_and_decode(tiny):
    assert tiny.codebook_size == 64000 and tiny.config.levels == LEVELS
    assert tiny.latent_shape(17, 64, 64) == (5, 8, 8)
    assert tiny.latent_shape(17, 128, 128) == (5, 16, 16)
    with torch.no_grad():
        idx = tiny.encode(_video(2, 17, 64, 64))
        assert idx.shape == (2, 5, 8, 8) and idx.dtype == torch.int64
        assert idx.min() >= 0 and idx.max() < 64000
        out = tiny.decode(idx)
    assert out.shape == (2, 3, 17, 64, 64) and out.dtype == torch.float32


def test_image_is_a_one_frame_video_and_equals_first_latent_frame(tiny):
    video = _video(1, 9, 32, 32, seed=3)
    with torch.no_grad():
        image_tokens = tiny.encode(video[:, :, :1])
        video_tokens = tiny.encode(video)
        image_out = tiny.decode(image_tokens)
        video_out = tiny.decode(video_tokens)
    assert image_tokens.shape == (1, 1, 4, 4) and image_out.shape == (1, 3, 1, 32, 32)
    assert torch.equal(image_tokens, video_tokens[:, :1])
    assert torch.equal(image_out, video_out[:, :, :1])


def test_paper_config_constructs_and_shapes():
    config = TokenizerConfig.from_yaml(PAPER_YAML)
    assert config.base_channels == 128 and config.channel_multipliers == [1, 2, 2, 4]
    model = VideoTokenizer(config).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 100e6 < params < 400e6, params  # paper-size (a few hundred M parameters)
    assert model.latent_shape(17, 128, 128) == (5, 16, 16)
    with torch.no_grad():  # the real paper-size network, on a cheap 1x16x16 image
        assert model.encode(_video(1, 1, 16, 16)).shape == (1, 1, 2, 2)
    # A full 17x128x128 forward of the paper-size model takes far longer than 15 s on 2 CPU cores, so the
    # shapes are checked on a reduced copy (width 4, one residual unit per level) with the same strides,
    # channel multipliers and temporal layout.
    narrow = VideoTokenizer(
        dataclasses.replace(config, base_channels=4, norm_groups=4, num_res_blocks=1, num_mid_blocks=0)
    ).eval()
    with torch.no_grad():
        idx = narrow.encode(_video(1, 17, 128, 128))
        assert idx.shape == (1, 5, 16, 16)
        assert narrow.decode(idx).shape == (1, 3, 17, 128, 128)


# -------------------------------------------------------------------------------- causality


def test_encoder_is_temporally_causal_exactly(tiny):
    video = _video(1, 17, 32, 32, seed=1)
    with torch.no_grad():
        base_latent = tiny.encoder(video)
        base_tokens = tiny.encode(video)
        for t in range(4):  # latent t covers input frames 0..4t
            changed = video.clone()
            changed[:, :, 4 * t + 1 :] = _video(1, 16 - 4 * t, 32, 32, seed=10 + t)
            latent = tiny.encoder(changed)
            assert torch.equal(latent[:, :, : t + 1], base_latent[:, :, : t + 1]), t
            assert torch.equal(tiny.encode(changed)[:, : t + 1], base_tokens[:, : t + 1]), t
            assert not torch.equal(latent[:, :, t + 1 :], base_latent[:, :, t + 1 :]), t  # test is sensitive


def test_decoder_is_temporally_causal_exactly(tiny):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64000, (1, 5, 4, 4), generator=g)
    with torch.no_grad():
        base = tiny.decode(tokens)
        for t in range(4):  # output frames 0..4t come from latents 0..t
            changed = tokens.clone()
            changed[:, t + 1 :] = torch.randint(0, 64000, (1, 4 - t, 4, 4), generator=g)
            out = tiny.decode(changed)
            assert torch.equal(out[:, :, : 4 * t + 1], base[:, :, : 4 * t + 1]), t
            assert not torch.equal(out[:, :, 4 * t + 1 :], base[:, :, 4 * t + 1 :]), t


def test_spatial_stride_4_keeps_the_causal_structure_and_four_times_the_tokens():
    """spatial_downsample [True, True, False]: 17x64x64 -> 5x16x16 tokens and back to 17x64x64; the encoder
    stays exactly causal in time; a height that is a multiple of 4 but not of 8 is accepted."""
    torch.manual_seed(0)
    config = dataclasses.replace(TokenizerConfig.from_yaml(TINY_YAML), spatial_downsample=[True, True, False])
    assert config.spatial_stride == 4
    model = VideoTokenizer(config).eval()
    assert model.latent_shape(17, 64, 64) == (5, 16, 16) and model.latent_shape(1, 36, 20) == (1, 9, 5)
    video = _video(1, 17, 64, 64, seed=4)
    with torch.no_grad():
        tokens = model.encode(video)
        assert tokens.shape == (1, 5, 16, 16)
        assert model.decode(tokens).shape == (1, 3, 17, 64, 64)
        changed = video.clone()
        changed[:, :, 5:] = _video(1, 12, 64, 64, seed=5)          # frames after latent 1's window
        other = model.encode(changed)
    assert torch.equal(other[:, :2], tokens[:, :2]) and not torch.equal(other[:, 2:], tokens[:, 2:])
    with pytest.raises(ValueError, match="height must be a positive multiple of the spatial stride 4"):
        model.latent_shape(17, 66, 64)
    with pytest.raises(ValueError, match="spatial_downsample"):
        TokenizerConfig(spatial_downsample=[False, False, False])


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 16, 32, 32), r"1 \+ 4n"),
        ((1, 3, 0, 32, 32), r"1 \+ 4n"),
        ((1, 3, 17, 30, 32), "height must be a positive multiple of the spatial stride 8"),
        ((1, 3, 17, 32, 36), "width must be a positive multiple of the spatial stride 8"),
        ((1, 4, 17, 32, 32), "3 channels"),
        ((3, 17, 32, 32), r"\[B, C, T, H, W\]"),
    ],
)
def test_encode_rejects_bad_videos(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(torch.zeros(shape))


def test_encode_rejects_integer_video_and_decode_rejects_bad_indices(tiny):
    with pytest.raises(TypeError, match="floating point"):
        tiny.encode(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, T', H', W'\]"):
        tiny.decode(torch.zeros(5, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64000\)"):
        tiny.decode(torch.full((1, 1, 2, 2), -1))


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="channel_multipliers"):
        TokenizerConfig(channel_multipliers=[1, 2, 4])
    with pytest.raises(ValueError, match="temporal_downsample"):
        TokenizerConfig(temporal_downsample=[True, True, True])
    with pytest.raises(ValueError, match="norm_groups"):
        TokenizerConfig(base_channels=20, norm_groups=8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  base_channel: 16\n")
    with pytest.raises(ValueError, match="base_channel"):
        TokenizerConfig.from_yaml(bad)
    with pytest.raises(FileNotFoundError):
        TokenizerConfig.from_yaml(tmp_path / "missing.yaml")
    config = TokenizerConfig.from_yaml(TINY_YAML)
    assert TokenizerConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_and_sha256(tiny, tmp_path):
    path = save_tokenizer(tiny, tmp_path / "tok.safetensors", extra_metadata={"note": "x", "steps": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.safetensors"]  # no temp file left
    loaded = load_tokenizer(path)
    assert not loaded.training and loaded.config == tiny.config
    video = _video(1, 5, 32, 32, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), tiny.encode(video))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert tokenizer_sha256(path) == digest == tokenizer_sha256(path)
    again = save_tokenizer(loaded, tmp_path / "again.safetensors", extra_metadata={"note": "x", "steps": 3})
    assert tokenizer_sha256(again) == digest  # same weights + metadata -> same bytes
    stored = load_file(str(path))
    assert set(stored) == set(tiny.state_dict()) and all(t.dtype == torch.float32 for t in stored.values())
    meta = read_tokenizer_metadata(path)
    assert meta["config"] == tiny.config.to_dict() and meta["extra"] == {"note": "x", "steps": 3}


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a megatron-nbp tokenizer checkpoint"):
        load_tokenizer(foreign)
    text = tmp_path / "text.safetensors"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_tokenizer(text)
    with pytest.raises(ValueError, match="keys must be strings"):
        save_tokenizer(VideoTokenizer(TokenizerConfig.from_yaml(TINY_YAML)), tmp_path / "x.safetensors",
                       extra_metadata={1: "x"})


# ---------------------------------------------------------------------------------- training


def _write_moving_pattern(path: Path, frames: int = 24, size: int = 32) -> None:
    from data_prep.video_io import write_mp4

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    video = []
    for t in range(frames):
        r = 127.5 + 100 * np.sin((xx + 2 * t) / 5.0)
        g = 127.5 + 100 * np.cos((yy - t) / 7.0)
        b = 127.5 + 60 * np.sin((xx + yy + 3 * t) / 9.0)
        video.append(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))
    write_mp4(np.stack(video), path, fps=8)


def test_short_training_run_improves_reconstruction(tmp_path):
    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.train import TrainOptions, evaluate_psnr, train_tokenizer

    data = tmp_path / "videos"
    _write_moving_pattern(data / "pattern.mp4")
    (data / "broken.mp4").write_bytes(b"not a video")  # must be skipped with a warning, not fatal
    config = tmp_path / "small.yaml"
    config.write_text(
        "model:\n  base_channels: 8\n  channel_multipliers: [1, 1, 2, 2]\n  num_res_blocks: 1\n"
        "  num_mid_blocks: 0\n  temporal_downsample: [true, true, false]\n  norm_groups: 4\n"
    )
    opts = TrainOptions(config=str(config), data=str(data), output=str(tmp_path / "tok.safetensors"),
                        resolution=32, num_frames=5, train_steps=30, batch_size=2, lr=3e-3, warmup_steps=3,
                        log_interval=10, seed=7, image_every=5, image_batch_size=4, eval_clips=8)
    torch.manual_seed(opts.seed)  # same initialization as train_tokenizer
    untrained = VideoTokenizer(TokenizerConfig.from_yaml(config))
    bank = load_clip_bank(data, 32, 5)
    assert bank.names == ["pattern.mp4"]
    psnr_before, _ = evaluate_psnr(untrained, bank, max_clips=8)
    result = train_tokenizer(opts)
    assert result["steps"] == 30
    assert result["psnr"] > psnr_before + 3.0, (psnr_before, result)
    trained = load_tokenizer(opts.output)
    assert evaluate_psnr(trained, bank, max_clips=8)[0] == pytest.approx(result["psnr"], abs=1e-4)


@pytest.mark.parametrize("pad_mode", ["replicate", "zeros"])
def test_causal_conv_keeps_a_channels_last_input_channels_last(pad_mode):
    """The causal time padding of a channels-last 3D input stays channels-last, so the convolution gets it
    without a layout conversion (torch.cat of mixed layouts returns the default one); same values."""
    from data_prep.tokenizer.layers import CausalConv3d

    torch.manual_seed(0)
    conv = CausalConv3d(8, 8, 3, pad_mode=pad_mode)
    x = torch.randn(2, 8, 5, 6, 6)
    seen = []
    conv.conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        expected = conv(x)
        conv.to(memory_format=torch.channels_last_3d)
        out = conv(x.contiguous(memory_format=torch.channels_last_3d))
    assert not seen[0].is_contiguous(memory_format=torch.channels_last_3d)  # the default layout stays default
    assert seen[1].is_contiguous(memory_format=torch.channels_last_3d) and not seen[1].is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_recomputed_residual_blocks_give_the_same_gradients_with_less_stored(bf16):
    """set_recompute("full") (Megatron-LM's --recompute-granularity full): the same reconstruction and the
    same gradients, bitwise (the blocks run the same kernels again, autocast replayed), while the tensors kept
    for the backward pass shrink to the blocks' inputs and the layers between them."""
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer

    cfg = TokenizerConfig(base_channels=8, channel_multipliers=[1, 2, 2, 2], num_res_blocks=2, num_mid_blocks=1,
                          norm_groups=4)
    torch.manual_seed(0)
    model = VideoTokenizer(cfg)
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def run(granularity):
        model.set_recompute(granularity)
        model.zero_grad(set_to_none=True)
        stored = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                recon, _ = model(video)
        torch.nn.functional.mse_loss(recon.float(), video).backward()
        return recon.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(stored)

    recon_full, grads_full, stored_full = run(None)
    recon_re, grads_re, stored_re = run("full")
    assert torch.equal(recon_full, recon_re)
    assert grads_full.keys() == grads_re.keys()
    for name, grad in grads_full.items():
        assert torch.equal(grad, grads_re[name]), name
    assert stored_re < 0.5 * stored_full, (stored_re, stored_full)
    with pytest.raises(ValueError, match="selective"):
        model.set_recompute("selective")
