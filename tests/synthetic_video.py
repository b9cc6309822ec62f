"""Synthetic video files for data_prep tests, written with PyAV independently of data_prep.video_io."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return frames
