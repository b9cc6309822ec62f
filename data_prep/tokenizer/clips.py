"""Clip bank for tokenizer training: every clip window of the videos, random clips per step (the same global
batch on every rank, each rank keeping its rows: see :class:`ClipBank`). The frames are either decoded once and
held in memory (``clip_source="memory"``: small datasets, fastest) or decoded from the files for each drawn
clip (``"stream"``: any dataset size, e.g. Kinetics; the same clips and pixels where containers count their
frames right, see :func:`load_clip_bank`)."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep import video_io

__all__ = ["ClipBank", "load_clip_bank", "CLIP_SOURCES"]

CLIP_SOURCES = ("memory", "stream")

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
        videos: per video, ``uint8 [N, S, S, 3]`` frames (already resized / center-cropped); None when the
            frames are decoded per clip (``paths``, see :func:`load_clip_bank`'s ``clip_source``).
        names: file name of each video.
        windows: ``(video, start)`` of every training clip (all starts, hop 1), the same on every rank.
        eval_windows: ``(video, start)`` of this rank's non-overlapping evaluation clips.
        num_frames: frames per clip (1 + 4n). frame_stride: step between used frames.
        rank, world_size: this process's rank and the number of ranks (which rows of a global batch
            :meth:`sample_clips` / :meth:`sample_images` return); 0 and 1 for a single process.
        paths, resolution, num_workers: with ``videos`` None, the files, the frame size S they are decoded
            to, and how many processes decode a step's clips (0: this one).
    """

    videos: list[np.ndarray] | None
    names: list[str]
    windows: list[tuple[int, int]]
    eval_windows: list[tuple[int, int]]
    num_frames: int
    frame_stride: int
    rank: int = 0
    world_size: int = 1
    paths: list[Path] = field(default_factory=list)
    resolution: int = 0
    num_workers: int = 0
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)
    _ahead: tuple[list[tuple[int, int]], list] | None = field(default=None, repr=False)

    @property
    def num_videos(self) -> int:
        return len(self.names)

    @property
    def frame_size(self) -> int:
        """S, the side of the (square) frames."""
        return self.videos[0].shape[1] if self.videos is not None else self.resolution

    def _workers(self) -> ProcessPoolExecutor:
        """The decode processes (``num_workers``), started on first use."""
        if self._pool is None:
            self._pool = _spawn_pool(self.num_workers)
        return self._pool

    def close(self) -> None:
        """End the decode processes, if started (waiting for them; clips decoding ahead are dropped). The bank
        stays usable: they start again on demand."""
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _frames(self, requests: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        """uint8 frames ``video[start:stop:step]`` for each ``(video, start, stop, step)``: sliced from memory,
        or decoded from the files (in ``num_workers`` processes when > 0)."""
        if self.videos is not None:
            return [self.videos[v][start:stop:step] for v, start, stop, step in requests]
        jobs = [(str(self.paths[v]), start, stop, step, self.resolution) for v, start, stop, step in requests]
        if self.num_workers > 0 and len(jobs) > 1:
            return list(self._workers().map(_decode_window, *zip(*jobs)))
        return [_decode_window(*job) for job in jobs]

    def clip(self, video: int, start: int) -> torch.Tensor:
        """One clip as float32 ``[3, num_frames, S, S]`` in [-1, 1]."""
        stop = start + (self.num_frames - 1) * self.frame_stride + 1
        return video_io.frames_to_tensor(self._frames([(video, start, stop, self.frame_stride)])[0])

    def _clips(self, windows: list[tuple[int, int]]) -> torch.Tensor:
        """The clips of ``windows`` as float32 ``[len, 3, num_frames, S, S]`` (decoded together; a prefetched
        set of the same windows is used instead, see :meth:`_prefetch_next`)."""
        span = (self.num_frames - 1) * self.frame_stride + 1
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == windows:
            frames = [future.result() for future in ahead[1]]
        else:
            frames = self._frames([(v, s, s + span, self.frame_stride) for v, s in windows])
        return torch.stack([video_io.frames_to_tensor(f) for f in frames])

    def _prefetch_next(self, rows: range, total: int, generator: torch.Generator) -> None:
        """Start decoding, in the worker processes, the clips the NEXT :meth:`sample_clips` call of this size
        will draw if nothing else draws from ``generator`` before it (its window picks, read from a copy of
        the generator; nothing is drawn from ``generator`` itself). The next call uses them only if its picks
        are these; otherwise (an image step came between, another batch size) they are dropped. So decoding
        overlaps the training step, and the clips are the same either way."""
        copy = torch.Generator().manual_seed(0)
        copy.set_state(generator.get_state())
        picks = torch.randint(len(self.windows), (total,), generator=copy).tolist()
        windows = [self.windows[picks[i]] for i in rows]
        span = (self.num_frames - 1) * self.frame_stride + 1
        pool = self._workers()
        self._ahead = (windows, [pool.submit(_decode_window, str(self.paths[v]), s, s + span, self.frame_stride,
                                             self.resolution) for v, s in windows])

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
        size = self.frame_size
        if crop is not None and not 1 <= crop <= size:
            raise ValueError(f"crop must be in [1, {size}] (the frames' size), got {crop}")
        picks = torch.randint(len(self.windows), (total,), generator=generator).tolist()
        flips = torch.rand(total, generator=generator) < 0.5 if flip else None
        corners = torch.randint(size - crop + 1, (total, 2), generator=generator).tolist() if crop else None
        windows = [self.windows[picks[i]] for i in rows]
        batch = self._clips(windows)
        if self.videos is None and self.num_workers > 0:
            self._prefetch_next(rows, total, generator)
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
        requests = []
        for i in rows:
            video, start = self.windows[picks[i]]
            frame = start + offsets[i]
            requests.append((video, frame, frame + 1, 1))
        batch = torch.stack([video_io.frames_to_tensor(f) for f in self._frames(requests)])
        return _flip_rows(batch, flips[rows.start:rows.stop]) if flip else batch


_JOB_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` spawned processes (not forked: the training process may hold CUDA and threads), all started
    here, that ignore the signals a job gets (:func:`_ignore_job_signals`).

    They are started with those signals blocked in this thread (a blocked set survives fork and exec), so
    one arriving while a process boots waits until its initializer ignores it; in this process a signal
    sent meanwhile is delivered once the block ends (or to another thread), not lost."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_job_signals)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
    try:
        for _ in range(workers):  # each submit starts a process while none is idle
            pool.submit(int)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pool


def _ignore_job_signals() -> None:
    """In a decode process: ignore SIGINT, SIGTERM and SIGUSR1, then unblock them (:func:`_spawn_pool`).
    SLURM and torchrun signal a training process's whole process group, these processes included; the
    training process decides what the signal means (``--exit-signal-handler``: finish the step, which may
    still be waiting for their clips, and save) and ends them itself (:meth:`ClipBank.close`, or at exit).
    Dying on the signal would break that step instead."""
    for sig in _JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _JOB_SIGNALS)


def _decode_window(path: str, start: int, stop: int, step: int, resolution: int) -> np.ndarray:
    """uint8 frames ``[start:stop:step]`` of a video decoded at ``resolution`` (what the in-memory bank holds for
    them: the same decoder, resize and crop). A file that now yields fewer frames than its index said repeats
    its last frame (logged) rather than ending the run."""
    frames, _ = video_io.decode_video(path, max_frames=stop, size=resolution)
    window = frames[start:stop:step]
    wanted = len(range(start, stop, step))
    if len(window) < wanted:
        log.warning("%s: %d frames decoded, the index said at least %d: repeating the last frame", path,
                    len(frames), stop)
        last = frames[-1:] if len(window) == 0 else window[-1:]
        window = np.concatenate([window, np.repeat(last, wanted - len(window), axis=0)])
    return window


def _frame_count(path: str) -> int | str:
    """Frames :func:`video_io.decode_video` yields for ``path``: the container's count when it has one (no
    decoding), else counted by decoding; or the reason the file is unusable (a string)."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "file has no video stream"
            counted = container.streams.video[0].frames
        if counted > 0:
            return int(counted)
        return len(video_io.decode_video(path, size=1)[0])  # 1x1 frames: counted, not kept
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds; the file is skipped with the reason
        return f"{type(exc).__name__}: {exc}"


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
    clip_source: str = "memory",
    num_workers: int = 0,
) -> ClipBank:
    """Decode every video under ``root`` once (resized to ``resolution``); keep every training window, split
    the evaluation windows by rank.

    ``clip_source`` "memory" keeps the decoded frames (every rank: ``frames x S x S x 3`` bytes, e.g. ~120 GB
    for UCF-101 at 128, so for small datasets); "stream" keeps only each video's frame count (from the
    container, decoded to count where it has none; in ``num_workers`` processes) and decodes each drawn clip
    from its file, in ``num_workers`` processes per step: the same windows, draws and pixels as "memory"
    (the same decoder, resize and crop), at the cost of decoding each clip's video up to its last frame,
    wherever the container's frame count is the number of decodable frames (H.264 MP4s; not always
    elsewhere: a VP9 AVI of the sample footage says 300 frames and decodes 295, so its last windows repeat
    its last frame, logged, where "memory" has no such windows).

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
        ValueError: no usable video, no training window left, ``holdout_fraction`` outside [0, 1),
            ``rank`` outside [0, world_size), an unknown ``clip_source`` or ``num_workers`` < 0.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    if clip_source not in CLIP_SOURCES:
        raise ValueError(f"clip_source must be one of {CLIP_SOURCES}, got {clip_source!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    paths = video_io.list_videos(root)
    videos, names, kept, counts = [], [], [], []
    if clip_source == "stream":
        if num_workers > 0:
            with _spawn_pool(num_workers) as pool:
                probed = list(pool.map(_frame_count, map(str, paths), chunksize=16))
        else:
            probed = [_frame_count(str(path)) for path in paths]
    for i, path in enumerate(paths):
        if clip_source == "stream":
            if isinstance(probed[i], str):
                log.warning("skipping undecodable video %s: %s", path, probed[i])
                continue
            count = probed[i]
        else:
            try:
                frames, _ = video_io.decode_video(path, size=resolution)
            except video_io.VideoDecodeError as exc:
                log.warning("skipping undecodable video %s: %s", path, exc)
                continue
            count = len(frames)
        if not video_io.clip_starts(count, num_frames, frame_stride):
            log.warning("skipping %s: %d frames, shorter than one clip", path, count)
            continue
        if clip_source == "memory":
            videos.append(frames)
        names.append(Path(path).name)
        kept.append(Path(path))
        counts.append(count)
    if not names:
        raise ValueError(f"no usable video (>= {num_frames} frames at stride {frame_stride}) under {root}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in [0, 1), got {holdout_fraction}")
    windows, eval_windows = [], []
    for v, total in enumerate(counts):
        cut = total - math.ceil(holdout_fraction * total) if holdout_fraction > 0 else total
        windows += [(v, s) for s in video_io.clip_starts(cut, num_frames, frame_stride, hop=1)]
        if holdout_fraction > 0:
            eval_windows += [(v, cut + s) for s in video_io.clip_starts(total - cut, num_frames, frame_stride)]
        else:
            eval_windows += [(v, s) for s in video_io.clip_starts(total, num_frames, frame_stride)]
    if not windows:
        raise ValueError(f"no training clip left after holding back {holdout_fraction:.0%} of every video")
    return ClipBank(
        videos=videos if clip_source == "memory" else None,
        names=names,
        windows=windows,
        eval_windows=eval_windows[rank::world_size],
        num_frames=num_frames,
        frame_stride=frame_stride,
        rank=rank,
        world_size=world_size,
        paths=kept,
        resolution=resolution,
        num_workers=num_workers,
    )
