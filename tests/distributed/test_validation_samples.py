"""Validation loss and training-time samples (``--valid-data``, ``--eval-interval``, ``--eval-iters``,
``--sample-interval``, ``--sample-tokenizer``) in real training jobs of both backends:

* megatron, TP2 x PP2 (4 gloo ranks, 1F1B forward-only evaluation), 4 iterations, evaluated at 2 and 4,
  a sample decoded to video at 4;
* DeepSpeed ZeRO-3, DP2 (each rank evaluates half the samples), 2 iterations, evaluated at 1 and 2, a
  sample logged as latent ids at 2 (no tokenizer).

Each validation loss is checked against a direct computation in this process: the checkpoint saved at that
iteration, converted to the single-device model (megatron_nbp.inference), and the token-mean NBP cross
entropy over the first ``eval_iters x global_batch_size`` clips of the validation shards (read with one
stream, no data-parallel split). fp32, asserted to 1e-5 relative (float32 TensorBoard scalar vs float64 sum). The printed
Megatron-LM line, the TensorBoard scalars ``lm loss validation`` / ``lm loss validation ppl`` and the
event file's sample records are read back with tensorboard's EventAccumulator; the samples must equal a
clip generated from the same prompt and seed by the converted checkpoint (so the in-memory TP / PP / ZeRO-3
gathering of the weights is exact).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.synthetic import write_synthetic_shards
from megatron_nbp.config import NBPConfig
from megatron_nbp.data import TokenClipStream, condition_key, micro_batches
from megatron_nbp.inference.convert import convert_checkpoint
from megatron_nbp.inference.model import load_inference_model
from megatron_nbp.masks import block_causal_allowed
from megatron_nbp.training.samples import generate_sample, latent_ids_image
from megatron_nbp.training_log import gif_summary, read_scalars
from tests.dist_utils import torchrun

LAUNCHER = "launchers/pretrain_nbp.py"
CONFIG = "tests/configs/tiny_test.yaml"
VOCAB = 8  # the tiny tokenizer's codebook (2 x 2 x 2 FSQ), so generated ids decode
SEED = 1234
GLOBAL_BATCH = 8
EVAL_ITERS = 2
RTOL = 1e-5
LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|")


def tiny_tokenizer(path):
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer

    torch.manual_seed(0)
    cfg = TokenizerConfig(base_channels=4, channel_multipliers=[1, 1, 1, 1], num_res_blocks=1, num_mid_blocks=0,
                          levels=[2, 2, 2], norm_groups=2)
    return save_tokenizer(VideoTokenizer(cfg).eval(), path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{backend: {"dir": run folder, "stdout": rank output}} of the two runs, on the same shards."""
    work = tmp_path_factory.mktemp("validation")
    write_synthetic_shards(work / "train", num_clips=32, clips_per_shard=8, latent_shape=(5, 4, 4), seed=0, vocab=VOCAB)
    write_synthetic_shards(work / "valid", num_clips=24, clips_per_shard=8, latent_shape=(5, 4, 4), seed=1, vocab=VOCAB)
    tokenizer = tiny_tokenizer(work / "tokenizer.safetensors")
    common = ["--config", CONFIG, "--data", str(work / "train"), "--valid-data", str(work / "valid"),
              "--vocab-size", str(VOCAB), "--fp32", "--eval-iters", str(EVAL_ITERS), "--seed", str(SEED),
              "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2"]
    out = {}
    run = work / "megatron"
    out["megatron"] = {"dir": run, "stdout": torchrun(
        4, LAUNCHER, *common, "--tp", "2", "--pp", "2", "--train-iters", "4", "--eval-interval", "2",
        "--save", str(run / "ckpt"), "--save-interval", "2", "--tensorboard-dir", str(run / "tb"),
        "--sample-interval", "4", "--sample-tokenizer", str(tokenizer)).stdout}
    run = work / "deepspeed"
    out["deepspeed"] = {"dir": run, "stdout": torchrun(
        2, LAUNCHER, *common, "--backend", "deepspeed", "--zero-stage", "3", "--train-iters", "2",
        "--lr-warmup-iters", "0", "--eval-interval", "1", "--save", str(run / "ckpt"), "--save-interval", "1",
        "--tensorboard-dir", str(run / "tb"), "--sample-interval", "2").stdout}
    out["work"] = work
    out["tokenizer"] = tokenizer
    return out


def run_config(work) -> NBPConfig:
    cfg = NBPConfig.from_yaml(CONFIG)
    cfg.set("model.vocab_size", VOCAB)
    cfg.set("train.seed", SEED)
    cfg.set("valid_data", str(work / "valid"))
    return cfg


def converted(run, iteration: int):
    out = run / f"converted_{iteration}"
    if not out.exists():
        convert_checkpoint(run / "ckpt", out, iteration=iteration)
    return load_inference_model(out)


def direct_validation_loss(model, work) -> float:
    """Token-mean NBP cross entropy of ``model`` over the first EVAL_ITERS x GLOBAL_BATCH validation clips."""
    m = model.config
    stream = TokenClipStream(work / "valid", 0, 1, SEED, m.latent_shape, m.vocab_size, shuffle_buffer=1,
                             condition_key=condition_key(m))
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad():
        for b in micro_batches(itertools.islice(iter(stream), EVAL_ITERS * GLOBAL_BATCH), 2, m):
            logits = model(b.tokens, b.position_ids, block_causal_allowed(b.block_ids, key_padding=b.key_padding))
            ce = F.cross_entropy(logits.double().flatten(0, 1), b.labels.flatten(), reduction="none")
            loss_sum += float((ce * b.loss_mask.flatten().double()).sum())
            tokens += float(b.loss_mask.sum())
    return loss_sum / tokens


def printed(stdout: str) -> dict[int, tuple[float, float]]:
    return {int(i): (float(v), float(p)) for i, v, p in LINE.findall(stdout)}


@pytest.mark.parametrize("backend, iterations", [("megatron", (2, 4)), ("deepspeed", (1, 2))])
def test_validation_loss_equals_a_direct_computation(runs, backend, iterations):
    run = runs[backend]["dir"]
    lines = printed(runs[backend]["stdout"])
    tb = read_scalars(run / "tb", "lm loss validation")
    ppl = read_scalars(run / "tb", "lm loss validation ppl")
    assert sorted(lines) == sorted(tb) == sorted(ppl) == list(iterations), (lines, tb)
    for it in iterations:
        want = direct_validation_loss(converted(run, it), runs["work"])
        assert abs(tb[it] - want) <= RTOL * want, (backend, it, tb[it], want)
        assert lines[it][0] == pytest.approx(tb[it], rel=1e-6)
        assert ppl[it] == pytest.approx(math.exp(tb[it]), rel=1e-6)
        assert lines[it][1] == pytest.approx(ppl[it], rel=1e-6)
    assert tb[iterations[0]] != tb[iterations[1]]  # the weights moved: each evaluation saw the current ones


def image_records(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    assert tag in acc.Tags()["images"], acc.Tags()
    return acc.Images(tag)


def test_the_sample_video_is_the_converted_models_clip(runs):
    from megatron_nbp.inference.pipeline import NBPPipeline
    from data_prep.tokenizer import load_tokenizer

    run, work = runs["megatron"]["dir"], runs["work"]
    (record,) = image_records(run / "tb", "samples/video")
    assert record.step == 4 and record.encoded_image_string[:4] == b"GIF8"
    model = converted(run, 4)
    cfg = run_config(work)
    stream = TokenClipStream(work / "valid", 0, 1, SEED, (5, 4, 4), VOCAB, shuffle_buffer=1)
    tokens = generate_sample(model, cfg, *next(iter(stream)))
    frames = NBPPipeline(model, load_tokenizer(runs["tokenizer"])).decode(tokens[None])[0]
    assert frames.shape == (17, 32, 32, 3) and (record.width, record.height) == (32, 32)
    assert record.encoded_image_string == gif_summary("samples/video", frames).value[0].image.encoded_image_string


def test_the_latent_ids_sample_is_the_converted_models_clip(runs):
    from PIL import Image
    import io

    run, work = runs["deepspeed"]["dir"], runs["work"]
    (record,) = image_records(run / "tb", "samples/latent-ids")
    assert record.step == 2
    got = np.asarray(Image.open(io.BytesIO(record.encoded_image_string)).convert("RGB"))
    stream = TokenClipStream(work / "valid", 0, 1, SEED, (5, 4, 4), VOCAB, shuffle_buffer=1)
    tokens = generate_sample(converted(run, 2), run_config(work), *next(iter(stream)))
    want = latent_ids_image(tokens, (5, 4, 4), VOCAB)
    assert got.shape == want.shape == (32, 5 * 32, 3)
    assert np.array_equal(got, want)
