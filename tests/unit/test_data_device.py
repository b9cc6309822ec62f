"""The data side's device code path, checked without a GPU: the device chooser of data_prep.device with
CUDA availability passed in (as tests/unit/test_device.py does for megatron_nbp.device), the trainer's
process-group start with CUDA faked, bf16 autocast (CPU autocast runs bf16) through the same training step
and encoding functions a GPU run uses, the learning-rate schedule and batch options of the paper's recipe
configs, and the tokenization job's new options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.device import DataDevice, activate, autocast, choose_device, to_device
from data_prep.tokenizer import TokenizerConfig, VideoTokenizer
from tests.tokenizer_data import SMALL_MODEL

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


# ------------------------------------------------------------------------- the device chooser


def test_gpu_machine_gets_the_gpu_of_its_local_rank_and_nccl(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    choice = choose_device(cuda_available=True)
    assert choice == DataDevice(torch.device("cuda", 3), "nccl") and choice.is_cuda
    assert choose_device("auto", local_rank=1, cuda_available=True).device == torch.device("cuda", 1)
    assert choose_device("cuda", cuda_available=True).device == torch.device("cuda", 3)
    assert choose_device("cuda:5", cuda_available=True).device == torch.device("cuda", 5)
    assert choice.resolve_precision("auto") == "bf16" and choice.resolve_precision("fp32") == "fp32"


def test_cpu_machine_or_forced_cpu_gets_the_cpu_and_gloo(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cpu = choose_device(cuda_available=False)
    assert cpu == DataDevice(CPU, "gloo") and not cpu.is_cuda
    assert cpu.resolve_precision("auto") == "fp32" and cpu.resolve_precision("bf16") == "bf16"
    assert choose_device("cpu", cuda_available=True) == cpu  # --device cpu on a GPU machine


def test_availability_defaults_to_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device(local_rank=2).device == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(local_rank=2).device == CPU


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        choose_device("cuda:0", cuda_available=False)
    with pytest.raises(ValueError, match="'gpu0'"):
        choose_device("gpu0", cuda_available=True)
    with pytest.raises(ValueError, match="'meta'"):
        choose_device("meta", cuda_available=True)
    with pytest.raises(ValueError, match="local rank"):
        choose_device(local_rank=-1, cuda_available=True)
    with pytest.raises(ValueError, match="'fp16'"):
        DataDevice(CPU, "gloo").resolve_precision("fp16")
    with pytest.raises(ValueError, match="'auto'"):
        autocast(CPU, "auto")


def test_activate_sets_the_cuda_device_and_cudnn_benchmark_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    activate(DataDevice(CPU, "gloo"))
    assert calls == [] and torch.backends.cudnn.benchmark is False
    activate(DataDevice(torch.device("cuda", 1), "nccl"))
    assert calls == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark is True


def test_autocast_and_to_device_on_cpu():
    conv = torch.nn.Conv3d(3, 4, 3)
    x = torch.randn(1, 3, 3, 5, 5)
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    assert to_device(x, CPU) is x


def test_the_trainer_asks_for_its_gpu_and_nccl_when_cuda_is_there(monkeypatch, tmp_path):
    """train_tokenizer's first call, with CUDA faked: the chosen device is cuda:LOCAL_RANK, made current
    before anything else, and the process group (under torchrun) would be nccl."""
    from data_prep.tokenizer.train import _start_process_group

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, created, choice = _start_process_group(_opts(tmp_path, device="auto"), cuda_available=True)
    assert (rank, world, created) == (0, 1, False)
    assert choice == DataDevice(torch.device("cuda", 1), "nccl") and calls == [torch.device("cuda", 1)]
    assert _start_process_group(_opts(tmp_path, device="cpu"), cuda_available=True)[3] == DataDevice(CPU, "gloo")


# ------------------------------------------------------------------------- precision


def _tiny(seed: int = 0) -> VideoTokenizer:
    torch.manual_seed(seed)
    return VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")).eval()


def test_fsq_stays_fp32_under_bf16_autocast():
    tok = _tiny()
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad(), autocast(CPU, "bf16"):
        codes, indices = tok.encode_codes(video)
        z = tok.encoder(video)
    assert z.dtype == torch.bfloat16 and codes.dtype == torch.float32
    expected_codes, expected = tok.quantizer(z.float())  # FSQ of the bf16 encoder output, in fp32
    assert torch.equal(codes, expected_codes) and torch.equal(indices, expected)
    with torch.no_grad():
        assert tok.encode_codes(video)[0].dtype == torch.float32


def test_fsq_digits_are_the_mixed_radix_level_numbers():
    from data_prep.tokenizer.fsq import FSQ

    fsq = FSQ([8, 8, 8, 5, 5, 5])
    digits = torch.stack([torch.randint(0, level, (4, 3), generator=torch.Generator().manual_seed(d))
                          for d, level in enumerate(fsq.levels)], dim=1)  # [4, 6, 3]
    radix = torch.tensor([1, 8, 64, 512, 2560, 12800]).view(1, 6, 1)  # channel 0 varies fastest
    ids = (digits * radix).sum(dim=1)
    assert torch.equal(fsq.indices_to_digits(ids), digits)
    # level numbers as codes: digit k of an L-level channel is the code (k - L//2) / (L//2)
    half = torch.tensor(fsq.levels).view(1, 6, 1) // 2
    assert torch.equal(fsq.indices_to_codes(ids), (digits - half).float() / half.float())
    with pytest.raises(ValueError, match="64000"):
        fsq.indices_to_digits(torch.tensor([64000]))
    with pytest.raises(TypeError, match="integer"):
        fsq.indices_to_digits(torch.tensor([1.0]))


def test_compare_token_ids_counts_equal_and_one_step_ids():
    from data_prep.tokenizer.fsq import FSQ
    from data_prep.tokenizer.precision import TokenAgreement, compare_token_ids

    fsq = FSQ([8, 8, 8, 5, 5, 5])
    radix = torch.tensor([1, 8, 64, 512, 2560, 12800])

    def ids(*digits):
        return int((torch.tensor(digits) * radix).sum())

    base = (3, 4, 0, 2, 4, 1)
    moved = [
        base,                    # equal
        (4, 4, 0, 2, 4, 1),      # one step up in channel 0
        (3, 4, 0, 2, 3, 1),      # one step down in channel 4
        (3, 4, 2, 2, 4, 1),      # two steps in channel 2
        (3, 5, 0, 3, 4, 1),      # one step in each of two channels
        (0, 0, 0, 0, 0, 0),      # far away
    ]
    reference = torch.tensor([[ids(*base)] * len(moved)])
    other = torch.tensor([[ids(*m) for m in moved]])
    agreement = compare_token_ids(fsq, reference, other)
    assert agreement == TokenAgreement(positions=6, equal=1, one_step=2)
    assert agreement.equal_rate == pytest.approx(1 / 6) and agreement.within_one_step_rate == pytest.approx(3 / 6)
    assert agreement + agreement == TokenAgreement(12, 2, 4)
    assert "0.1667 equal, 0.5000 within one FSQ step, of 6 ids" == agreement.describe()
    assert compare_token_ids(fsq, reference[:, :0], other[:, :0]).equal_rate == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        compare_token_ids(fsq, reference, other[:, :2])


def test_fp32_label_says_when_cuda_convolutions_run_in_tf32(monkeypatch):
    from data_prep.tokenizer.precision import fp32_label

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert fp32_label("cpu") == "fp32" and fp32_label(torch.device("cuda", 0)) == "fp32 (TF32 convolutions)"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert fp32_label("cuda") == "fp32"


def test_bf16_token_agreement_is_the_share_of_equal_ids():
    from data_prep.tokenizer.precision import bf16_token_agreement, encode_tokens, token_agreement

    tok = _tiny()
    clips = torch.rand(3, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        fp32 = tok.encode(clips)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.cat([tok.encode(clips[:2]), tok.encode(clips[2:])])
    assert torch.equal(encode_tokens(tok, clips, "fp32"), fp32)
    expected = float((fp32 == bf16).double().mean())
    rate = bf16_token_agreement(tok, clips, batch_size=2)
    assert rate == pytest.approx(expected, abs=1e-12)
    detail = token_agreement(tok, clips, batch_size=2)
    assert detail.positions == fp32.numel() and detail.equal_rate == rate
    assert rate <= detail.within_one_step_rate <= 1.0
    assert 0.5 < rate <= 1.0, rate  # a random tiny tokenizer on noise: most ids survive bf16
    print(f"bf16 vs fp32 token agreement (random tiny tokenizer, 3 noise clips, CPU): {rate:.4f}")
    with pytest.raises(ValueError, match="batch_size"):
        bf16_token_agreement(tok, clips, batch_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        bf16_token_agreement(tok, clips[:0])
    with pytest.raises(ValueError, match="'fp16'"):
        encode_tokens(tok, clips, "fp16")


# ------------------------------------------------------------------------- training through the device path


def _opts(root: Path, **overrides):
    from data_prep.tokenizer.config import TrainOptions

    config = root / "small.yaml"
    config.write_text(SMALL_MODEL)
    values = dict(config=str(config), data=str(root / "videos"), output=str(root / "tok.safetensors"),
                  resolution=16, num_frames=5, train_steps=2, batch_size=2, lr=1e-3, warmup_steps=1, seed=3,
                  log_interval=100, eval_clips=1, disc_weight=0.5, disc_start=0, disc_channels=4, disc_layers=2,
                  lecam_weight=0.1, ema_decay=0.8, device="cpu")
    values.update(overrides)
    return TrainOptions(**values)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from data_prep.synthetic import write_pattern_video

    root = tmp_path_factory.mktemp("devtrain")
    for i in range(2):
        write_pattern_video(root / "videos" / f"v{i}.mp4", num_frames=12, height=24, width=24, seed=i)
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_runs_the_device_path_and_keeps_fp32_state(videos, precision):
    """The trainer's own build + step functions on the CPU device (the functions a GPU run calls): bf16
    autocast covers the convolutions, while parameters, gradients, optimizer and EMA states, the
    reconstruction fed to the losses and the losses stay fp32; bf16's loss is within 2% of fp32's."""
    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.train import _checked_config, _train_step, _Trainables

    def step(precision: str):
        opts = _opts(videos, precision=precision)
        t = _Trainables.build(opts, _checked_config(opts), 1, choose_device("cpu"))
        bank = load_clip_bank(opts.data, opts.resolution, opts.num_frames)
        return t, _train_step(opts, t, bank, torch.Generator().manual_seed(0), 0, 0.0)

    t, out = step(precision)
    assert t.device == CPU and t.precision == precision
    assert out.recon.dtype == torch.float32 and out.loss.dtype == torch.float32 and out.d_loss.dtype == torch.float32
    for module in (t.model, t.disc, t.ema):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for k, v in s.items() if k != "step")
    _, reference = step("fp32")
    assert float(out.loss) == pytest.approx(float(reference.loss), rel=0.02)
    if precision == "fp32":
        assert float(out.loss) == float(reference.loss)  # no autocast at all: the same bits


def test_a_bf16_run_trains_saves_and_resumes_on_cpu(videos):
    from data_prep.tokenizer.train import latest_iteration, train_tokenizer

    save = videos / "ckpt_bf16"
    result = train_tokenizer(_opts(videos, precision="bf16", save=str(save), exit_interval=1))
    assert result["device"] == "cpu" and result["precision"] == "bf16" and latest_iteration(save) == 1
    resumed = train_tokenizer(_opts(videos, precision="bf16", save=str(save), load=str(save)))
    assert resumed["steps"] == 2 and latest_iteration(save) == 2 and np.isfinite(resumed["final_loss"])
    assert "cuda" not in torch.load(save / "iter_0000002" / "rng_rank0.pt", weights_only=True)  # CPU run


# ------------------------------------------------------------------------- schedule, batch, recipe configs


def test_linear_schedule_with_warmup_ratio_and_global_batch(tmp_path):
    from data_prep.tokenizer.train import _lr_at, per_rank_batch_size, warmup_steps

    opts = _opts(tmp_path, lr=1e-4, train_steps=1000, warmup_ratio=0.01, lr_schedule="linear", min_lr_ratio=0.0,
                 global_batch_size=256)
    assert warmup_steps(opts) == 10
    assert _lr_at(opts, 0, 0.0) == pytest.approx(1e-5) and _lr_at(opts, 9, 0.009) == pytest.approx(1e-4)
    assert _lr_at(opts, 500, 0.5) == pytest.approx(5e-5) and _lr_at(opts, 1000, 1.0) == 0.0
    cosine = opts.replace(lr_schedule="cosine", min_lr_ratio=0.1)
    assert _lr_at(cosine, 500, 0.5) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert _lr_at(opts.replace(warmup_ratio=None, warmup_steps=4), 1, 0.0) == pytest.approx(5e-5)
    assert per_rank_batch_size(opts, 8) == 32 and per_rank_batch_size(opts, 1) == 256
    assert per_rank_batch_size(opts.replace(global_batch_size=None), 8) == 2  # batch_size, per rank
    with pytest.raises(ValueError, match="global_batch_size 256 must be a positive multiple of the world size 3"):
        per_rank_batch_size(opts, 3)


@pytest.mark.parametrize("name,lr", [("recipe_k600.yaml", 1e-4), ("recipe_ucf101.yaml", 5e-5)])
def test_recipe_configs_hold_table_5(name, lr):
    from data_prep.cli import train_tokenizer
    from data_prep.tokenizer.train import micro_batches

    config = REPO / "configs" / "tokenizer" / name
    opts = train_tokenizer.parse_args(["--config", str(config), "--data", "d", "--output", "o",
                                       "--perceptual-network", "features.pt"])
    assert opts.lr == lr and opts.lr_schedule == "linear" and opts.warmup_ratio == 0.01
    assert opts.perceptual_weight == 0.1 and opts.disc_weight == 0.1 and opts.global_batch_size == 256
    assert opts.weight_decay == 0.0 and opts.min_lr_ratio == 0.0  # Adam, linear decay to zero
    assert (opts.num_frames, opts.resolution, opts.device, opts.precision) == (17, 128, "auto", "auto")
    model = TokenizerConfig.from_yaml(config)
    assert model == TokenizerConfig.from_yaml(REPO / "configs" / "tokenizer" / "magvit2.yaml")
    assert model.latent_shape(opts.num_frames, 128, 128) == (5, 16, 16)
    # batch 256 on one node: 32 clips per GPU in 4 micro-batches of 8; on 4 nodes one micro-batch each
    assert micro_batches(opts, 8) == (8, 4) and micro_batches(opts, 32) == (8, 1) and micro_batches(opts, 1) == (8, 32)
    with pytest.raises(ValueError, match=r"micro_batch_size 8 must divide the 4 clips per rank of a step "
                                         r"\(global_batch_size 256 / world size 64\)"):
        micro_batches(opts, 64)
    assert micro_batches(opts.replace(micro_batch_size=4), 64) == (4, 1)
    assert micro_batches(opts.replace(micro_batch_size=None), 8) == (32, 1)  # unset: all of a rank's clips at once


# ------------------------------------------------------------------------- the tokenization job's options


def test_tokenize_config_loader_and_precision_options(tmp_path):
    from data_prep.cli import tokenize_videos
    from data_prep.tokenize_job import TokenizeConfig

    cfg = tokenize_videos.parse_args(["--input", "a", "--output", "b", "--tokenizer", "c", "--num-workers", "4",
                                      "--prefetch-factor", "3", "--device", "cpu", "--precision", "bf16"])
    assert (cfg.num_workers, cfg.prefetch_factor, cfg.device, cfg.precision) == (4, 3, "cpu", "bf16")
    assert cfg.shard_settings()["precision"] == "bf16"  # bf16 shards are never mixed with fp32 ones
    fp32 = cfg.replace(precision="fp32")
    assert "precision" not in fp32.shard_settings()  # fp32 shards keep the earlier settings
    assert fp32.shard_settings() == fp32.replace(num_workers=0, device="auto", batch_size=3).shard_settings()
    base = dict(input_dir=Path("."), output_dir=Path("."), tokenizer=Path("t"))
    with pytest.raises(ValueError, match="--num-workers must be >= 0, got -1"):
        TokenizeConfig(**base, num_workers=-1).validate()
    with pytest.raises(ValueError, match="--prefetch-factor must be >= 1, got 0"):
        TokenizeConfig(**base, prefetch_factor=0).validate()


def test_steady_rate_counts_the_clips_after_the_first_batch():
    from types import SimpleNamespace

    from data_prep.tokenize_job import _steady_rate

    # first batch (3 clips, compilation inside) done at t = 10 s; 6 more clips by t = 13 s: 2 clips/s
    assert _steady_rate(SimpleNamespace(first_batch=(10.0, 3), clips_done=9), 13.0) == "; 2.00 after the first batch"
    assert _steady_rate(SimpleNamespace(first_batch=(10.0, 3), clips_done=3), 13.0) == ""  # one batch only
    assert _steady_rate(SimpleNamespace(first_batch=None, clips_done=0), 13.0) == ""


def test_frames_batch_to_tensor_matches_frames_to_tensor():
    from data_prep.tokenize_job import frames_batch_to_tensor
    from data_prep.video_io import frames_to_tensor

    clips = np.random.default_rng(0).integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    batch = frames_batch_to_tensor(torch.from_numpy(clips), CPU)
    assert batch.shape == (2, 3, 5, 8, 8) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([frames_to_tensor(c) for c in clips]))


# ------------------------------------------------------------------------- the job's encoding speed settings


def _clips(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 5, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_channels_last_encoding_converts_the_encoder_and_keeps_the_ids():
    """make_token_encoder(channels_last=True): the encoder's 5-D weights become channels-last 3D, and the
    ids agree with the default layout's (oneDNN rounds differently: on the reference CPU every id was equal;
    allowed: 1 in 100)."""
    from data_prep.tokenizer.precision import encode_tokens, make_token_encoder

    tok = _tiny()
    clips = _clips(6, 3)
    plain = encode_tokens(tok, clips)
    encode = make_token_encoder(tok, "fp32", channels_last=True)
    weights = [p for p in tok.encoder.parameters() if p.ndim == 5]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
    assert not all(p.is_contiguous() for p in weights)
    ids = encode(clips)
    rate = float((ids == plain).double().mean())
    print(f"channels-last vs default layout, fp32, CPU: {rate:.4f} of {plain.numel()} ids equal")
    assert ids.shape == plain.shape and rate >= 0.99


@pytest.mark.slow
def test_compiled_encoding_compiles_once_and_pads_partial_batches():
    """make_token_encoder(compile=True, batch_size=4): batches of 4, 3 and 1 clips run one compiled graph
    (partial batches padded); a clip's ids do not depend on the batch it came in; the ids agree with eager
    encoding (fused kernels round differently; allowed: 2 in 100); a batch over the size is refused."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from data_prep.tokenizer.precision import encode_tokens, make_token_encoder

    torch._dynamo.reset()
    counters.clear()
    tok = _tiny()
    clips = _clips(4, 4)
    encode = make_token_encoder(tok, "fp32", compile=True, batch_size=4)
    full = encode(clips)
    assert torch.equal(encode(clips[:3]), full[:3]) and torch.equal(encode(clips[1:2]), full[1:2])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    rate = float((full == encode_tokens(tok, clips)).double().mean())
    print(f"compiled vs eager encoding, fp32, CPU: {rate:.4f} of {full.numel()} ids equal")
    assert rate >= 0.98
    with pytest.raises(ValueError, match="a batch of 5 clips is larger than the compiled batch size 4"):
        encode(_clips(5, 5))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_token_encoder(tok, compile=True, batch_size=0)
    torch._dynamo.reset()
