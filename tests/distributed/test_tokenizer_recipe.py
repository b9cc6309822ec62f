"""The tokenizer's training recipe: GAN losses, LeCam, adaptive weight, EMA, perceptual loss, resume, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.tokenizer.gan import (
    LeCamEMA,
    PatchDiscriminator3d,
    PerceptualLoss,
    fixed_devices,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
)
from data_prep.tokenizer.metrics import psnr, ssim
from tests.tokenizer_data import SMALL_MODEL, write_pattern


def _smooth_videos(n: int, t: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, t, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(t, size, size), mode="trilinear", align_corners=False)


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_discriminator_steps_lower_d_loss_and_separate_real_from_fake(kind):
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(3, channels=8, num_layers=1, norm_groups=4)
    real = _smooth_videos(2, t=1)
    fake = torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)

    def measure():
        with torch.no_grad():
            lr_, lf = disc(real), disc(fake)
            return float(discriminator_loss(lr_, lf, kind)), float(lr_.mean() - lf.mean())

    loss0, gap0 = measure()
    assert disc(real).shape == (2, 1, 1, 6, 6)
    assert disc(_smooth_videos(1, t=5)).shape == (1, 1, 5, 6, 6)  # videos and images share D
    for _ in range(10):
        loss = discriminator_loss(disc(real), disc(fake), kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, gap1 = measure()
    assert loss1 < loss0 - 0.1 and gap1 > gap0 + 0.2, (loss0, loss1, gap0, gap1)


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_generator_adversarial_loss_falls_against_a_fixed_discriminator(kind):
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(3, channels=8, num_layers=1, norm_groups=4).requires_grad_(False)
    fake = torch.nn.Parameter(torch.rand(2, 3, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    opt = torch.optim.Adam([fake], lr=1e-2)
    before = float(generator_loss(disc(fake), kind))
    for _ in range(10):
        loss = generator_loss(disc(fake), kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(generator_loss(disc(fake), kind))
    assert after < before - 1e-3, (before, after)
    assert all(p.grad is None for p in disc.parameters())


def test_loss_formulas_against_hand_values():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(0.25 + 0.5)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert float(discriminator_loss(real, fake, "non_saturating")) == pytest.approx(
        (sp(-0.5) + sp(-2.0)) / 2 + (sp(-2.0) + sp(0.0)) / 2)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(1.0)
    assert float(generator_loss(fake, "non_saturating")) == pytest.approx((sp(2.0) + sp(0.0)) / 2)
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(fake, "wasserstein")


def test_lecam_anchors_and_penalty_match_hand_computation():
    lecam = LeCamEMA(decay=0.9)
    real1, fake1 = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    lecam.update(real1, fake1)
    assert float(lecam.ema_real) == pytest.approx(0.1 * 2.0) and float(lecam.ema_fake) == pytest.approx(0.1 * -0.5)
    lecam.update(torch.tensor([0.0]), torch.tensor([1.0]))
    a_r, a_f = 0.9 * 0.2, 0.9 * -0.05 + 0.1 * 1.0
    assert float(lecam.ema_real) == pytest.approx(a_r) and float(lecam.ema_fake) == pytest.approx(a_f)
    real, fake = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.3])
    expected = np.mean([max(r - a_f, 0) ** 2 for r in (0.5, -1.0)]) + np.mean([max(a_r - f, 0) ** 2 for f in (0.0, 0.3)])
    assert float(lecam(real, fake)) == pytest.approx(expected, rel=1e-6)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    hidden, last = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = last(torch.tanh(hidden(x)))
    rec, gan = out.pow(2).mean(), -out[:, 0].mean() * 0.01
    weight = adaptive_generator_weight(rec, gan, last.weight)
    g_rec = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last.weight, retain_graph=True)[0]
    assert float(weight) == pytest.approx(float(g_rec.norm() / (g_gan.norm() + 1e-4)), rel=1e-6)
    assert not weight.requires_grad
    (rec + weight * gan).backward()  # the graph is still usable afterwards


def test_perceptual_loss_with_a_user_supplied_torchscript_network(tmp_path):
    torch.manual_seed(0)
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3)))
    path = tmp_path / "features.pt"
    net.save(str(path))
    loss_fn = PerceptualLoss(path)
    real = _smooth_videos(2, t=2)
    fake = (real + 0.3 * torch.randn_like(real)).requires_grad_(True)
    assert float(loss_fn(real, real)) == pytest.approx(0.0, abs=1e-10)
    loss = loss_fn(real, fake)
    assert float(loss) > 0
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss_fn.parameters())
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        PerceptualLoss(tmp_path / "missing.pt")


class _Normalised(torch.nn.Module):
    """A feature network that subtracts ImageNet-style means, made in ``forward`` or held as a buffer."""

    def __init__(self, as_buffer: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.as_buffer = as_buffer
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))

    def forward(self, x):
        mean = self.mean if self.as_buffer else torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        return self.conv(x - mean)


class _OnDevice(torch.nn.Module):
    """A scripted feature network whose code creates a tensor on a fixed device: a per-channel mean on the meta
    device (fails on any other), or a 0-dim CPU scale (a scalar to ops on any device)."""

    def __init__(self, scalar: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.scalar = scalar

    def forward(self, x):
        if self.scalar:
            return self.conv(x * torch.tensor(0.5, device=torch.device("cpu")))
        return self.conv(x - torch.tensor([0.485, 0.456, 0.406], device=torch.device("meta")).view(1, 3, 1, 1))


def test_a_network_whose_code_fixes_another_device_is_refused_unless_it_runs_there(tmp_path):
    """Tracing records a tensor made in forward with the device it was traced on, and neither map_location nor
    .to() moves it: PerceptualLoss refuses such a network for another device at once, after trying one frame
    there, and keeps one whose fixed tensor is harmless (a 0-dim CPU scalar). The GPU test does the same on CUDA."""
    for as_buffer in (False, True):
        torch.manual_seed(0)  # the same convolution in both
        torch.jit.trace(_Normalised(as_buffer), torch.rand(1, 3, 8, 8)).save(str(tmp_path / f"{as_buffer}.pt"))
    assert fixed_devices(torch.jit.load(str(tmp_path / "False.pt"))) == {torch.device("cpu")}
    assert fixed_devices(torch.jit.load(str(tmp_path / "True.pt"))) == set()
    real = _smooth_videos(1, t=2)  # on their own device both run, and alike
    losses = [float(PerceptualLoss(tmp_path / f"{b}.pt")(real, real + 0.1)) for b in (False, True)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] > 0

    for scalar in (False, True):
        torch.jit.script(_OnDevice(scalar)).save(str(tmp_path / f"on_device_{scalar}.pt"))
    with pytest.raises(ValueError, match="creates tensors on meta .* not on the training device cpu"):
        PerceptualLoss(tmp_path / "on_device_False.pt")
    loss_fn = PerceptualLoss(tmp_path / "on_device_True.pt", device="meta")  # a CPU scalar works on meta tensors
    assert fixed_devices(loss_fn.net) == {torch.device("cpu"), torch.device("meta")}  # scripted: both branches
    assert next(loss_fn.net.parameters()).is_meta


# ----------------------------------------------------------------------------------- metrics


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on one [0, 1] image pair: Gaussian 11x11 (sigma 1.5), valid positions, loops."""
    coords = np.arange(11) - 5
    g = np.exp(-coords**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_and_psnr_against_independent_references():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 1, 14, 13, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    ref = _ssim_reference(((a[0, 0, 0] + 1) / 2).numpy(), ((b[0, 0, 0] + 1) / 2).numpy())
    assert float(ssim(a, b)[0]) == pytest.approx(ref, rel=1e-9)
    assert float(ssim(a, a)[0]) == pytest.approx(1.0, rel=1e-12)
    # constant frames: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    x, y = torch.full((1, 3, 2, 12, 12), -0.5), torch.full((1, 3, 2, 12, 12), 0.5)
    assert float(ssim(x, y)[0]) == pytest.approx((2 * 0.25 * 0.75 + 1e-4) / (0.25**2 + 0.75**2 + 1e-4), rel=1e-9)
    assert float(psnr(x, y)[0]) == pytest.approx(10 * math.log10(4 / 1.0))


# ------------------------------------------------------------------------- training loop


@pytest.fixture(scope="module")
def recipe_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    write_pattern(root / "videos" / "pattern.mp4")
    config = root / "small.yaml"
    config.write_text(SMALL_MODEL)
    return root, config


def _opts(root: Path, config: Path, name: str, **overrides):
    from data_prep.tokenizer.train import TrainOptions

    values = dict(config=str(config), data=str(root / "videos"), output=str(root / name / "tok.safetensors"),
                  resolution=16, num_frames=5, train_steps=4, batch_size=1, lr=1e-3, warmup_steps=2, seed=3,
                  log_interval=100, eval_clips=1, image_every=2, image_batch_size=2, disc_weight=0.5,
                  disc_start=1, disc_channels=4, disc_layers=2, lecam_weight=0.1, lecam_decay=0.9,
                  ema_decay=0.8, save=str(root / name / "ckpt"), holdout_fraction=0.25)
    values.update(overrides)
    return TrainOptions(**values)


def _state(save_dir: str, step: int):
    folder = Path(save_dir) / f"iter_{step:07d}"
    return (torch.load(folder / "state.pt", weights_only=True),
            torch.load(folder / "rng_rank0.pt", weights_only=True))


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if key not in ("options", "elapsed"):
                _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_gan_ema_training_resumes_bitwise_and_ema_matches_hand_computation(recipe_setup, monkeypatch):
    from data_prep.tokenizer import load_tokenizer
    from data_prep.tokenizer.train import latest_iteration, train_tokenizer

    root, config = recipe_setup
    full = _opts(root, config, "full", save_interval=1)
    result = train_tokenizer(full)
    assert result["steps"] == 4 and latest_iteration(full.save) == 4
    # interrupted at step 2 (exit_interval), resumed to step 4
    part = _opts(root, config, "resumed", exit_interval=2)
    assert train_tokenizer(part)["steps"] == 2 and latest_iteration(part.save) == 2
    train_tokenizer(_opts(root, config, "resumed", load=part.save))
    assert latest_iteration(part.save) == 4
    state_full, rng_full = _state(full.save, 4)
    state_res, rng_res = _state(part.save, 4)
    for key in ("model", "discriminator", "ema", "optimizer", "disc_optimizer", "lecam"):
        assert key in state_full
    _assert_same(state_full, state_res)
    _assert_same(rng_full, rng_res)
    full_tok, res_tok = load_tokenizer(full.output), load_tokenizer(part.output)
    _assert_same(full_tok.state_dict(), res_tok.state_dict())
    # EMA by hand from the raw weights saved after every step: e_1 = p_1, e_k = d e_{k-1} + (1 - d) p_k
    ema = None
    for step in range(1, 5):
        params = _state(full.save, step)[0]["model"]
        ema = dict(params) if ema is None else {k: 0.8 * ema[k] + 0.2 * params[k] for k in ema}
    ema_state = state_full["ema"]
    assert int(ema_state["n_averaged"]) == 4
    for key, value in ema.items():
        torch.testing.assert_close(ema_state[f"module.{key}"], value, rtol=1e-5, atol=1e-6)
    # the exported tokenizer holds the EMA weights
    for key, value in full_tok.state_dict().items():
        assert torch.equal(value, ema_state[f"module.{key}"])
    # the discriminator trained (it differs from its initialization) and LeCam anchors moved
    assert float(state_full["lecam"]["ema_real"]) != 0.0
    # the eval launcher reproduces the trainer's held-back PSNR and writes its PNG and JSON
    import json

    from megatron_nbp.cli import eval_tokenizer

    png, out = root / "full" / "recon.png", root / "full" / "eval.json"
    assert eval_tokenizer.main(["--tokenizer", full.output, "--data", full.data, "--resolution", "16",
                                "--num-frames", "5", "--holdout-fraction", "0.25", "--max-clips", "1",
                                "--png", str(png), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["psnr_db"] == pytest.approx(result["psnr"], abs=1e-4) and 0 < report["ssim"] <= 1
    assert png.stat().st_size > 0 and report["fvd"] is None and report["encode_precision"] == "fp32"
    assert report["fp32_means"] == "fp32"  # on the CPU; "fp32 (TF32 convolutions)" on a GPU by default
    # --encode-precision bf16: the metrics of bf16-encoded ids, the fp32 ids' metrics beside them and how many
    # ids bf16 changed, each against a direct computation on the same held-back clip
    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.metrics import psnr
    from data_prep.tokenizer.precision import bf16_token_agreement, encode_tokens

    out_bf16 = root / "full" / "eval_bf16.json"
    used = []  # the precisions the launcher encodes at (on this tiny clip bf16 may change no id at all)
    monkeypatch.setattr(eval_tokenizer, "encode_tokens",
                        lambda model, clips, dtype: used.append(dtype) or encode_tokens(model, clips, dtype))
    assert eval_tokenizer.main(["--tokenizer", full.output, "--data", full.data, "--resolution", "16",
                                "--num-frames", "5", "--holdout-fraction", "0.25", "--max-clips", "1",
                                "--encode-precision", "bf16", "--json", str(out_bf16)]) == 0
    bf16 = json.loads(out_bf16.read_text())
    assert used == ["bf16", "fp32"], used
    assert bf16["encode_precision"] == "bf16" and bf16["ids_vs_fp32"]["positions"] == 1 * 2 * 2 * 2
    assert bf16["fp32_ids"]["psnr_db"] == pytest.approx(report["psnr_db"], abs=1e-9)
    bank = load_clip_bank(full.data, 16, 5, holdout_fraction=0.25)
    clips = torch.stack([bank.clip(*w) for w in bank.eval_windows[:1]])
    with torch.no_grad():
        direct = float(psnr(clips, full_tok.decode(encode_tokens(full_tok, clips, "bf16")).clamp(-1, 1)).mean())
    assert bf16["psnr_db"] == pytest.approx(direct, abs=1e-6)
    assert bf16["ids_vs_fp32"]["equal"] == pytest.approx(bf16_token_agreement(full_tok, clips), abs=1e-6)
    assert bf16["ids_vs_fp32"]["equal"] <= bf16["ids_vs_fp32"]["within_one_fsq_step"] <= 1
    print(f"eval --encode-precision bf16: {bf16['ids_vs_fp32']}, PSNR {bf16['psnr_db']:.4f} dB vs fp32 ids "
          f"{report['psnr_db']:.4f} dB")


def test_holdout_split_keeps_evaluation_clips_out_of_training(recipe_setup):
    from data_prep.tokenizer.clips import load_clip_bank

    root, _ = recipe_setup
    bank = load_clip_bank(root / "videos", 16, 5, holdout_fraction=0.25)  # 24 frames: train 0..17, eval 18..23
    assert max(s + 4 for _, s in bank.windows) == 17
    assert bank.eval_windows == [(0, 18)]
    with pytest.raises(ValueError, match="holdout_fraction"):
        load_clip_bank(root / "videos", 32, 5, holdout_fraction=1.0)


def test_training_with_recomputed_blocks_equals_training_without(recipe_setup):
    """--recompute-granularity full through the trainer (GAN, LeCam and EMA on): the same weights after the
    same steps, bitwise, as the run that stores every activation."""
    from data_prep.tokenizer import load_tokenizer
    from data_prep.tokenizer.train import train_tokenizer

    root, config = recipe_setup
    runs = {}
    for name, granularity in (("stored", None), ("recomputed", "full")):
        opts = _opts(root, config, f"recompute_{name}", train_steps=3, save=None, recompute_granularity=granularity)
        runs[name] = (train_tokenizer(opts), load_tokenizer(opts.output).state_dict())
    assert runs["stored"][0]["final_loss"] == runs["recomputed"][0]["final_loss"]
    _assert_same(runs["stored"][1], runs["recomputed"][1])
