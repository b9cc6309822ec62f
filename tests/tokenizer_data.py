"""Small tokenizer training data shared by the tokenizer tests: synthetic pattern videos and the YAML of a tiny
tokenizer (a few thousand parameters; trains at ~20 steps/s on one core at 16x16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the tiny tokenizer's model: section (16x16 clips of 5 frames -> 2x2x2 latents)
SMALL_MODEL = ("model:\n  base_channels: 4\n  channel_multipliers: [1, 1, 2, 2]\n  num_res_blocks: 1\n"
               "  num_mid_blocks: 0\n  temporal_downsample: [true, true, false]\n  norm_groups: 2\n")


def write_pattern(path: Path, frames: int = 24, size: int = 32) -> None:
    """An H.264 MP4 of ``frames`` moving sine patterns, ``size`` x ``size`` pixels, 8 fps."""
    from data_prep.video_io import write_mp4

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    video = [np.stack([127.5 + 100 * np.sin((xx + 2 * t) / 5.0), 127.5 + 100 * np.cos((yy - t) / 7.0),
                       127.5 + 60 * np.sin((xx + yy + 3 * t) / 9.0)], -1).clip(0, 255).astype(np.uint8)
             for t in range(frames)]
    write_mp4(np.stack(video), path, fps=8)


def write_two_videos(root: Path) -> Path:
    """``root/videos/a.mp4`` (24 frames), ``b.mp4`` (20) and ``root/small.yaml`` (:data:`SMALL_MODEL`);
    returns the YAML's path."""
    write_pattern(root / "videos" / "a.mp4")
    write_pattern(root / "videos" / "b.mp4", frames=20)
    config = root / "small.yaml"
    config.write_text(SMALL_MODEL)
    return config
