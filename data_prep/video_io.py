"""Video input/output on top of PyAV (decode, resize/crop, clips, mp4 and PNG writing).

Conventions used throughout the project:

* frames are ``numpy.uint8`` arrays shaped ``[N, H, W, 3]`` (RGB, 0..255);
* model tensors are ``torch.float32`` shaped ``[3, T, H, W]`` with values in ``[-1, 1]``.

Every file written here is written under a temporary name in the destination folder and then
``os.replace``-d into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from nbp_common.files import atomic_output

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".ogv", ".m4v", ".mpg", ".mpeg"})
"""Lower-case file suffixes that :func:`list_videos` treats as videos."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
"""Lower-case file suffixes that :func:`list_media` treats as images (decoded with Pillow)."""

CLIP_PLACEMENTS = ("first", "uniform")
"""How :func:`clip_starts` places clips: from the start at a fixed hop, or spread over the whole video."""

_RESAMPLE = Image.Resampling.LANCZOS


class VideoDecodeError(Exception):
    """A video could not be decoded (unreadable, not a video, no frames, or too short).

    Attributes:
        path: the offending file.
        reason: a short human-readable explanation.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def list_videos(root: str | os.PathLike) -> list[Path]:
    """List video files under ``root`` recursively, sorted (deterministic across machines).

    Args:
        root: a directory.
    Returns:
        Paths of the regular files whose suffix (case-insensitive) is in :data:`VIDEO_EXTENSIONS`,
        sorted by their path relative to ``root`` (POSIX form).
    Raises:
        NotADirectoryError: ``root`` is not an existing directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"video root is not a directory: {root}")
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def list_media(root: str | os.PathLike, extensions: frozenset[str] | set[str]) -> tuple[list[Path], list[Path]]:
    """Split the regular files under ``root`` (recursively) into media and everything else.

    Args:
        root: a directory.
        extensions: lower-case suffixes with the dot (e.g. :data:`VIDEO_EXTENSIONS`, :data:`IMAGE_EXTENSIONS`).
    Returns:
        ``(media, others)``: both sorted by the path relative to ``root`` (POSIX form), so every
        machine sees the same order; ``media`` are the files whose suffix (case-insensitive) is in
        ``extensions``, ``others`` the remaining regular files.
    Raises:
        NotADirectoryError: ``root`` is not an existing directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"media root is not a directory: {root}")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    media = [p for p in files if p.suffix.lower() in extensions]
    others = [p for p in files if p.suffix.lower() not in extensions]
    return media, others


def load_image(path: str | os.PathLike, size: int | Sequence[int] | None = None) -> np.ndarray:
    """Load a PNG/JPEG image with Pillow as a 1-frame clip (resized and center-cropped if ``size``).

    Args:
        path: image file (any mode Pillow reads; converted to RGB, alpha dropped).
        size: output side (square) or ``(h, w)``; ``None`` keeps the original size.
    Returns:
        ``uint8 [1, h, w, 3]`` RGB.
    Raises:
        VideoDecodeError: the file is missing, not an image, truncated or corrupt.
        ValueError: invalid ``size``.
    """
    path = Path(path)
    hw = None if size is None else _target_hw(size)
    if not path.is_file():
        raise VideoDecodeError(path, "no such file")
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))  # convert() forces the full decode (truncation shows here)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise VideoDecodeError(path, f"cannot decode image: {exc}") from exc
    frames = np.ascontiguousarray(rgb[None])
    return frames if hw is None else resize_center_crop(frames, hw)


def resample_indices(num_source_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Source frame indices that resample a video to ``target_fps`` (frame shown at each target time).

    Output frame ``k`` (time ``k / target_fps``) is source frame ``floor(k * source_fps / target_fps)``:
    lowering the rate drops frames, raising it repeats them.

    Args:
        num_source_frames: frames available (>= 0).
        source_fps, target_fps: frame rates in frames per second (> 0).
    Returns:
        ``int64 [M]`` increasing (non-strictly when upsampling) indices, all ``< num_source_frames``.
    Raises:
        ValueError: a non-positive rate or a negative frame count.
    """
    if not (source_fps > 0 and target_fps > 0) or num_source_frames < 0:
        raise ValueError(f"need positive rates and a frame count >= 0, got {source_fps}, {target_fps}, {num_source_frames}")
    ratio = Fraction(source_fps).limit_denominator(100_000) / Fraction(target_fps).limit_denominator(100_000)
    count = math.ceil(num_source_frames / ratio) if num_source_frames else 0
    idx = np.array([int(k * ratio) for k in range(count)], dtype=np.int64)
    return idx[idx < num_source_frames]


def _target_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``size`` (int or (h, w)) to a validated ``(h, w)`` tuple of positive ints."""
    if isinstance(size, (int, np.integer)):
        hw = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2:
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}")
    if min(hw) <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw


def _resize_crop_frame(frame: av.VideoFrame, hw: tuple[int, int]) -> np.ndarray:
    """Resize the shorter side of ``frame`` to cover ``hw`` and center-crop to exactly ``hw``.

    Two stages, identical for decoded frames and for RGB arrays: if the frame is more than 2x larger
    than needed, an area (box) reduction in swscale brings it to ~2x first (converting full-resolution
    frames to RGB dominates decoding time otherwise); then a Lanczos resize of the centred crop box
    (pillow, one step) gives the final size.

    Returns:
        ``uint8 [h, w, 3]`` RGB.
    """
    th, tw = hw
    scale = max(th / frame.height, tw / frame.width)
    if scale < 0.5:
        width, height = max(2, round(frame.width * 2 * scale)), max(2, round(frame.height * 2 * scale))
        frame = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    img = frame.to_image()
    w, h = img.size
    scale = max(th / h, tw / w)
    bw, bh = tw / scale, th / scale  # source box with the target's aspect ratio, centred
    left, top = (w - bw) / 2.0, (h - bh) / 2.0
    return np.asarray(img.resize((tw, th), _RESAMPLE, box=(left, top, left + bw, top + bh)))


def resize_center_crop(frames: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resize so the shorter side covers ``size``, then center-crop (area pre-reduction + Lanczos).

    Args:
        frames: ``uint8 [N, H, W, 3]`` RGB frames.
        size: output side ``s`` (square ``s x s``) or ``(h, w)``.
    Returns:
        ``uint8 [N, h, w, 3]``.
    Raises:
        ValueError: ``frames`` is not ``uint8 [N, H, W, 3]`` or ``size`` is invalid.
    """
    hw = _target_hw(size)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 array [N, H, W, 3], got {_describe(frames)}")
    out = np.empty((frames.shape[0], hw[0], hw[1], 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = _resize_crop_frame(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"), hw)
    return out


def _describe(x: object) -> str:
    """Short description of an array-like for error messages."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} dtype={x.dtype} shape={tuple(x.shape)}"
    return type(x).__name__


def _iter_decoded(path: Path, max_frames: int | None, hw: tuple[int, int] | None) -> Iterator[np.ndarray]:
    """Yield RGB ``uint8 [H, W, 3]`` frames (resized/cropped if ``hw``) from an open-able video."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(path, "file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        count = 0
        for frame in container.decode(stream):
            if max_frames is not None and count >= max_frames:
                break
            if hw is None:
                yield frame.to_ndarray(format="rgb24")
            else:
                yield _resize_crop_frame(frame, hw)
            count += 1


def _stream_fps(path: Path) -> float:
    """Frame rate of the first video stream in frames per second (0.0 if unknown)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return float(rate) if rate else 0.0


def decode_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    size: int | Sequence[int] | None = None,
    fps: float | None = None,
) -> tuple[np.ndarray, float]:
    """Decode the first video stream of a file with PyAV.

    Args:
        path: video file.
        max_frames: stop after this many (output) frames (``None``: all).
        size: if given, every frame is resized/center-cropped while decoding (as
            :func:`resize_center_crop`), which keeps memory small for large videos.
        fps: if given, resample to this frame rate (frames per second, > 0) with
            :func:`resample_indices`; only the source frames needed for ``max_frames`` are decoded.
    Returns:
        ``(frames, fps)``: ``uint8 [N, H, W, 3]`` RGB frames with ``N >= 1`` and the frame rate of
        ``frames`` in frames per second (the stream's, ``0.0`` if the container does not say; or ``fps``).
    Raises:
        VideoDecodeError: the file is missing, unreadable, not a video, or yields no frames; or
            ``fps`` is given and the stream's frame rate is unknown.
        ValueError: ``max_frames`` < 1, ``fps`` <= 0 or ``size`` is invalid.
    """
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    hw = None if size is None else _target_hw(size)
    if not path.is_file():
        raise VideoDecodeError(path, "no such file")
    try:
        source_fps = _stream_fps(path)
        source_max = max_frames
        if fps is not None:
            if not source_fps > 0:
                raise VideoDecodeError(path, "frame rate unknown, cannot resample to the requested fps")
            if max_frames is not None:  # source frames covering the first max_frames output frames
                source_max = int((max_frames - 1) * Fraction(source_fps).limit_denominator(100_000)
                                 / Fraction(fps).limit_denominator(100_000)) + 1
        frames = list(_iter_decoded(path, source_max, hw))
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoDecodeError(path, f"cannot decode: {exc}") from exc
    if not frames:
        raise VideoDecodeError(path, "video has no decodable frames")
    if fps is None:
        return np.stack(frames), source_fps
    idx = resample_indices(len(frames), source_fps, fps)
    if max_frames is not None:
        idx = idx[:max_frames]
    return np.stack([frames[i] for i in idx]), float(fps)


def clip_starts(
    num_frames_total: int,
    clip_len: int = 17,
    frame_stride: int = 1,
    hop: int | None = None,
    max_clips: int | None = None,
    placement: str = "first",
) -> list[int]:
    """Start frame indices of the clips that fit in a video.

    A clip starting at ``s`` uses frames ``s, s + frame_stride, ..., s + (clip_len - 1) * frame_stride``.
    ``placement="first"`` takes the starts ``0, hop, 2*hop, ...`` (the first ``max_clips`` of them);
    ``"uniform"`` with ``max_clips = n`` spreads ``n`` starts evenly over ``[0, last possible start]``
    (``n = 1``: the middle clip), with ``max_clips=None`` it equals ``"first"``.

    Args:
        num_frames_total: frames in the video (>= 0).
        clip_len: frames per clip (>= 1).
        frame_stride: step between used frames (>= 1).
        hop: step between clip starts (>= 1); default ``clip_len * frame_stride`` (non-overlapping).
        max_clips: keep at most this many; ``None`` keeps all.
        placement: one of :data:`CLIP_PLACEMENTS`.
    Returns:
        Strictly increasing start indices; empty if the video is shorter than one clip.
    Raises:
        ValueError: any argument out of range.
    """
    if num_frames_total < 0:
        raise ValueError(f"num_frames_total must be >= 0, got {num_frames_total}")
    if clip_len < 1 or frame_stride < 1:
        raise ValueError(f"clip_len and frame_stride must be >= 1, got {clip_len}, {frame_stride}")
    hop = clip_len * frame_stride if hop is None else hop
    if hop < 1:
        raise ValueError(f"hop must be >= 1, got {hop}")
    if max_clips is not None and max_clips < 0:
        raise ValueError(f"max_clips must be >= 0 or None, got {max_clips}")
    if placement not in CLIP_PLACEMENTS:
        raise ValueError(f"placement must be one of {CLIP_PLACEMENTS}, got {placement!r}")
    span = (clip_len - 1) * frame_stride + 1
    last = num_frames_total - span
    if last < 0 or max_clips == 0:
        return []
    if placement == "uniform" and max_clips is not None:
        if max_clips == 1:
            return [last // 2]
        return sorted({round(i * last / (max_clips - 1)) for i in range(max_clips)})
    starts = list(range(0, last + 1, hop))
    return starts if max_clips is None else starts[:max_clips]


def load_clip(
    path: str | os.PathLike, num_frames: int = 17, size: int | Sequence[int] = 64, start: int = 0, frame_stride: int = 1
) -> np.ndarray:
    """Load one clip (e.g. a generation prompt), resized and center-cropped.

    Args:
        path: video file.
        num_frames: frames in the clip.
        size: output side (square) or ``(h, w)``.
        start: index of the first frame.
        frame_stride: step between used frames.
    Returns:
        ``uint8 [num_frames, h, w, 3]``.
    Raises:
        VideoDecodeError: unreadable file, or fewer than ``start + (num_frames - 1) * frame_stride + 1`` frames.
        ValueError: invalid ``num_frames``/``start``/``frame_stride``/``size``.
    """
    if num_frames < 1 or frame_stride < 1 or start < 0:
        raise ValueError(f"need num_frames >= 1, frame_stride >= 1, start >= 0; got {num_frames}, {frame_stride}, {start}")
    needed = start + (num_frames - 1) * frame_stride + 1
    frames, _ = decode_video(path, max_frames=needed, size=size)
    if len(frames) < needed:
        raise VideoDecodeError(path, f"too short: {len(frames)} frames, clip needs {needed}")
    return frames[start:needed:frame_stride]


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """Convert ``uint8 [T, H, W, 3]`` frames to a ``float32 [3, T, H, W]`` tensor in ``[-1, 1]``.

    Raises:
        ValueError: ``frames`` is not a ``uint8 [T, H, W, 3]`` array.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 array [T, H, W, 3], got {_describe(frames)}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).to(torch.float32)
    return x / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """Convert a ``float [3, T, H, W]`` tensor in ``[-1, 1]`` to ``uint8 [T, H, W, 3]`` (values clamped).

    Raises:
        ValueError: ``video`` is not a floating-point tensor shaped ``[3, T, H, W]``.
    """
    if not isinstance(video, torch.Tensor) or not video.is_floating_point() or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be a float tensor [3, T, H, W], got {_describe(video)}")
    x = ((video.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float = 8, crf: int = 17) -> Path:
    """Write frames as an H.264 (libx264, yuv420p) mp4 with PyAV, atomically.

    Args:
        frames: ``uint8 [T, H, W, 3]`` RGB with ``T >= 1`` and even ``H`` and ``W`` (yuv420p needs them).
        path: destination ``.mp4`` (parent directories are created).
        fps: frames per second (> 0).
        crf: x264 constant rate factor (0 = lossless luma, 17 = visually near-lossless).
    Returns:
        ``path`` as a ``Path``.
    Raises:
        ValueError: bad ``frames`` shape/dtype, odd size, or ``fps`` <= 0.
    """
    path = Path(path)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 array [T, H, W, 3], got {_describe(frames)}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even height/width for yuv420p, got shape {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    with atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_contact_sheet(
    rows: Sequence[np.ndarray], path: str | os.PathLike, row_labels: Sequence[str] | None = None
) -> Path:
    """Write one PNG with one row per clip, frames side by side, atomically.

    Args:
        rows: clips, each ``uint8 [T_i, H, W, 3]`` (``T_i`` may differ; ``H``, ``W`` must match).
        path: destination ``.png`` (parent directories are created).
        row_labels: optional text drawn in a left margin, one per row.
    Returns:
        ``path`` as a ``Path``.
    Raises:
        ValueError: no rows, a row with the wrong dtype/shape, mismatched frame sizes, or a
            ``row_labels`` length different from ``len(rows)``.
    """
    path = Path(path)
    if not rows:
        raise ValueError("contact sheet needs at least one row")
    for i, r in enumerate(rows):
        if not isinstance(r, np.ndarray) or r.dtype != np.uint8 or r.ndim != 4 or r.shape[-1] != 3 or len(r) == 0:
            raise ValueError(f"row {i} must be a non-empty uint8 array [T, H, W, 3], got {_describe(r)}")
    h, w = rows[0].shape[1:3]
    if any(r.shape[1:3] != (h, w) for r in rows):
        raise ValueError(f"all rows need the same frame size; got {[r.shape[1:3] for r in rows]}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(rows)} rows")
    margin = 0 if row_labels is None else 8 + 6 * max(len(s) for s in row_labels)
    sheet = Image.new("RGB", (margin + w * max(len(r) for r in rows), h * len(rows)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        for j, frame in enumerate(r):
            sheet.paste(Image.fromarray(frame), (margin + j * w, i * h))
        if row_labels is not None:
            draw.text((4, i * h + 4), str(row_labels[i]), fill=(255, 255, 255))
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
