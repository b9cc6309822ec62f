"""Synthetic token shards (tests, benchmarks): learnable structure, written through the real shard format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import shard_name, write_manifest, write_shard


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
        shards.append({"name": shard_name(s), "num_samples": n})
    write_manifest(out_dir, {
        "format": "megatron-nbp-tokens/1",
        "tokenizer": {"path": "synthetic", "sha256": "0" * 64, "levels": [8, 8, 8, 5, 5, 5],
                      "codebook_size": vocab, "latent_shape": list(latent_shape)},
        "clip": {"num_frames": 17, "frame_stride": 1, "resolution": [64, 64]},
        "shards": shards, "num_samples": num_clips, "failures": [],
    })
    return clips
