"""In-memory clip bank for tokenizer training: decode every video once, sample random clips per step (the same
global batch on every rank, each rank keeping its rows: see :class:`ClipBank`)."""

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
    """Resized videos held in memory, every training clip window, and this rank's evaluation windows.

    Data order under DDP (global-batch sampling): every rank holds ALL training windows and draws, with a
    generator seeded identically on every rank, the picks (and flips, and image-step frame offsets) of the
    whole global batch of ``batch_size * world_size`` samples, then keeps rows
    ``[rank * batch_size, (rank + 1) * batch_size)``. So a 1-rank run with batch ``G`` draws the same clips
    as ``world_size`` ranks with ``G / world_size`` each, and DDP's gradient average over the ranks equals
    the 1-rank mean over ``G`` (up to fp32 summation order). Evaluation windows are split by rank instead
    (rank r keeps windows r, r + world_size, ...), so each rank evaluates its own disjoint share.

    Attributes:
        videos: per video, ``uint8 [N, S, S, 3]`` frames (already resized / center-cropped).
        names: file name of each video.
        windows: ``(video, start)`` of every training clip (all starts, hop 1), the same on every rank.
        eval_windows: ``(video, start)`` of this rank's non-overlapping evaluation clips.
        num_frames: frames per clip (1 + 4n). frame_stride: step between used frames.
        rank, world_size: this process's rank and the number of ranks (which rows of a global batch
            :meth:`sample_clips` / :meth:`sample_images` return); 0 and 1 for a single process.
    """

    videos: list[np.ndarray]
    names: list[str]
    windows: list[tuple[int, int]]
    eval_windows: list[tuple[int, int]]
    num_frames: int
    frame_stride: int
    rank: int = 0
    world_size: int = 1

    def clip(self, video: int, start: int) -> torch.Tensor:
        """One clip as float32 ``[3, num_frames, S, S]`` in [-1, 1]."""
        stop = start + (self.num_frames - 1) * self.frame_stride + 1
        return video_io.frames_to_tensor(self.videos[video][start:stop:self.frame_stride])

    def _rows(self, batch_size: int) -> range:
        """This rank's rows of a global batch of ``batch_size * world_size`` samples.

        Raises:
            ValueError: ``batch_size`` < 1.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return range(self.rank * batch_size, (self.rank + 1) * batch_size)

    def sample_clips(self, batch_size: int, generator: torch.Generator, flip: bool = True,
                     crop: int | None = None) -> torch.Tensor:
        """This rank's ``batch_size`` rows of a random global batch of clips (windows drawn with
        replacement, each clip flipped horizontally with probability 1/2 if ``flip``, and cut to a random
        ``crop x crop`` square if ``crop`` is given).

        The global batch of ``G = batch_size * world_size`` is drawn from ``generator`` in one fixed order
        (G window picks, then G flips, then, with ``crop``, G (top, left) offsets), so every rank advances
        ``generator`` identically and a 1-rank call with ``batch_size`` G returns the concatenation of the
        ranks' batches. Only this rank's rows are decoded. Without ``crop`` the draws are those of earlier
        versions (same clips for the same seed).

        Returns:
            float32 ``[batch_size, 3, num_frames, C, C]`` in [-1, 1], C = ``crop`` or S.

        Raises:
            ValueError: ``batch_size`` < 1, or ``crop`` not in [1, S].
        """
        rows = self._rows(batch_size)
        total = batch_size * self.world_size
        size = self.videos[0].shape[1]
        if crop is not None and not 1 <= crop <= size:
            raise ValueError(f"crop must be in [1, {size}] (the frames' size), got {crop}")
        picks = torch.randint(len(self.windows), (total,), generator=generator).tolist()
        flips = torch.rand(total, generator=generator) < 0.5 if flip else None
        corners = torch.randint(size - crop + 1, (total, 2), generator=generator).tolist() if crop else None
        batch = torch.stack([self.clip(*self.windows[picks[i]]) for i in rows])
        if flip:
            batch = _flip_rows(batch, flips[rows.start:rows.stop])
        if crop:
            mine = corners[rows.start:rows.stop]
            batch = torch.stack([clip[..., y:y + crop, x:x + crop] for clip, (y, x) in zip(batch, mine)])
        return batch

    def sample_images(self, batch_size: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
        """This rank's ``batch_size`` rows of a random global batch of single frames (1-frame videos): a
        training window and a frame of it per row, flipped horizontally with probability 1/2 if ``flip``.

        Drawn like :meth:`sample_clips`: ``G = batch_size * world_size`` window picks, then G frame offsets
        (0 .. num_frames - 1, times ``frame_stride``), then G flips, identically on every rank.

        Returns:
            float32 ``[batch_size, 3, 1, S, S]`` in [-1, 1].

        Raises:
            ValueError: ``batch_size`` < 1.
        """
        rows = self._rows(batch_size)
        total = batch_size * self.world_size
        picks = torch.randint(len(self.windows), (total,), generator=generator).tolist()
        offsets = (torch.randint(self.num_frames, (total,), generator=generator) * self.frame_stride).tolist()
        flips = torch.rand(total, generator=generator) < 0.5 if flip else None
        out = []
        for i in rows:
            video, start = self.windows[picks[i]]
            frame = start + offsets[i]
            out.append(video_io.frames_to_tensor(self.videos[video][frame : frame + 1]))
        batch = torch.stack(out)
        return _flip_rows(batch, flips[rows.start:rows.stop]) if flip else batch


def _flip_rows(batch: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip the samples of ``[B, C, T, H, W]`` where the bool ``[B]`` mask ``flips`` is set, along W."""
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
    """Decode every video under ``root`` once (resized to ``resolution``); keep every training window, split
    the evaluation windows by rank.

    Undecodable or too-short videos are skipped with a warning. Windows are listed in sorted file order.
    Every rank keeps all training windows (it samples its rows of the global batch from them, see
    :class:`ClipBank`); rank r keeps evaluation windows r, r + world_size, ... (deterministic, disjoint
    across ranks; a rank may get none when there are fewer evaluation windows than ranks).

    ``holdout_fraction`` f in (0, 1): the last ``ceil(f * N)`` frames of every N-frame video are held back:
    training windows lie entirely in the first part, evaluation windows (non-overlapping) entirely in the
    held-back tail (videos whose tail is shorter than a clip give no evaluation clip). f = 0: training
    and evaluation windows both cover the whole video (reconstruction on seen footage).

    Raises:
        NotADirectoryError: ``root`` is not a directory (from ``video_io.list_videos``).
        ValueError: no usable video, no training window left, ``holdout_fraction`` outside [0, 1), or
            ``rank`` outside [0, world_size).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
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
    return ClipBank(
        videos=videos,
        names=names,
        windows=windows,
        eval_windows=eval_windows[rank::world_size],
        num_frames=num_frames,
        frame_stride=frame_stride,
        rank=rank,
        world_size=world_size,
    )
