"""UCF-101 text conditioning end to end (the NBP paper's Table 6 setting at test size): videos in class
folders -> tokenization job with ``--label-from-dir --text-tokenizer`` (a SentencePiece model trained here
in milliseconds) -> a few training iterations (one process) -> conversion -> generation from a class name.

The reference ids come from sentencepiece itself on the texts written out below (not from
data_prep.text_ids): the class name split at its case boundaries and lower-cased, the BOS id first, as
the release's LLaMA tokenizer call gives them. The model must see them, padded / truncated to P = 8, as
condition tokens (id + L) both in the training batches and in generation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shards import iter_shard, read_manifest
from data_prep.synthetic import write_pattern_video
from data_prep.tokenize_job import TokenizeConfig, run_tokenize_job
from tests.dist_utils import REPO, run

CONFIG = "tests/configs/tiny_test_text_ucf.yaml"
P, L, TEXT_VOCAB = 8, 4, 48
TEXTS = {"ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo", "PlayingDaf": "playing daf"}


def train_sentencepiece(path: Path, vocab_size: int, extra: list[str] = ()) -> Path:
    """A tiny BPE SentencePiece model (LLaMA's ids: unk 0, BOS 1, EOS 2) of the class texts."""
    import sentencepiece as spm

    model = io.BytesIO()
    sentences = [*TEXTS.values(), "playing guitar", "apply lipstick", *extra] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def reference_ids(model_file: Path) -> dict[str, list[int]]:
    """Class name -> sentencepiece ids of its written-out text, BOS first, unpadded."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert sp.bos_id() == 1 and sp.get_piece_size() == TEXT_VOCAB
    return {name: [1, *sp.encode(text)] for name, text in TEXTS.items()}


def padded(ids: list[int]) -> tuple[list[int], list[bool]]:
    """Right-padded to P with 0 (masked), truncated to P: the condition as the model sees it."""
    ids = ids[:P]
    return ids + [0] * (P - len(ids)), [False] * len(ids) + [True] * (P - len(ids))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> dict:
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("text_ucf")
    for i, name in enumerate(TEXTS):
        for j in range(2):
            write_pattern_video(root / "videos" / name / f"v_{name}_g0{j}.mp4", num_frames=6, height=24, width=24,
                                seed=2 * i + j)
    text_model = train_sentencepiece(root / "text.model", TEXT_VOCAB)
    torch.manual_seed(0)
    tok = save_tokenizer(VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")),
                         root / "tok.safetensors")
    cfg = TokenizeConfig(input_dir=root / "videos", output_dir=root / "tokens", tokenizer=tok, num_frames=5,
                         resolution=16, videos_per_shard=2, label_from_dir=True, text_tokenizer=text_model,
                         progress=False)
    manifest = run_tokenize_job(cfg)
    train = run(["launchers/pretrain_nbp.py", "--config", CONFIG, "--data", str(root / "tokens"),
                 "--save", str(root / "ckpt"), "--save-interval", "100"])
    run(["launchers/convert_checkpoint.py", "--load", str(root / "ckpt"), "--output", str(root / "model")])
    return {"root": root, "cfg": cfg, "manifest": manifest, "text_model": text_model, "tok": tok,
            "train_stdout": train.stdout, "ref": reference_ids(text_model)}


def shard_samples(data: Path) -> list[tuple[np.ndarray, dict]]:
    return [(tokens, meta) for entry in read_manifest(data)["shards"]
            for _, tokens, meta in iter_shard(data / entry["name"])]


def test_shards_carry_the_tokenizers_ids_of_each_class_name(pipeline_run):
    samples, ref = shard_samples(pipeline_run["root"] / "tokens"), pipeline_run["ref"]
    assert len(samples) == 6 and {meta["label"] for _, meta in samples} == set(TEXTS)
    for _, meta in samples:
        assert meta["text_ids"] == ref[meta["label"]], meta
    assert len(ref["ApplyEyeMakeup"]) > P      # the truncation below is exercised
    manifest = pipeline_run["manifest"]
    text = manifest["text_tokenizer"]
    assert text["vocab_size"] == TEXT_VOCAB and text["kind"] == "sentencepiece"
    import hashlib

    assert text["sha256"] == hashlib.sha256(pipeline_run["text_model"].read_bytes()).hexdigest()
    assert manifest["class_text_ids"] == ref
    assert json.loads((pipeline_run["root"] / "tokens" / "manifest.json").read_text())["text_tokenizer"] == text


def test_training_batches_hold_the_text_ids_as_condition_tokens(pipeline_run):
    from megatron_nbp.config import NBPConfig
    from megatron_nbp.data import micro_batches

    assert "iteration        4/       4" in pipeline_run["train_stdout"]
    model = NBPConfig.from_yaml(REPO / CONFIG).model
    samples = shard_samples(pipeline_run["root"] / "tokens")

    class Stream:  # the shards' clips and conditions as TokenClipStream yields them
        consumed = 0

        def __iter__(self):
            return ((tokens.reshape(-1).astype(np.int64), meta["text_ids"]) for tokens, meta in samples)

    batches = list(micro_batches(Stream(), 2, model))
    assert len(batches) == 3
    for b, batch in enumerate(batches):
        for row in range(2):
            tokens, meta = samples[2 * b + row]
            want_ids, want_pad = padded(pipeline_run["ref"][meta["label"]])
            assert batch.tokens[row, :P].tolist() == [i + L for i in want_ids]   # condition id + L specials
            pad = [False] * P if batch.key_padding is None else batch.key_padding[row, :P].tolist()
            assert pad == want_pad
            assert batch.labels[row, P:].tolist() == (tokens.reshape(-1).astype(np.int64) + L + TEXT_VOCAB).tolist()


def test_generation_from_a_class_name_conditions_on_its_text_ids(pipeline_run, monkeypatch):
    from megatron_nbp.cli import generate as cli
    from megatron_nbp.inference import generate as gen

    seen = []
    real = gen.generate_hybrid

    def recording(model, condition, condition_padding, *args, **kwargs):
        seen.append((condition.clone(), None if condition_padding is None else condition_padding.clone()))
        return real(model, condition, condition_padding, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_hybrid", recording)
    root = pipeline_run["root"]
    cli.main(["--checkpoint", str(root / "model"), "--tokenizer", str(pipeline_run["tok"]),
              "--class-name", "ApplyEyeMakeup", "--class-name", "YoYo", "--text-tokenizer",
              str(pipeline_run["text_model"]), "--output", str(root / "gen.mp4"), "--device", "cpu"])
    (condition, padding), = seen
    for row, name in enumerate(["ApplyEyeMakeup", "YoYo"]):
        want_ids, want_pad = padded(pipeline_run["ref"][name])
        assert condition[row].tolist() == want_ids
        assert padding[row].tolist() == want_pad
    from data_prep.video_io import decode_video

    for p in (0, 1):
        frames, _ = decode_video(root / f"gen_p{p}.mp4")
        assert frames.shape == (5, 16, 16, 3)


def test_pipeline_takes_class_names_with_the_text_tokenizer(pipeline_run):
    from megatron_nbp.inference.pipeline import NBPPipeline

    pipe = NBPPipeline.from_pretrained(pipeline_run["root"] / "model", tokenizer=pipeline_run["tok"], device="cpu",
                                       text_tokenizer=pipeline_run["text_model"])
    out = pipe(class_names=["PlayingDaf"], num_samples=2, seeds=3)
    assert out.videos.shape == (2, 5, 16, 16, 3) and out.tokens.shape == (2, 2, 2, 2)
    raw = pipe(text_ids=[pipeline_run["ref"]["PlayingDaf"]], num_samples=2, seeds=3)
    assert torch.equal(out.tokens, raw.tokens)     # same condition, same seeds: the same clips


def test_training_refuses_shards_of_another_text_vocabulary(pipeline_run):
    from megatron_nbp.config import NBPConfig
    from megatron_nbp.data import DataError, check_manifest

    model = NBPConfig.from_yaml(REPO / CONFIG).model
    check_manifest(pipeline_run["root"] / "tokens", model)
    other = model.model_copy(update={"text_vocab_size": 32000})
    with pytest.raises(DataError, match=r"text tokenizer .*text\.model \(48 ids\), but model\.text_vocab_size is 32000"):
        check_manifest(pipeline_run["root"] / "tokens", other)


def test_rerun_with_another_text_tokenizer_is_refused(pipeline_run, tmp_path):
    other = train_sentencepiece(tmp_path / "other.model", TEXT_VOCAB, extra=["band marching"])
    with pytest.raises(RuntimeError, match="different \\['settings'\\]"):
        run_tokenize_job(pipeline_run["cfg"].replace(text_tokenizer=other))


def test_ucf101_fvd_protocol_generates_from_each_clips_text_ids(pipeline_run, monkeypatch):
    from megatron_nbp.eval.protocols import run_protocol
    from megatron_nbp.inference.pipeline import NBPPipeline
    from megatron_nbp.inference.sampling import SamplingConfig

    pipe = NBPPipeline.from_pretrained(pipeline_run["root"] / "model", tokenizer=pipeline_run["tok"], device="cpu")
    seen = []
    real = pipe.generate_conditional

    def recording(condition, padding, *args, **kwargs):
        seen.append((condition.clone(), padding))
        return real(condition, padding, *args, **kwargs)

    monkeypatch.setattr(pipe, "generate_conditional", recording)
    samples = shard_samples(pipeline_run["root"] / "tokens")
    real_feats, fake_feats = run_protocol(
        "ucf101", pipe, iter(enumerate(samples)), load_real=lambda meta: np.zeros((5, 16, 16, 3), np.uint8),
        features=lambda clips: torch.from_numpy(clips.reshape(len(clips), -1)[:, :4].astype(np.float64)),
        sampling=SamplingConfig(), batch_size=4, num_frames=5)
    assert real_feats.shape == fake_feats.shape == (6, 4)
    condition = torch.cat([c for c, _ in seen])
    assert condition.tolist() == [padded(pipeline_run["ref"][meta["label"]])[0] for _, meta in samples]
    assert all(p is not None for _, p in seen)   # every batch holds a short text: padding is passed on
