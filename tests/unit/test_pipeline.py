"""The Python API (megatron_nbp.inference.pipeline.NBPPipeline), the converted-checkpoint dtype and shards,
and the generating commands on top of them, with tiny random-weight models and a tiny random tokenizer
(9 frames of 16 x 16 pixels = latent 3 x 2 x 2, an 8-code FSQ).

Equality with the lower-level generate_* calls is checked greedily (temperature 0), so it does not depend
on how rows draw random numbers; the per-row RNG equality is tested with the sampler."""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
import torch

from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference import generate as gen
from megatron_nbp.inference.convert_common import write_inference_checkpoint
from megatron_nbp.inference.model import NBPDecoder, load_inference_model
from megatron_nbp.inference.pipeline import ClipGeometry, NBPPipeline, clip_geometry, condition_batch, row_seeds
from megatron_nbp.inference.sampling import SamplingConfig
from megatron_nbp.layouts import frame_prediction_batch, pad_text_ids
from megatron_nbp.masks import block_causal_allowed

LATENT, BLOCK = (3, 2, 2), (1, 2, 2)
GREEDY = SamplingConfig(temperature=0.0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_tokenizer() -> VideoTokenizer:
    torch.manual_seed(0)
    cfg = TokenizerConfig(base_channels=4, channel_multipliers=[1, 1, 1, 1], num_res_blocks=1, num_mid_blocks=0,
                          levels=[2, 2, 2], norm_groups=2)
    return VideoTokenizer(cfg).eval()


def model_config(**kw) -> ModelConfig:
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=8,
                  latent_shape=LATENT, block_shape=BLOCK, condition_frames=1)
    return ModelConfig(**{**fields, **kw})


def random_model(cfg: ModelConfig, seed: int = 0) -> NBPDecoder:
    torch.manual_seed(seed)
    model = NBPDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def convert(model: NBPDecoder, path, **kw):
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return write_inference_checkpoint(tensors, model.config, path, {"source_checkpoint": "random"}, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Converted frame-prediction, class- and text-conditional models and a tokenizer file."""
    root = tmp_path_factory.mktemp("pipeline")
    tok = save_tokenizer(tiny_tokenizer(), root / "tokenizer.safetensors")
    frames = random_model(model_config())
    classes = random_model(model_config(layout="hybrid", condition_type="class", num_condition_tokens=1,
                                        condition_labels=["cat", "dog", "cow"]), seed=1)
    texts = random_model(model_config(layout="hybrid", condition_type="text", num_condition_tokens=4,
                                      text_vocab_size=20), seed=2)
    return {"tokenizer": tok, "frames": convert(frames, root / "frames"), "classes": convert(classes, root / "classes"),
            "texts": convert(texts, root / "texts"), "root": root}


def clips(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8) for _ in range(n)]


# ----------------------------------------------------------------------------- the Python API


def test_frame_prediction_batch_equals_the_lower_level_call_and_each_prompt_alone(files):
    pipe = NBPPipeline.from_pretrained(files["frames"], tokenizer=files["tokenizer"], device="cpu")
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    assert (pipe.geometry.num_frames, pipe.geometry.height, pipe.geometry.width) == (9, 16, 16)
    prompts = clips(3)
    out = pipe(prompt_videos=prompts, num_samples=2, temperature=0.0, seeds=7, return_reconstructions=True)
    assert out.videos.shape == (6, 9, 16, 16, 3) and out.videos.dtype == np.uint8
    assert out.tokens.shape == (6, *LATENT) and out.tokens.dtype == torch.int64
    assert out.prompt_index == [0, 0, 1, 1, 2, 2] and out.sample_index == [0, 1] * 3 and out.seeds == list(range(7, 13))
    assert out.reconstructions.shape == (3, 9, 16, 16, 3) and out.prompt_clips.shape == (3, 9, 16, 16, 3)
    assert out.steps == 2 and out.generated_tokens == 6 * 2 * 4 and out.videos_of(1).shape == (2, 9, 16, 16, 3)
    # the same prompt tokens through the lower-level loop, greedily: the same clips
    prompt_tokens = pipe.encode(prompts)
    assert torch.equal(out.tokens[::2, :1], prompt_tokens[:, :1])          # the condition frame is the prompt's
    flat = prompt_tokens.reshape(3, -1)[:, :4].repeat_interleave(2, 0)
    low = gen.generate_frame_prediction(pipe.model, flat, GREEDY, torch.Generator().manual_seed(7))
    assert torch.equal(out.tokens.reshape(6, -1), low.tokens)
    assert np.array_equal(out.videos, pipe.decode(low.tokens))
    # each prompt alone gives its rows of the batch
    for p in range(3):
        alone = pipe(prompt_videos=[prompts[p]], temperature=0.0)
        assert torch.equal(alone.tokens[0], out.tokens[2 * p]) and torch.equal(alone.tokens[0], out.tokens[2 * p + 1])


def test_sampled_rows_equal_each_prompt_alone_with_its_seed(files):
    """With sampling on (temperature 1, top-k, top-p) every row of a batch equals its prompt generated alone
    with that row's seed: the pipeline seeds one generator per row."""
    pipe = NBPPipeline.from_pretrained(files["frames"], tokenizer=files["tokenizer"], device="cpu")
    prompts = clips(3, seed=5)
    out = pipe(prompt_videos=prompts, num_samples=2, top_k=50, top_p=0.9, seeds=[11, 12, 13, 14, 15, 16])
    assert len({tuple(t.flatten().tolist()) for t in out.tokens[[0, 1]]}) == 2   # two samples of prompt 0 differ
    for row, (p, seed) in enumerate(zip(out.prompt_index, out.seeds)):
        alone = pipe(prompt_videos=[prompts[p]], top_k=50, top_p=0.9, seeds=[seed])
        assert torch.equal(alone.tokens[0], out.tokens[row]), (row, p, seed)
    classes = NBPPipeline.from_pretrained(files["classes"], tokenizer=files["tokenizer"], device="cpu")
    both = classes(class_names=["dog", "cat"], top_k=50, seeds=[3, 4])
    for row, name in enumerate(["dog", "cat"]):
        assert torch.equal(classes(class_names=[name], top_k=50, seeds=[3 + row]).tokens[0], both.tokens[row])


def test_class_conditional_batch_equals_generate_hybrid(files):
    pipe = NBPPipeline.from_pretrained(files["classes"], tokenizer=files["tokenizer"], device="cpu")
    out = pipe(class_names=["dog", "cat"], num_samples=2, sampling=SamplingConfig(top_k=5), temperature=0.0)
    assert out.videos.shape == (4, 9, 16, 16, 3) and out.tokens.shape == (4, *LATENT)
    assert out.prompt_index == [0, 0, 1, 1]
    low = gen.generate_hybrid(pipe.model, torch.tensor([[1], [1], [0], [0]]), None, GREEDY)
    assert torch.equal(out.tokens.reshape(4, -1), low.tokens) and out.steps == low.steps
    alone = pipe(class_names=["cat"], temperature=0.0)
    assert torch.equal(alone.tokens[0], out.tokens[2])
    with pytest.raises(ValueError, match="cow2"):
        pipe(class_names=["cow2"])
    with pytest.raises(ValueError, match="class_names, not text_ids"):
        pipe(text_ids=[[1, 2]])
    with pytest.raises(ValueError, match="not prompt videos"):
        pipe(prompt_videos=clips(1))


def test_text_prompts_are_padded_together(files):
    pipe = NBPPipeline.from_pretrained(files["texts"], tokenizer=files["tokenizer"], device="cpu")
    texts = [[3, 9], [1, 2, 3, 4, 5, 6]]
    out = pipe(text_ids=texts, temperature=0.0)
    ids, pad = pad_text_ids(texts, 4, pipe.config.condition_vocab_size)
    low = gen.generate_hybrid(pipe.model, ids, pad, GREEDY)
    assert torch.equal(out.tokens.reshape(2, -1), low.tokens)
    condition, padding = condition_batch(pipe.config, text_ids=texts, num_samples=3)
    assert torch.equal(condition, ids.repeat_interleave(3, 0)) and torch.equal(padding, pad.repeat_interleave(3, 0))
    assert condition_batch(pipe.config, text_ids=[[1, 2, 3, 4]])[1] is None        # nothing padded


def test_call_arguments_are_checked(files):
    pipe = NBPPipeline.from_pretrained(files["frames"], tokenizer=files["tokenizer"], device="cpu")
    with pytest.raises(TypeError, match="top_q"):
        pipe(prompt_videos=clips(1), top_q=0.5)
    with pytest.raises(ValueError, match="top_p"):
        pipe(prompt_videos=clips(1), top_p=0.0)
    with pytest.raises(ValueError, match="takes prompt_videos"):
        pipe(class_names=["cat"])
    with pytest.raises(ValueError, match="3 given for 2 rows"):
        pipe(prompt_videos=clips(2), seeds=[1, 2, 3])
    with pytest.raises(ValueError, match=r"prompt clip 1: expected uint8 \[9, 16, 16, 3\]"):
        pipe(prompt_videos=[clips(1)[0], np.zeros((9, 8, 8, 3), np.uint8)])
    stacked = pipe(prompt_videos=np.stack(clips(2)), temperature=0.0)         # an array of clips works too
    assert torch.equal(stacked.tokens, pipe(prompt_videos=clips(2), temperature=0.0).tokens)
    assert row_seeds(None, 3) == [0, 1, 2] and row_seeds(5, 2) == [5, 6] and row_seeds([4, 1], 2) == [4, 1]


def test_a_tokenizer_that_does_not_fit_is_refused(files, tmp_path):
    cfg = model_config(vocab_size=4)                 # fewer codes than the tokenizer's 8
    path = convert(random_model(cfg), tmp_path / "small_vocab")
    with pytest.raises(ValueError, match="codebook 8 > model vocab 4"):
        NBPPipeline.from_pretrained(path, tokenizer=tiny_tokenizer(), device="cpu")


def test_geometry_follows_the_tokenizer_spatial_stride():
    """A stride-4 tokenizer (the CPU demo's layout) maps the model's 3x2x2 latents to 9x8x8 pixels, a
    stride-8 one to 9x16x16; each geometry encodes back to the model's latent shape."""
    model = random_model(model_config())
    stride8 = tiny_tokenizer()
    stride4 = VideoTokenizer(dataclasses.replace(stride8.config, spatial_downsample=[True, True, False]))
    assert clip_geometry(model, stride8) == ClipGeometry(9, 16, 16)
    assert clip_geometry(model, stride4) == ClipGeometry(9, 8, 8)
    with torch.no_grad():
        assert tuple(stride4.encode(torch.zeros(1, 3, 9, 8, 8)).shape) == (1, *LATENT)


# ----------------------------------------------------------------------------- dtype and shards


def test_dtype_plumbing(files, tmp_path):
    from megatron_nbp.device import PRECISIONS
    from megatron_nbp.inference.dtypes import DTYPES, default_dtype, dtype_name, resolve_dtype

    assert tuple(DTYPES) == PRECISIONS
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda:0") == torch.bfloat16
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert dtype_name(torch.float16) == "fp16"
    with pytest.raises(ValueError, match="'fp8' not one of bf16, fp16, fp32"):
        resolve_dtype("fp8", "cpu")
    # the model runs in the dtype asked for, whatever it is stored in; the stored one otherwise
    bf16_dir = convert(load_inference_model(files["frames"]), tmp_path / "bf16", dtype="bf16")
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bf16"
    assert {p.dtype for p in load_inference_model(bf16_dir).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_inference_model(bf16_dir, dtype="fp32").parameters()} == {torch.float32}
    assert {p.dtype for p in load_inference_model(files["frames"], dtype=torch.float16).parameters()} == {torch.float16}
    pipe = NBPPipeline.from_pretrained(bf16_dir, tokenizer=files["tokenizer"], device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    out = pipe(prompt_videos=clips(2), temperature=0.0)
    assert out.tokens.shape == (2, *LATENT) and int(out.tokens.max()) < 8          # ids within the vocabulary
    # a checkpoint converted before the dtype was recorded loads as fp32
    config = json.loads((files["frames"] / "config.json").read_text())
    config.pop("dtype")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(config))
    (old / "model.safetensors").write_bytes((files["frames"] / "model.safetensors").read_bytes())
    assert {p.dtype for p in load_inference_model(old).parameters()} == {torch.float32}


def test_a_dtype_whose_kernels_do_not_run_is_refused_clearly(monkeypatch):
    from megatron_nbp.inference import dtypes

    def refuse(q, *args, **kwargs):
        if q.dtype == torch.float16:
            raise RuntimeError('"baddbmm_cpu" not implemented for \'Half\'')
        return q

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    monkeypatch.setattr(dtypes, "_CHECKED", set())
    with pytest.raises(ValueError, match="dtype fp16 does not run on cpu .*not implemented for 'Half'.*--dtype fp32"):
        dtypes.resolve_dtype("fp16", "cpu")
    dtypes.check_dtype_runs(torch.bfloat16, "cpu")                # the other dtypes still pass


def test_bf16_conversion_round_trip(files, tmp_path):
    """Weights converted to bf16 are exactly the fp32 weights rounded (torch's round to nearest even); the
    bf16 model's logits are within 2% (relative norm of the difference, per row; measured 0.6%) of the fp32 model's."""
    fp32 = load_inference_model(files["frames"])
    bf16 = load_inference_model(convert(fp32, tmp_path / "bf16", dtype="bf16"))
    want = {k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()}
    got = bf16.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    video = torch.randint(0, 8, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = frame_prediction_batch(video, 4, LATENT)
    allowed = block_causal_allowed(batch.block_ids)
    with torch.no_grad():
        reference = fp32(batch.tokens, batch.position_ids, allowed)
        low = bf16(batch.tokens, batch.position_ids, allowed).float()
    err = float(((low - reference).norm(dim=-1) / reference.norm(dim=-1)).max())
    print(f"bf16 vs fp32 logits: largest relative row error {err:.4f}")
    assert 0 < err <= 0.02, err


def test_sharded_weights_round_trip(files, tmp_path):
    from megatron_nbp.inference.weight_files import INDEX_FILE, WEIGHTS_FILE, parse_size, read_weight_files

    model = load_inference_model(files["frames"])
    limit = 20_000                                          # bytes: an fc weight is 8 KB, all ~75 KB
    out = convert(model, tmp_path / "sharded", max_shard_size=limit)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / WEIGHTS_FILE).exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == {
        s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert all(s.stat().st_size <= limit + 2_000 for s in shards)            # + the safetensors header
    loaded = load_inference_model(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert set(read_weight_files(out)) == set(model.state_dict())
    (shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_inference_model(out)
    # one file below the limit, as before
    assert sorted(p.name for p in convert(model, tmp_path / "single").iterdir()) == ["config.json", WEIGHTS_FILE]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    for bad in ("5 parsecs", "-1GB", 0, "GB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# ----------------------------------------------------------------------------- the commands


def test_generate_command_writes_one_file_per_prompt(files, tmp_path, capsys):
    from data_prep.video_io import write_mp4
    from megatron_nbp.cli import generate as cli

    videos = []
    for i, clip in enumerate(clips(2, seed=3)):
        videos += ["--prompt-video", str(write_mp4(clip, tmp_path / f"prompt{i}.mp4"))]
    common = ["--checkpoint", str(files["frames"]), "--tokenizer", str(files["tokenizer"]), "--device", "cpu",
              "--temperature", "0"]
    cli.main(common + videos + ["--output", str(tmp_path / "out.mp4")])
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.png", "out_p0.mp4", "out_p1.mp4"]
    assert "2 prompt(s) x 1 sample(s) in one batch, fp32 on cpu" in capsys.readouterr().out
    cli.main(["--checkpoint", str(files["classes"]), "--tokenizer", str(files["tokenizer"]), "--device", "cpu",
              "--class-name", "cow", "--class-name", "cat", "--num-samples", "2", "--dtype", "bf16",
              "--output", str(tmp_path / "cls.mp4")])
    assert sorted(p.name for p in tmp_path.glob("cls*")) == ["cls.png"] + [f"cls_p{p}_{s}.mp4" for p in (0, 1)
                                                                            for s in (0, 1)]
    assert "bf16 on cpu" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(common + ["--class-name", "cat", "--output", str(tmp_path / "x.mp4")])


def test_generate_command_reads_several_prompts():
    from megatron_nbp.cli import generate as cli

    parser = cli.build_parser()
    base = ["--checkpoint", "C", "--tokenizer", "T", "--output", "o.mp4"]
    cfg = model_config(layout="hybrid", condition_type="text", num_condition_tokens=4, text_vocab_size=20)
    args = parser.parse_args(base + ["--text-ids", "1,2;3", "--text-ids", "4,5,6,7,8", "--num-samples", "2"])
    condition, padding, what = cli._condition(parser, args, cfg)
    ids, pad = pad_text_ids([[1, 2], [3], [4, 5, 6, 7, 8]], 4, cfg.condition_vocab_size)
    assert torch.equal(condition, ids.repeat_interleave(2, 0)) and torch.equal(padding, pad.repeat_interleave(2, 0))
    assert what.count("text") == 3
    assert [p.name for p in cli.sample_paths(__import__("pathlib").Path("o.mp4"), 1, 1)] == ["o.mp4"]
    assert [p.name for p in cli.sample_paths(__import__("pathlib").Path("o.mp4"), 1, 2)] == ["o_0.mp4", "o_1.mp4"]
    assert [p.name for p in cli.sample_paths(__import__("pathlib").Path("d/o.mp4"), 11, 1)][10] == "o_p10.mp4"


def test_convert_and_evaluate_take_dtype_flags():
    from megatron_nbp.cli import convert, evaluate

    args = convert.build_parser().parse_args(["--load", "L", "--output", "O"])
    assert args.dtype is None and args.max_shard_size == "5GB"
    args = convert.build_parser().parse_args(["--load", "L", "--output", "O", "--dtype", "bf16",
                                              "--max-shard-size", "2GiB"])
    assert (args.dtype, args.max_shard_size) == ("bf16", "2GiB")
    with pytest.raises(SystemExit):
        convert.main(["--load", "L", "--output", "O", "--max-shard-size", "lots"])
    with pytest.raises(SystemExit):
        convert.build_parser().parse_args(["--load", "L", "--output", "O", "--dtype", "fp8"])
    ev = evaluate.build_parser().parse_args(["k600", "--checkpoint", "C", "--tokenizer", "T", "--data-dir", "D",
                                             "--video-root", "V", "--dtype", "fp16"])
    assert ev.dtype == "fp16"


@pytest.mark.gpu
@cuda
def test_pipeline_runs_bf16_on_cuda_by_default(files):
    pipe = NBPPipeline.from_pretrained(files["frames"], tokenizer=files["tokenizer"], device="cuda")
    assert pipe.dtype == torch.bfloat16 and pipe.device.type == "cuda"
    out = pipe(prompt_videos=clips(2), num_samples=2, temperature=0.0)
    assert out.videos.shape == (4, 9, 16, 16, 3) and out.tokens.device.type == "cpu"
    low = gen.generate_frame_prediction(pipe.model, out.tokens.reshape(4, -1)[:, :4].to("cuda"), GREEDY)
    assert torch.equal(low.tokens.cpu(), out.tokens.reshape(4, -1))
