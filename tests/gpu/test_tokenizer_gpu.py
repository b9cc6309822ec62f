"""GPU-only checks of the data side (skipped without CUDA; run by bench/gpu_check.sh): tokenizer training
steps on cuda in fp32 and bf16 against a CPU fp32 step, micro-batches against one pass in bf16, save /
resume on cuda with the CUDA RNG state, bf16 vs fp32 token agreement (printed), and the tokenization job on
cuda with decode workers against the same job on the CPU.

Tolerances: cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa), so a cuda fp32 loss is
compared with the CPU's to 1% relative; bf16 autocast (8-bit mantissa in the convolutions, fp32 losses)
to 3% of the cuda fp32 loss. Both are one step of a randomly initialised small tokenizer, where the loss
is a mean over ~10^4 pixels, so rounding errors average out well below these bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.device import choose_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from data_prep.synthetic import write_pattern_video

    root = tmp_path_factory.mktemp("gpu_tok")
    for i in range(4):
        write_pattern_video(root / "videos" / f"c{i % 2}" / f"v{i}.mp4", num_frames=24, height=72, width=96, seed=i)
    return root


def _opts(root: Path, **overrides):
    from data_prep.tokenizer.config import TrainOptions

    values = dict(config=str(REPO / "configs/tokenizer/tiny.yaml"), data=str(root / "videos"),
                  output=str(root / "tok.safetensors"), resolution=32, num_frames=9, train_steps=2, batch_size=2,
                  lr=1e-3, warmup_steps=1, seed=3, log_interval=100, eval_clips=2, disc_weight=0.1, disc_start=0,
                  lecam_weight=0.001, ema_decay=0.9, device="cuda:0")
    values.update(overrides)
    return TrainOptions(**values)


def _one_step(root: Path, device: str, precision: str, micro_batch_size: int | None = None, **overrides):
    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.train import _checked_config, _train_step, _Trainables

    opts = _opts(root, device=device, precision=precision, **overrides)
    t = _Trainables.build(opts, _checked_config(opts), 1, choose_device(device))
    bank = load_clip_bank(opts.data, opts.resolution, opts.num_frames)
    out = _train_step(opts, t, bank, torch.Generator().manual_seed(0), 0, 0.0, micro_batch_size=micro_batch_size)
    return t, out


def test_micro_batches_on_cuda_in_bf16_accumulate_the_gradients_of_one_pass(videos):
    """4 clips as 2 micro-batches of 2 vs one pass, bf16, GAN from the first step (adaptive weight off,
    clipping off): the same loss within 3% and, after the step, Adam's first moments of both networks
    (0.1 x the gradient) within 5% of their largest magnitude (bf16 convolutions of another batch shape
    round differently); a gradient scaled by the micro-batch count would be off by 100%."""
    settings = dict(batch_size=4, adaptive_weight=False, grad_clip=0.0)
    t_one, one = _one_step(videos, "cuda:0", "bf16", **settings)
    t_micro, micro = _one_step(videos, "cuda:0", "bf16", micro_batch_size=2, **settings)
    assert float(micro.loss) == pytest.approx(float(one.loss), rel=0.03)
    for name in ("optimizer", "opt_d"):
        a, b = getattr(t_one, name).state, getattr(t_micro, name).state
        moments_a = [s["exp_avg"] for s in a.values()]
        moments_b = [s["exp_avg"] for s in b.values()]
        scale = max(float(m.abs().max()) for m in moments_a)
        worst = max(float((x - y).abs().max()) for x, y in zip(moments_a, moments_b)) / scale
        print(f"{name}: micro-batches vs one pass, worst first-moment difference {worst:.3e} of the largest")
        assert scale > 0 and worst <= 0.05, (name, worst)


def test_training_step_on_cuda_in_fp32_and_bf16(videos):
    _, cpu = _one_step(videos, "cpu", "fp32")
    t32, fp32 = _one_step(videos, "cuda:0", "fp32")
    t16, bf16 = _one_step(videos, "cuda:0", "bf16")
    print(f"tokenizer step losses: cpu fp32 {float(cpu.loss):.6f}, cuda fp32 {float(fp32.loss):.6f}, "
          f"cuda bf16 {float(bf16.loss):.6f}")
    assert float(fp32.loss) == pytest.approx(float(cpu.loss), rel=0.01)
    assert float(bf16.loss) == pytest.approx(float(fp32.loss), rel=0.03)
    for t in (t32, t16):
        assert all(p.device == CUDA and p.dtype == torch.float32 for p in t.model.parameters())
        assert all(p.device == CUDA for p in t.ema.parameters()) and t.lecam.ema_real.device == CUDA
        assert all(v.dtype == torch.float32 and v.device == CUDA for s in t.optimizer.state.values()
                   for k, v in s.items() if k != "step")
        assert "cuda" in t.rank_state(torch.Generator())
    assert bf16.recon.dtype == torch.float32 and bf16.loss.dtype == torch.float32


def test_training_saves_and_resumes_on_cuda_and_the_checkpoint_loads_on_cpu(videos):
    from data_prep.tokenizer import load_tokenizer
    from data_prep.tokenizer.train import latest_iteration, train_tokenizer

    save = videos / "ckpt"
    first = train_tokenizer(_opts(videos, save=str(save), exit_interval=1))
    assert first["device"] == "cuda:0" and first["precision"] == "bf16" and latest_iteration(save) == 1
    rng = torch.load(save / "iter_0000001" / "rng_rank0.pt", weights_only=True)
    assert "cuda" in rng
    resumed = train_tokenizer(_opts(videos, save=str(save), load=str(save)))
    assert resumed["steps"] == 2 and np.isfinite(resumed["final_loss"]) and latest_iteration(save) == 2
    assert next(load_tokenizer(resumed["output"]).parameters()).device.type == "cpu"
    # a CUDA checkpoint resumes on the CPU too (the settings do not name a device)
    cpu = train_tokenizer(_opts(videos, save=str(save), load=str(save), device="cpu", train_steps=3,
                                output=str(videos / "tok_cpu.safetensors")))
    assert cpu["steps"] == 3 and cpu["device"] == "cpu"


def test_bf16_token_agreement_on_cuda_is_reported(capsys):
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer
    from data_prep.tokenizer.precision import bf16_token_agreement

    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")).to(CUDA).eval()
    clip = torch.rand(2, 3, 17, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rate = bf16_token_agreement(tok, clip, batch_size=2)
    with capsys.disabled():
        print(f"\nbf16 vs fp32 token agreement on cuda (random tiny tokenizer, 2 random 17x64x64 clips): {rate:.4f}")
    assert 0.5 < rate <= 1.0


def test_tokenize_job_on_cuda_with_decode_workers(videos, tmp_path, capsys):
    from data_prep.shards import iter_shard, read_manifest
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer
    from data_prep.tokenize_job import TokenizeConfig, run_tokenize_job

    torch.manual_seed(0)
    ckpt = save_tokenizer(VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")),
                          tmp_path / "tok.safetensors")
    cfg = TokenizeConfig(input_dir=videos / "videos", output_dir=tmp_path / "cpu", tokenizer=ckpt, num_frames=9,
                         resolution=32, videos_per_shard=2, batch_size=4, progress=False, device="cpu")
    cpu = run_tokenize_job(cfg)
    gpu = run_tokenize_job(cfg.replace(output_dir=tmp_path / "gpu", device="auto", num_workers=2))
    assert gpu == cpu  # same clips, shards and failures (fp32: tokens differ only by TF32 rounding)

    def tokens(out: Path) -> np.ndarray:
        shards = read_manifest(out)["shards"]
        return np.concatenate([t.ravel() for e in shards for _, t, _ in iter_shard(out / e["name"])])

    rate = float((tokens(tmp_path / "cpu") == tokens(tmp_path / "gpu")).mean())
    with capsys.disabled():
        print(f"\ntokenization job: cuda fp32 (TF32 convolutions) vs cpu fp32 token agreement: {rate:.4f}")
    assert rate >= 0.8


def test_clip_conversion_on_cuda_is_bitwise_the_cpus():
    """Every uint8 value converts to the same float32 bits on the GPU as on the CPU (a division by a host
    scalar would be a multiplication by its reciprocal on CUDA: 111 of 256 values one ulp off)."""
    from data_prep.tokenize_job import frames_batch_to_tensor

    clips = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16, 1).expand(2, 3, 16, 16, 3).contiguous()
    cpu = frames_batch_to_tensor(clips, torch.device("cpu"))
    gpu = frames_batch_to_tensor(clips, CUDA).cpu()
    assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32))
    values = torch.arange(256, dtype=torch.float32)
    off = int(((values.to(CUDA) * (1 / 127.5) - 1.0).cpu() != values / 127.5 - 1.0).sum())
    print(f"uint8 -> [-1, 1] on cuda: every value bitwise equal to the CPU's (a reciprocal multiplication: "
          f"{off} of 256 off)")


def test_a_traced_perceptual_network_runs_on_cuda_and_one_fixed_to_the_cpu_is_refused(tmp_path):
    """A network holding its constants as buffers loads onto the GPU and gives the CPU's loss; one whose traced
    code creates a tensor on the CPU in forward is refused at construction, not at the first training step."""
    from data_prep.tokenizer.gan import PerceptualLoss
    from tests.distributed.test_tokenizer_recipe import _Normalised

    torch.manual_seed(0)
    for as_buffer in (False, True):
        torch.jit.trace(_Normalised(as_buffer), torch.rand(1, 3, 8, 8)).save(str(tmp_path / f"{as_buffer}.pt"))
    with pytest.raises(ValueError, match="creates tensors on cpu"):
        PerceptualLoss(tmp_path / "False.pt", device=CUDA)
    real = torch.rand(1, 3, 2, 8, 8)
    cpu = float(PerceptualLoss(tmp_path / "True.pt")(real, real + 0.1))
    gpu = float(PerceptualLoss(tmp_path / "True.pt", device=CUDA)(real.to(CUDA), real.to(CUDA) + 0.1))
    assert gpu == pytest.approx(cpu, rel=1e-3) and cpu > 0


def test_a_batchs_ids_are_read_back_while_the_next_batch_still_runs(tmp_path):
    """The job queues batch 2 before waiting for batch 1's ids: the wait must end when batch 1 is done, not when
    everything queued is (a plain ``.cpu()`` there is queued behind batch 2's kernels and waits for them), and
    the ids copied asynchronously must equal the tokenizer's own."""
    from data_prep.tokenize_job import TokenizeConfig, _ShardBuilder, frames_batch_to_tensor
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/magvit2.yaml")).to(CUDA).eval()
    latent = tuple(tok.latent_shape(17, 128, 128))
    cfg = TokenizeConfig(input_dir=tmp_path, output_dir=tmp_path, tokenizer=tmp_path / "unused.safetensors",
                         num_frames=17, resolution=128, batch_size=2, precision="bf16")
    builder = _ShardBuilder(tok, cfg, latent)
    g = torch.Generator().manual_seed(0)
    batches = [[(f"b{b}c{i}", torch.randint(0, 256, (17, 128, 128, 3), generator=g, dtype=torch.uint8), {})
                for i in range(2)] for b in range(3)]
    builder._finish(builder._launch(batches[0]))  # cuDNN's autotuning for this shape, outside what is timed
    first, second = builder._launch(batches[1]), builder._launch(batches[2])  # ~9 TFLOP each: tens of ms
    samples = builder._finish(first)
    second_still_running = not second.ready.query()
    samples += builder._finish(second)
    assert second_still_running
    for batch in batches[1:]:
        video = frames_batch_to_tensor(torch.stack([frames for _, frames, _ in batch]), CUDA)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            expected = tok.encode(video).cpu().numpy()
        got = {key: tokens for key, tokens, _ in samples}
        for (key, _, _), ids in zip(batch, expected):
            np.testing.assert_array_equal(got[key], ids.astype(np.uint16))
