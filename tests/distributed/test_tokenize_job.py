"""Tests of the offline tokenization job (data_prep.tokenize_job + launchers/tokenize_videos.py).

One small dataset (synthetic PyAV videos + broken files) and a tiny random tokenizer; clips of
5 frames at 16x16 keep each run to a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shards import (
    clip_key, iter_shard, read_failures, read_manifest, read_sidecar, shard_name, sidecar_path,
)
from data_prep.tokenize_job import TokenizeConfig, plan_shards, run_tokenize_job, shards_for_rank
from data_prep.video_io import clip_starts, frames_to_tensor, load_clip
from data_prep.synthetic import write_pattern_video

REPO = Path(__file__).resolve().parents[2]
NUM_FRAMES, STRIDE, HOP, RES = 5, 2, 3, 16
GOOD = {"classA/v0.mp4": 20, "classA/v1.mp4": 13, "classB/v2.mp4": 9}  # frames per good video
BROKEN = {"classB/short.mp4": "too short", "corrupt.mp4": "cannot decode", "fake.avi": "cannot decode",
          "classA/truncated.mp4": "cannot decode", "notes.txt": "not video media"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Videos + tokenizer + one finished single-process run (shared by the tests of this module)."""
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("tokjob")
    videos = root / "videos"
    for i, (rel, n) in enumerate(GOOD.items()):
        write_pattern_video(videos / rel, num_frames=n, height=40, width=48, seed=i)
    write_pattern_video(videos / "classB/short.mp4", num_frames=6)  # span needs 9 frames
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (videos / "fake.avi").write_text("not a video\n" * 100)
    (videos / "notes.txt").write_text("listed as skipped: not a video extension")
    write_pattern_video(root / "whole.mp4", num_frames=20, seed=7)
    whole = (root / "whole.mp4").read_bytes()
    (videos / "classA/truncated.mp4").write_bytes(whole[: len(whole) // 2])  # a download cut in half
    torch.manual_seed(0)
    ckpt = save_tokenizer(VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")),
                          root / "tok.safetensors")
    cfg = TokenizeConfig(input_dir=videos, output_dir=root / "out", tokenizer=ckpt, num_frames=NUM_FRAMES,
                         frame_stride=STRIDE, clip_hop=HOP, resolution=RES, videos_per_shard=2, batch_size=3,
                         label_from_dir=True, progress=False)
    manifest = run_tokenize_job(cfg)
    return {"root": root, "cfg": cfg, "manifest": manifest, "ckpt": ckpt}


def _read_all(out_dir: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (tokens, meta) over all shards of the manifest; fails on a duplicate key."""
    result = {}
    for entry in read_manifest(out_dir)["shards"]:
        for key, tokens, meta in iter_shard(out_dir / entry["name"]):
            assert key not in result, f"clip {key} written twice"
            result[key] = (tokens, meta)
    return result


def _mtimes(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out_dir.glob("shard-*"))}


def _expected_keys() -> set[str]:
    return {clip_key(rel, s) for rel, n in GOOD.items() for s in clip_starts(n, NUM_FRAMES, STRIDE, HOP)}


def test_plan_and_rank_assignment():
    videos = [Path(f"v{i}") for i in range(7)]
    plan = plan_shards(videos, 3)
    assert plan == [videos[0:3], videos[3:6], videos[6:7]]
    assert shards_for_rank(5, 0, 2) == [0, 2, 4] and shards_for_rank(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        shards_for_rank(5, 2, 2)


def test_every_clip_written_exactly_once(dataset):
    manifest, out = dataset["manifest"], dataset["cfg"].output_dir
    assert _expected_keys() == {clip_key("classA/v0.mp4", s) for s in (0, 3, 6, 9)} | {
        clip_key("classA/v1.mp4", s) for s in (0, 3)} | {clip_key("classB/v2.mp4", 0)}
    samples = _read_all(out)
    assert set(samples) == _expected_keys()
    assert manifest["num_samples"] == len(samples) == 7
    assert [s["name"] for s in manifest["shards"]] == [shard_name(k) for k in range(4)]  # 7 videos / 2
    tok = dataset["manifest"]["tokenizer"]
    assert tok["latent_shape"] == [2, 2, 2] and tok["codebook_size"] == 64000 and len(tok["sha256"]) == 64
    assert manifest["clip"] == {"num_frames": NUM_FRAMES, "frame_stride": STRIDE, "resolution": [RES, RES],
                                "fps": None, "clip_hop": HOP, "clip_placement": "first", "max_clips_per_video": None}
    assert manifest["media"] == "video" and manifest["labels"] == ["classA", "classB"]
    for key, (tokens, meta) in samples.items():
        assert tokens.dtype == np.uint16 and tokens.shape == (2, 2, 2)
        assert key == clip_key(meta["source"], meta["clip_start"])
        assert meta["label"] == meta["source"].split("/")[0]
        assert meta["fps"] == pytest.approx(8.0) and meta["frame_stride"] == STRIDE


def test_failures_listed_with_reasons(dataset):
    failures = {f["path"]: f["reason"] for f in dataset["manifest"]["failures"]}
    assert set(failures) == set(BROKEN)
    for path, word in BROKEN.items():
        assert word in failures[path], failures[path]
    # ... and kept in the sidecar of the shard that met them (sorted list: classA/truncated.mp4 is
    # video 0 -> shard 0, classB/short.mp4 video 3 -> shard 1)
    out = dataset["cfg"].output_dir
    assert [f["path"] for f in read_sidecar(out / shard_name(0))["failures"]] == ["classA/truncated.mp4"]
    assert [f["path"] for f in read_sidecar(out / shard_name(1))["failures"]] == ["classB/short.mp4"]
    # ... and in failures.jsonl, one JSON object per line, the same list as the manifest's
    assert read_failures(dataset["cfg"].output_dir) == dataset["manifest"]["failures"]


def test_tokens_equal_direct_encoding(dataset):
    """Independent path: load_clip -> frames_to_tensor -> tokenizer.encode."""
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(dataset["ckpt"])
    samples = _read_all(dataset["cfg"].output_dir)
    for rel, start in [("classA/v0.mp4", 9), ("classB/v2.mp4", 0)]:
        clip = load_clip(dataset["cfg"].input_dir / rel, NUM_FRAMES, RES, start=start, frame_stride=STRIDE)
        with torch.no_grad():
            expected = tok.encode(frames_to_tensor(clip)[None])[0].numpy()
        np.testing.assert_array_equal(samples[clip_key(rel, start)][0], expected)


def test_the_next_batch_is_queued_before_the_previous_ids_are_read_back_across_shards(dataset):
    """The builder queues batch i+1 on the device before reading batch i's ids back, also when batch i+1 is the
    next shard's; batches never mix shards, every shard (one with no clip too) ends after its own samples, and
    each batch's ids are the tokenizer's on exactly that batch."""
    from data_prep.tokenize_job import DecodedMedia, _shard_samples, _ShardBuilder, frames_batch_to_tensor
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(dataset["ckpt"])
    cfg = dataset["cfg"].replace(batch_size=2)
    builder = _ShardBuilder(tok, cfg, tuple(tok.latent_shape(NUM_FRAMES, RES, RES)))
    order, launch, finish = [], builder._launch, builder._finish
    builder._launch = lambda batch: order.append(("launch", [k for k, _, _ in batch])) or launch(batch)
    builder._finish = lambda done: order.append(("finish", [k for k, _, _ in done.batch])) or finish(done)
    g = torch.Generator().manual_seed(0)

    def media(rel: str, clips: int) -> DecodedMedia:
        frames = torch.randint(0, 256, (clips, NUM_FRAMES, RES, RES, 3), generator=g, dtype=torch.uint8)
        return DecodedMedia(rel, None, 25.0, list(range(clips)), frames)

    items = [media("a", 3), media("b", 1), DecodedMedia("bad", None, 0.0, [], None, "cannot decode"), media("c", 1)]
    failures, labels = [[], [], []], [set(), set(), set()]
    events = builder.shards(iter(items), [2, 1, 1], failures, labels)
    written = [list(_shard_samples(events, j)) for j in range(3)]
    a0, a1, a2, b0, c0 = (clip_key(r, s) for r, s in [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0)])
    assert [[key for key, _, _ in shard] for shard in written] == [[a0, a1, a2, b0], [], [c0]]
    assert order == [("launch", [a0, a1]), ("launch", [a2, b0]), ("finish", [a0, a1]), ("launch", [c0]),
                     ("finish", [a2, b0]), ("finish", [c0])]
    assert failures == [[], [{"path": "bad", "reason": "cannot decode"}], []]
    clips = {clip_key(m.rel, s): c for m in items if m.clips is not None for s, c in zip(m.starts, m.clips)}
    for batch in ([a0, a1], [a2, b0], [c0]):
        with torch.no_grad():
            ids = tok.encode(frames_batch_to_tensor(torch.stack([clips[k] for k in batch]), torch.device("cpu")))
        got = {key: tokens for shard in written for key, tokens, _ in shard}
        for key, expected in zip(batch, ids.numpy()):
            np.testing.assert_array_equal(got[key], expected)
    assert builder.clips_done == 5 and builder.videos_done == 4


def test_decode_workers_write_exactly_the_same_shards(dataset, tmp_path):
    """Decoding in 2 DataLoader worker processes (1 file prefetched each) writes the same files, byte for
    byte (tars with every sample's bytes and keys in order, sidecars, failures.jsonl, manifest), as the
    module's in-process run (num_workers 0); the broken files are still skipped and recorded."""
    cfg = dataset["cfg"]
    assert cfg.num_workers == 0
    workers = cfg.replace(output_dir=tmp_path / "workers", num_workers=2, prefetch_factor=1)
    assert run_tokenize_job(workers) == dataset["manifest"]
    names = sorted(p.name for p in cfg.output_dir.iterdir())
    assert sorted(p.name for p in workers.output_dir.iterdir()) == names
    for entry in dataset["manifest"]["shards"]:  # sample by sample first, for a readable failure
        single = [(k, t.tobytes(), m) for k, t, m in iter_shard(cfg.output_dir / entry["name"])]
        multi = [(k, t.tobytes(), m) for k, t, m in iter_shard(workers.output_dir / entry["name"])]
        assert multi == single, entry["name"]
    for name in names:
        assert (workers.output_dir / name).read_bytes() == (cfg.output_dir / name).read_bytes(), name
    assert {f["path"] for f in read_failures(workers.output_dir)} == set(BROKEN)


@pytest.mark.parametrize("options", [{"channels_last": True}, {"channels_last": True, "compile": True}])
def test_encoding_speed_settings_write_the_same_clips(dataset, tmp_path, options):
    """--channels-last (and with --compile: partial batches padded to --batch-size 3) writes the same
    shards as the default run: the same clips, keys, metadata, failures and manifest, token ids equal up to
    rounding (allowed: 2 in 100; on the reference CPU all were equal)."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = dataset["cfg"]
    fast = cfg.replace(output_dir=tmp_path / "fast", **options)
    assert run_tokenize_job(fast) == dataset["manifest"]
    plain, other = _read_all(cfg.output_dir), _read_all(fast.output_dir)
    assert list(other) == list(plain) and [m for _, m in other.values()] == [m for _, m in plain.values()]
    equal = sum(int((other[k][0] == plain[k][0]).sum()) for k in plain)
    total = sum(t.size for t, _ in plain.values())
    print(f"{options}: {equal}/{total} token ids equal to the default run's")
    assert equal >= 0.98 * total
    assert read_failures(fast.output_dir) == read_failures(cfg.output_dir)
    torch._dynamo.reset()


def test_rerun_skips_finished_shards(dataset):
    out = dataset["cfg"].output_dir
    before = _mtimes(out)
    assert run_tokenize_job(dataset["cfg"]) == dataset["manifest"]
    assert _mtimes(out) == before


def test_rerun_after_crash_regenerates_only_missing_shard(dataset, tmp_path):
    cfg = dataset["cfg"].replace(output_dir=tmp_path / "out")
    shutil.copytree(dataset["cfg"].output_dir, cfg.output_dir)  # copy2 keeps mtimes
    original = _read_all(cfg.output_dir)
    before = _mtimes(cfg.output_dir)
    # Crash while writing shard 1: its sidecar is gone, a stale tar and temp files are left behind.
    sidecar_path(cfg.output_dir / shard_name(1)).unlink()
    (cfg.output_dir / (shard_name(1) + ".tmp")).write_bytes(b"half a tar")
    (cfg.output_dir / f".{shard_name(1)[:-4]}.json.1234.tmp").write_text("{")
    (cfg.output_dir / "manifest.json").unlink()
    assert run_tokenize_job(cfg) == dataset["manifest"]
    after = _mtimes(cfg.output_dir)
    assert sorted(after) == sorted(before)
    assert [n for n in after if after[n] != before[n]] == ["shard-000001.json", "shard-000001.tar"]
    assert not list(cfg.output_dir.glob("*.tmp")) and not list(cfg.output_dir.glob(".*.tmp"))
    regenerated = _read_all(cfg.output_dir)
    assert regenerated.keys() == original.keys()
    assert all(np.array_equal(regenerated[k][0], original[k][0]) for k in original)


def test_rerun_with_other_settings_is_refused(dataset, tmp_path):
    cfg = dataset["cfg"].replace(output_dir=tmp_path / "out")
    shutil.copytree(dataset["cfg"].output_dir, cfg.output_dir)
    with pytest.raises(RuntimeError, match="different"):
        run_tokenize_job(cfg.replace(resolution=24))


def test_invalid_settings():
    with pytest.raises(ValueError, match="1 \\+ 4n"):
        TokenizeConfig(input_dir=Path("."), output_dir=Path("."), tokenizer=Path("t"), num_frames=6).validate()
    with pytest.raises(ValueError, match="multiple of 8"):
        TokenizeConfig(input_dir=Path("."), output_dir=Path("."), tokenizer=Path("t"), resolution=20).validate()


def test_launcher_rejects_bad_flags(capsys):
    from data_prep.cli import tokenize_videos

    with pytest.raises(SystemExit):
        tokenize_videos.parse_args(["--input", "a", "--output", "b", "--tokenizer", "c", "--num-frames", "6"])
    assert "1 + 4n" in capsys.readouterr().err


def test_torchrun_two_processes_match_single_process(dataset, tmp_path):
    cfg = dataset["cfg"]
    out = tmp_path / "out2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "launchers/tokenize_videos.py"), "--input", str(cfg.input_dir), "--output", str(out),
           "--tokenizer", str(cfg.tokenizer), "--num-frames", str(NUM_FRAMES), "--frame-stride", str(STRIDE),
           "--clip-hop", str(HOP), "--resolution", str(RES), "--videos-per-shard", "2", "--batch-size", "3",
           "--label-from-dir"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenize (2 ranks)" in proc.stderr and "clips/s" in proc.stderr  # rank-0 progress bar
    assert "tokenize: rank 0/2:" in proc.stdout and "tokenize: rank 1/2:" in proc.stdout  # per-rank clips/s
    assert re.search(r"tokenize: rank 0/2: .*clips/s; [\d.]+ after the first batch\)", proc.stdout), proc.stdout
    assert re.search(r"waited [\d.]+ s for decoded media, [\d.]+ s for the device's ids", proc.stdout), proc.stdout
    manifest = read_manifest(out)
    assert {k: v for k, v in manifest.items()} == dataset["manifest"]
    single, multi = _read_all(cfg.output_dir), _read_all(out)
    assert multi.keys() == single.keys()
    for key in single:
        np.testing.assert_array_equal(multi[key][0], single[key][0])
        assert multi[key][1] == single[key][1]
    for k in range(4):  # deterministic assignment and content: shards are byte-identical
        assert (out / shard_name(k)).read_bytes() == (cfg.output_dir / shard_name(k)).read_bytes()


def _write_rgb_video(path: Path, height: int, width: int, num_frames: int) -> None:
    """A lossless PNG-in-QuickTime video, which (unlike yuv420p H.264) allows odd sizes."""
    from data_prep.synthetic import pattern_frames
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("png", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for frame in pattern_frames(num_frames, height, width, 3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def test_empty_files_are_skipped_and_odd_or_small_resolutions_are_kept(dataset, tmp_path):
    """A 0-byte video is listed as a failure; odd-sized (33x45), portrait and smaller-than-crop (6x10) videos are
    good data: resized / centre-cropped to the clip resolution and tokenized, not dropped."""
    videos = tmp_path / "videos"
    write_pattern_video(videos / "good.mp4", num_frames=9)
    (videos / "empty.mp4").parent.mkdir(parents=True, exist_ok=True)
    (videos / "empty.mp4").write_bytes(b"")
    for name, (h, w) in {"odd.mov": (33, 45), "portrait.mov": (47, 21), "tiny.mov": (6, 10)}.items():
        _write_rgb_video(videos / name, h, w, num_frames=9)
    cfg = dataset["cfg"].replace(input_dir=videos, output_dir=tmp_path / "out", label_from_dir=False)
    manifest = run_tokenize_job(cfg)
    failures = {f["path"]: f["reason"] for f in manifest["failures"]}
    assert list(failures) == ["empty.mp4"], failures
    samples = _read_all(cfg.output_dir)
    assert {meta["source"] for _, meta in samples.values()} == {"good.mp4", "odd.mov", "portrait.mov", "tiny.mov"}
    assert all(tokens.shape == (2, 2, 2) for tokens, _ in samples.values())
    # the odd-sized clip's tokens are those of its frames resized/cropped independently
    key = clip_key("odd.mov", 0)
    clip = load_clip(videos / "odd.mov", NUM_FRAMES, RES, 0, STRIDE)
    assert clip.shape[1:3] == (RES, RES)
    from data_prep.tokenizer import load_tokenizer

    with torch.no_grad():
        expected = load_tokenizer(dataset["ckpt"]).encode(frames_to_tensor(clip)[None])[0].numpy()
    np.testing.assert_array_equal(samples[key][0].astype(np.int64), expected.astype(np.int64))
