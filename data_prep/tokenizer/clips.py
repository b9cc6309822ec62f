"""In-memory clip bank for tokenizer training: decode every video once, sample random clips per step."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep import video_io

__all__ = ["ClipBank", "load_clip_bank"]

log = logging.getLogger(__name__)


@dataclass
class ClipBank:
    """Resized videos held in memory plus this rank's share of the clip windows.

    Attributes:
        videos: per video, ``uint8 [N, S, S, 3]`` frames (already resized / center-cropped).
        names: file name of each video.
        windows: ``(video, start)`` of every training clip this rank may draw (all starts, hop 1).
        eval_windows: ``(video, start)`` of this rank's non-overlapping evaluation clips.
        num_frames: frames per clip (1 + 4n). frame_stride: step between used frames.
    """

    videos: list[np.ndarray]
    names: list[str]
    windows: list[tuple[int, int]]
    eval_windows: list[tuple[int, int]]
    num_frames: int
    frame_stride: int

    def clip(self, video: int, start: int) -> torch.Tensor:
        """One clip as float32 ``[3, num_frames, S, S]`` in [-1, 1]."""
        stop = start + (self.num_frames - 1) * self.frame_stride + 1
        return video_io.frames_to_tensor(self.videos[video][start:stop:self.frame_stride])

    def sample_clips(self, batch_size: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
        """Random clips (with replacement), each flipped horizontally with probability 1/2 if ``flip``.

        Returns float32 ``[batch_size, 3, num_frames, S, S]`` in [-1, 1].
        """
        picks = torch.randint(len(self.windows), (batch_size,), generator=generator).tolist()
        batch = torch.stack([self.clip(*self.windows[i]) for i in picks])
        return _random_flip(batch, generator) if flip else batch

    def sample_images(self, batch_size: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
        """Random single frames as 1-frame videos, float32 ``[batch_size, 3, 1, S, S]`` in [-1, 1]."""
        out = []
        for _ in range(batch_size):
            video, start = self.windows[int(torch.randint(len(self.windows), (1,), generator=generator))]
            offset = int(torch.randint(self.num_frames, (1,), generator=generator)) * self.frame_stride
            out.append(video_io.frames_to_tensor(self.videos[video][start + offset : start + offset + 1]))
        batch = torch.stack(out)
        return _random_flip(batch, generator) if flip else batch


def _random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample of ``[B, C, T, H, W]`` along W with probability 1/2."""
    flips = torch.rand(batch.shape[0], generator=generator) < 0.5
    if flips.any():
        batch[flips] = batch[flips].flip(-1)
    return batch


def load_clip_bank(
    root: str | os.PathLike,
    resolution: int,
    num_frames: int,
    frame_stride: int = 1,
    rank: int = 0,
    world_size: int = 1,
    holdout_fraction: float = 0.0,
) -> ClipBank:
    """Decode every video under ``root`` once (resized to ``resolution``), split clip windows by rank.

    Undecodable or too-short videos are skipped with a warning. Windows are listed in sorted file order
    and rank r keeps windows r, r + world_size, ... (deterministic, disjoint across ranks).

    ``holdout_fraction`` f in (0, 1): the last ``ceil(f * N)`` frames of every N-frame video are held back:
    training windows lie entirely in the first part, evaluation windows (non-overlapping) entirely in the
    held-back tail (videos whose tail is shorter than a clip give no evaluation clip). f = 0: training
    and evaluation windows both cover the whole video (reconstruction on seen footage).

    Raises:
        NotADirectoryError: ``root`` is not a directory (from ``video_io.list_videos``).
        ValueError: no usable video, or fewer clip windows than ranks.
    """
    paths = video_io.list_videos(root)
    videos, names = [], []
    for path in paths:
        try:
            frames, _ = video_io.decode_video(path, size=resolution)
        except video_io.VideoDecodeError as exc:
            log.warning("skipping undecodable video %s: %s", path, exc)
            continue
        if not video_io.clip_starts(len(frames), num_frames, frame_stride):
            log.warning("skipping %s: %d frames, shorter than one clip", path, len(frames))
            continue
        videos.append(frames)
        names.append(Path(path).name)
    if not videos:
        raise ValueError(f"no usable video (>= {num_frames} frames at stride {frame_stride}) under {root}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in [0, 1), got {holdout_fraction}")
    windows, eval_windows = [], []
    for v, frames in enumerate(videos):
        total = len(frames)
        cut = total - math.ceil(holdout_fraction * total) if holdout_fraction > 0 else total
        windows += [(v, s) for s in video_io.clip_starts(cut, num_frames, frame_stride, hop=1)]
        if holdout_fraction > 0:
            eval_windows += [(v, cut + s) for s in video_io.clip_starts(total - cut, num_frames, frame_stride)]
        else:
            eval_windows += [(v, s) for s in video_io.clip_starts(total, num_frames, frame_stride)]
    if not windows:
        raise ValueError(f"no training clip left after holding back {holdout_fraction:.0%} of every video")
    if len(windows) < world_size:
        raise ValueError(f"{len(windows)} clip windows cannot be split over {world_size} ranks")
    return ClipBank(
        videos=videos,
        names=names,
        windows=windows[rank::world_size],
        eval_windows=eval_windows[rank::world_size],
        num_frames=num_frames,
        frame_stride=frame_stride,
    )
