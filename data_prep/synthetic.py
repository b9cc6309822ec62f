"""Synthetic data for tests and benchmarks: token shards with learnable structure, written through the real
shard format, and small pattern videos written with PyAV directly (independently of data_prep.video_io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import manifest_entry, shard_name, write_manifest, write_shard


def synthetic_clips(num_clips: int, latent_shape=(5, 8, 8), vocab: int = 64000, seed: int = 0) -> np.ndarray:
    """uint16 [num_clips, T', H', W']: each clip repeats a random first frame with a few tokens changed
    per frame, so the next block is predictable from the previous one (loss can fall)."""
    rng = np.random.default_rng(seed)
    t, h, w = latent_shape
    palette = rng.integers(0, vocab, size=64)
    clips = np.empty((num_clips, t, h, w), dtype=np.uint16)
    for c in range(num_clips):
        frame = palette[rng.integers(0, len(palette), size=(h, w))]
        for f in range(t):
            clips[c, f] = frame
            flip = rng.random((h, w)) < 0.1
            frame = np.where(flip, palette[rng.integers(0, len(palette), size=(h, w))], frame)
    return clips


def write_synthetic_shards(out_dir: str | Path, num_clips: int = 48, clips_per_shard: int = 12,
                           latent_shape=(5, 8, 8), seed: int = 0, vocab: int = 64000) -> np.ndarray:
    """Write ``num_clips`` synthetic clips as token shards + manifest; returns the clips array."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = synthetic_clips(num_clips, latent_shape, vocab=vocab, seed=seed)
    shards = []
    for s, start in enumerate(range(0, num_clips, clips_per_shard)):
        samples = [
            (f"clip{i:05d}", clips[i], {"source": f"synthetic/{i}", "clip_start": 0, "num_frames": 17,
                                        "frame_stride": 1, "fps": 8.0, "label": "synthetic",
                                        "latent_shape": list(latent_shape)})
            for i in range(start, min(start + clips_per_shard, num_clips))
        ]
        n = write_shard(out_dir / shard_name(s), samples)
        shards.append(manifest_entry(out_dir / shard_name(s), n))
    write_manifest(out_dir, {
        "format": "megatron-nbp-tokens/1",
        "tokenizer": {"path": "synthetic", "sha256": "0" * 64, "levels": [8, 8, 8, 5, 5, 5],
                      "codebook_size": vocab, "latent_shape": list(latent_shape)},
        "clip": {"num_frames": 17, "frame_stride": 1, "resolution": [64, 64]},
        "shards": shards, "num_samples": num_clips, "failures": [],
    })
    return clips


def pattern_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: smooth colour gradients plus a bright square moving 2 px per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, rng.integers(40, 200))], -1)
    frames = np.repeat(base[None].astype(np.uint8), num_frames, axis=0)
    side = max(4, min(height, width) // 4)
    for t in range(num_frames):
        x0 = (2 * t) % max(width - side, 1)
        frames[t, height // 3 : height // 3 + side, x0 : x0 + side] = 255
    return frames


def write_pattern_video(path: Path, num_frames: int, height: int = 40, width: int = 48, fps: int = 8, seed: int = 0) -> np.ndarray:
    """Write :func:`pattern_frames` as a near-lossless H.264 mp4 with PyAV (independently of
    ``data_prep.video_io``); returns the frames written."""
    frames = pattern_frames(num_frames, height, width, seed)
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return frames
