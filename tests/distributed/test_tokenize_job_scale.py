"""Tokenization at scale: SIGKILL mid-run + rerun gives every clip exactly once (real `python` and
`torchrun` runs of launchers/tokenize_videos.py), clip sampling options, images as 1-frame clips, and
the training-side manifest check (megatron_nbp.data.check_manifest, called by `pretrain`).

The reference for the crash tests is an uninterrupted in-process run on the same inputs. The kill
point is random (seed printed in failure messages; set TOKENIZE_KILL_SEED to replay one).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.shards import (
    clip_key,
    iter_shard,
    read_failures,
    read_manifest,
    read_sidecar,
    shard_name,
)
from data_prep.tokenize_job import TokenizeConfig, run_tokenize_job
from data_prep.video_io import decode_video, frames_to_tensor
from data_prep.synthetic import pattern_frames, write_pattern_video
from tests.dist_utils import kill_process_tree
from tests.distributed.test_tokenize_job import _read_all

REPO = Path(__file__).resolve().parents[2]
NUM_FRAMES, STRIDE, RES = 5, 1, 16
GOOD = {f"c{i % 2}/v{i}.mp4": 10 + 3 * i for i in range(7)}  # 10..28 frames -> 2..5 clips each (hop 5)
BROKEN = {"c0/corrupt.mp4": "cannot decode", "c1/short.mp4": "too short", "c1/trunc.mp4": "cannot decode",
          "c0/fake.mkv": "cannot decode", "readme.md": "not video media"}


def _tiny_tokenizer(path: Path) -> Path:
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer

    torch.manual_seed(0)
    return save_tokenizer(VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")), path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """7 good videos + 5 bad files, the tiny tokenizer, and an uninterrupted reference run
    (1 video per shard, batch size 1: many points at which a kill can land)."""
    root = tmp_path_factory.mktemp("tokscale")
    videos = root / "videos"
    for i, (rel, n) in enumerate(GOOD.items()):
        write_pattern_video(videos / rel, num_frames=n, height=24, width=32, seed=i)
    write_pattern_video(videos / "c1/short.mp4", num_frames=3)
    write_pattern_video(root / "whole.mp4", num_frames=30, seed=9)
    (videos / "c1/trunc.mp4").write_bytes((root / "whole.mp4").read_bytes()[:1500])
    (videos / "c0/corrupt.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (videos / "c0/fake.mkv").write_text("plain text, not matroska\n" * 50)
    (videos / "readme.md").write_text("not a video")
    ckpt = _tiny_tokenizer(root / "tok.safetensors")
    cfg = TokenizeConfig(input_dir=videos, output_dir=root / "reference", tokenizer=ckpt, num_frames=NUM_FRAMES,
                         frame_stride=STRIDE, resolution=RES, videos_per_shard=1, batch_size=1,
                         label_from_dir=True, progress=False)
    manifest = run_tokenize_job(cfg)
    return {"root": root, "cfg": cfg, "manifest": manifest, "samples": _read_all(cfg.output_dir)}


def _command(cfg: TokenizeConfig, out: Path, nproc: int | None) -> list[str]:
    launcher = [sys.executable, str(REPO / "launchers/tokenize_videos.py")]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                    str(REPO / "launchers/tokenize_videos.py")]
    return launcher + ["--input", str(cfg.input_dir), "--output", str(out), "--tokenizer", str(cfg.tokenizer),
                       "--num-frames", str(NUM_FRAMES), "--frame-stride", str(STRIDE), "--resolution", str(RES),
                       "--videos-per-shard", "1", "--batch-size", "1", "--label-from-dir", "--no-progress"]


def _finished(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*.json"))


@pytest.mark.parametrize("nproc", [None, 2], ids=["python", "torchrun-2"])
def test_sigkill_at_random_point_then_rerun_writes_each_clip_once(dataset, tmp_path, nproc):
    seed = int(os.environ.get("TOKENIZE_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    cfg, out = dataset["cfg"], tmp_path / "out"
    num_shards = len(dataset["manifest"]["shards"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # Kill once `wait_for` shards are finished plus a random delay (a fraction of one shard's measured
    # time), i.e. at a random point: while decoding, encoding, writing a tar, or between a tar and its
    # sidecar. On a fast machine the remaining shards can all finish inside the delay; such a run is not
    # a mid-run kill, so it is repeated (fresh output, shorter delay) rather than counted.
    for attempt in range(4):
        shutil.rmtree(out, ignore_errors=True)
        wait_for = rng.randint(1, num_shards - 4)
        proc = subprocess.Popen(_command(cfg, out, nproc), cwd=tmp_path, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        first = None
        while len(_finished(out)) < wait_for and proc.poll() is None and time.monotonic() < deadline:
            if first is None and _finished(out):
                first = time.monotonic()
            time.sleep(0.005)
        per_shard = (time.monotonic() - first) / max(1, wait_for - 1) if first else 0.2
        time.sleep(rng.uniform(0.0, 0.5 * per_shard) / (attempt + 1))
        assert proc.poll() is None, f"seed {seed}: job ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        kill_process_tree(proc)  # the whole job (torchrun agent and all ranks), like a node failure
        proc.stderr.close()
        done_before = {n: (out / n).stat().st_mtime_ns for n in _finished(out)}
        if len(done_before) < num_shards and not (out / "manifest.json").exists():
            break
    assert len(done_before) < num_shards and not (out / "manifest.json").exists(), f"seed {seed}: not mid-run"

    rerun = subprocess.run(_command(cfg, out, nproc), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, f"seed {seed}: {rerun.stderr[-3000:]}"
    reference, got = dataset["samples"], _read_all(out)  # _read_all fails on any duplicate key
    assert len(got) == len(reference) == read_manifest(out)["num_samples"], f"seed {seed}"
    assert got.keys() == reference.keys(), f"seed {seed}"
    for key, (tokens, meta) in reference.items():
        np.testing.assert_array_equal(got[key][0], tokens)
        assert got[key][1] == meta
    assert read_manifest(out) == {**dataset["manifest"]}
    assert read_failures(out) == dataset["manifest"]["failures"]
    for name, mtime in done_before.items():  # finished shards are never rewritten
        assert (out / name).stat().st_mtime_ns == mtime, f"seed {seed}: {name} rewritten"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), f"seed {seed}: temp files left"
    for k in range(num_shards):  # each sidecar lists exactly its tar's keys
        assert [key for key, _, _ in iter_shard(out / shard_name(k), verify=False)] == read_sidecar(
            out / shard_name(k))["keys"]


def test_bad_files_listed_and_nothing_else_lost(dataset):
    manifest = dataset["manifest"]
    failures = {f["path"]: f["reason"] for f in manifest["failures"]}
    assert set(failures) == set(BROKEN)
    for path, word in BROKEN.items():
        assert word in failures[path], failures[path]
    expected = {clip_key(rel, s) for rel, n in GOOD.items() for s in range(0, n - NUM_FRAMES + 1, NUM_FRAMES)}
    assert set(dataset["samples"]) == expected and manifest["num_samples"] == len(expected)
    assert manifest["labels"] == ["c0", "c1"]


def test_clip_sampling_fps_and_uniform_placement(dataset, tmp_path):
    """--fps 4 on 8 fps videos keeps every second frame; --clip-placement uniform with one clip per
    video takes the middle clip of the resampled video."""
    cfg = dataset["cfg"].replace(output_dir=tmp_path / "out", fps=4.0, clip_placement="uniform",
                              max_clips_per_video=1, videos_per_shard=4, batch_size=4)
    manifest = run_tokenize_job(cfg)
    samples = _read_all(cfg.output_dir)
    expected = {}
    for rel, n in GOOD.items():
        m = (n + 1) // 2  # frames 0, 2, 4, ... of n
        if m >= NUM_FRAMES:
            expected[clip_key(rel, (m - NUM_FRAMES) // 2)] = rel
    assert set(samples) == set(expected)
    assert manifest["clip"]["fps"] == 4.0 and manifest["clip"]["clip_placement"] == "uniform"
    assert {meta["fps"] for _, meta in samples.values()} == {4.0}
    # tokens: encode the resampled middle clip built straight from the known synthetic frames
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    key, rel = next(iter(expected.items()))
    start = samples[key][1]["clip_start"]
    frames, _ = decode_video(
        cfg.input_dir / rel, size=RES)
    clip = frames[::2][start:start + NUM_FRAMES]
    with torch.no_grad():
        np.testing.assert_array_equal(samples[key][0], tok.encode(frames_to_tensor(clip)[None])[0].numpy())


def test_images_as_one_frame_clips(dataset, tmp_path):
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    (images / "dogs").mkdir()
    pixels = {}
    for i, rel in enumerate(["cats/a.png", "cats/b.PNG", "dogs/c.png"]):
        pixels[rel] = pattern_frames(1, RES, RES, seed=i)[0]
        Image.fromarray(pixels[rel]).save(images / rel)
    Image.fromarray(pattern_frames(1, 40, 56, seed=5)[0]).save(images / "dogs/d.jpg", quality=95)
    (images / "dogs/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    Image.fromarray(pattern_frames(1, 64, 64, seed=6)[0]).save(tmp_path / "full.jpg", quality=95)
    (images / "cats/cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    (images / "cats/clip.mp4").write_bytes(b"")  # not an image: listed as skipped
    cfg = dataset["cfg"].replace(input_dir=images, output_dir=tmp_path / "out", media="image",
                              num_frames=1, videos_per_shard=2)
    manifest = run_tokenize_job(cfg)
    assert manifest["media"] == "image" and manifest["tokenizer"]["latent_shape"] == [1, RES // 8, RES // 8]
    assert manifest["clip"]["num_frames"] == 1 and manifest["labels"] == ["cats", "dogs"]
    failures = {f["path"]: f["reason"] for f in manifest["failures"]}
    assert set(failures) == {"dogs/broken.png", "cats/cut.jpg", "cats/clip.mp4"}
    assert "cannot decode image" in failures["dogs/broken.png"] and "cannot decode image" in failures["cats/cut.jpg"]
    samples = _read_all(cfg.output_dir)
    assert set(samples) == {clip_key(rel, 0) for rel in [*pixels, "dogs/d.jpg"]}
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    for rel, px in pixels.items():  # lossless PNG at the target size: reference = the pixels themselves
        tokens, meta = samples[clip_key(rel, 0)]
        assert tokens.shape == (1, RES // 8, RES // 8) and meta["num_frames"] == 1
        with torch.no_grad():
            np.testing.assert_array_equal(tokens, tok.encode(frames_to_tensor(px[None])[None])[0].numpy())
    with pytest.raises(ValueError, match="num-frames 1"):
        TokenizeConfig(input_dir=images, output_dir=tmp_path / "x", tokenizer=cfg.tokenizer, media="image",
                       num_frames=5).validate()


# ------------------------------------------------------------------ training-side manifest check

def _model(**kw):
    from megatron_nbp.config import ModelConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64000, latent_shape=(2, 2, 2),
                block_shape=(1, 1, 2), condition_frames=1)
    return ModelConfig(**{**base, **kw})


def test_check_manifest_accepts_matching_and_refuses_mismatches(dataset):
    from data_prep.tokenizer import tokenizer_sha256
    from megatron_nbp.data import DataError, check_manifest

    data = dataset["cfg"].output_dir
    sha = tokenizer_sha256(dataset["cfg"].tokenizer)  # independent: hash of the checkpoint file
    assert check_manifest(data, _model(), sha)["num_samples"] == dataset["manifest"]["num_samples"]
    assert check_manifest(data, _model(), sha.upper()) is not None  # hex case does not matter
    with pytest.raises(DataError, match="sha256"):
        check_manifest(data, _model(), "0" * 64)
    with pytest.raises(DataError, match=r"latent shape \(2, 2, 2\).*5 frames.*\(5, 2, 2\)"):
        check_manifest(data, _model(latent_shape=(5, 2, 2)))
    with pytest.raises(DataError, match="codebook 64000"):
        check_manifest(data, _model(vocab_size=1000))
    hybrid = dict(layout="hybrid", condition_type="class")
    assert check_manifest(data, _model(**hybrid, condition_labels=["c0", "c1", "c2"]))
    with pytest.raises(DataError, match=r"\['c1'\] are not in model.condition_labels"):
        check_manifest(data, _model(**hybrid, condition_labels=["c0"]))


def test_pretrain_refuses_wrong_tokenizer_before_building_the_model(dataset, monkeypatch):
    from megatron_nbp import training
    from megatron_nbp.config import NBPConfig
    from megatron_nbp.data import DataError
    from megatron_nbp.training import loop, megatron_backend

    def must_not_run(*args, **kwargs):
        raise AssertionError("model/parallel state built before the data check")

    monkeypatch.setattr(loop, "initialize_parallel", must_not_run)
    monkeypatch.setattr(megatron_backend, "build_training_state", must_not_run)
    cfg = NBPConfig(model=_model(), data=str(dataset["cfg"].output_dir))
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, 1
    cfg.train.tokenizer_sha256 = "f" * 64
    with pytest.raises(DataError, match="train.tokenizer_sha256"):
        training.pretrain(cfg)
