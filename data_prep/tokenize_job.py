"""Offline tokenization job: videos (or images) -> clips -> FSQ token shards (single process or torchrun).

Work assignment is deterministic and independent of the world size: the sorted media list is cut
into shards of ``videos_per_shard`` consecutive files (shard ``k``), and rank ``r`` of ``W`` handles
the shards with ``k % W == r``. A shard whose sidecar exists is finished and skipped, so a rerun after
a crash (even a SIGKILL of every rank at any point) writes only the missing shards and every clip lands
in exactly one shard. Files that fail to decode or are too short are recorded with the reason in their
shard's sidecar, never fatal; files under the input folder that are not media of the chosen kind are
listed too. Rank 0 writes ``failures.jsonl`` (one ``{"path", "reason"}`` per line) and then
``manifest.json`` from the sidecars after a barrier.

Clip sampling: ``num_frames`` frames every ``frame_stride`` source frames, after optional resampling
to ``fps``; clips start every ``clip_hop`` frames (``clip_placement="first"``) or are spread evenly over
the video (``"uniform"``, with ``max_clips_per_video``; 1 = the middle clip); every frame is resized
(shorter side) and center-cropped to ``resolution``. Images (``media="image"``, PNG/JPEG via Pillow)
are 1-frame clips: ``num_frames=1``, latent ``(1, H', W')``.

Labels and text: ``label_from_dir`` stores each file's parent folder name as its clip label (UCF-101's
class); ``text_tokenizer`` (a SentencePiece ``.model`` or a ``tokenizer.json``, data_prep.text_ids) also
stores the ids of that class name as text (``text_ids``, what text-conditional models read), and the
manifest records the file's SHA-256 and vocabulary size; a file outside any class folder is then a failure.

Devices and throughput: each rank encodes on ``device`` (auto: ``cuda:LOCAL_RANK`` when CUDA is
available, so torchrun with one process per GPU uses every GPU of a node) in batches of ``batch_size``
clips at ``precision`` (fp32 by default; bf16 autocast on request, see
:func:`data_prep.tokenizer.precision.bf16_token_agreement` for what it changes). Decoding (PyAV) and clip
cutting run in ``num_workers`` DataLoader worker processes that prefetch ``prefetch_factor`` media files
each, so the device is not left waiting; ``num_workers`` 0 decodes in the rank's own process. The
DataLoader returns the media files in the rank's deterministic order whatever the number of workers,
and batches are formed in the rank's process, so the shards' bytes do not depend on ``num_workers``. The
ranks only meet at barriers, over gloo even on GPUs (nothing is reduced, and a CPU barrier does not hold
a GPU while the slowest rank finishes).
"""

from __future__ import annotations

import collections
import datetime
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import ConfigDict, Field
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_prep import shards
from data_prep.device import activate, choose_device, to_device
from data_prep.text_ids import TextTokenizer
from data_prep.video_io import (
    CLIP_PLACEMENTS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoDecodeError,
    clip_starts,
    decode_video,
    list_media,
    load_image,
)
from nbp_common.config import TypedConfig, cli_flags

_MAX_UINT16 = np.iinfo(np.uint16).max


class TokenizeConfig(TypedConfig):
    """Settings of one tokenization job; each field is a flag of ``launchers/tokenize_videos.py``
    (data_prep.cli.tokenize_videos derives them). Frozen: derive variants with :meth:`replace`.

    Types are checked on construction (nbp_common.config.ConfigError naming the field); the rules
    between fields are checked by :meth:`validate`.
    """

    model_config = ConfigDict(frozen=True)

    input_dir: Path = Field(description="root searched recursively for videos (or images, with media image)",
                            json_schema_extra=cli_flags(flag="--input"))
    output_dir: Path = Field(description="where shards, sidecars and manifest.json go (created if missing)",
                             json_schema_extra=cli_flags(flag="--output"))
    tokenizer: Path = Field(description="tokenizer checkpoint (data_prep.tokenizer.load_tokenizer)")
    num_frames: int = Field(17, description="frames per clip, 1 + 4n (tokenizer temporal stride 4, first frame "
                                            "separate)")
    frame_stride: int = Field(1, description="step between the frames of a clip (1 = consecutive frames)")
    clip_hop: int | None = Field(None, description="frames between clip starts; unset = num_frames x frame_stride "
                                                   "(no overlap)")
    resolution: int = Field(64, description="square clip side in pixels, a multiple of 8 (tokenizer spatial "
                                            "stride)")
    max_clips_per_video: int | None = Field(None, description="keep at most this many clips per video; unset = all")
    videos_per_shard: int = Field(8, description="consecutive media files (of the sorted list) per shard")
    batch_size: int = Field(8, description="clips per tokenizer forward pass")
    label_from_dir: bool = Field(False, description="store the name of each video's parent directory as its label "
                                                    "(UCF-101 layout)")
    progress: bool = Field(True, description="show a progress bar on rank 0")
    media: Literal["video", "image"] = Field(
        "video", description="video (VIDEO_EXTENSIONS, PyAV) or image (IMAGE_EXTENSIONS, Pillow; each image is one "
                             "1-frame clip, needs num_frames 1)")
    fps: float | None = Field(None, description="resample every video to this frame rate (frames per second) before "
                                                "cutting clips; unset keeps the source rate. Frame counts (stride, "
                                                "hop) are in resampled frames")
    clip_placement: Literal[CLIP_PLACEMENTS] = Field(
        "first", description="first: clips every clip_hop frames from the start; uniform: max_clips_per_video clips "
                             "spread evenly over the video (1 = the middle clip); see data_prep.video_io.clip_starts")
    device: str = Field("auto", description="where to encode: auto (cuda:LOCAL_RANK when CUDA is available, else "
                                            "cpu), cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="encoding precision: fp32, or bf16 autocast of the encoder's convolutions (FSQ stays "
                            "fp32; token ids can differ: launchers/eval_tokenizer.py --encode-precision bf16 "
                            "measures how many and what it does to reconstructions)")
    channels_last: bool = Field(
        False, description="encode in channels-last 3D memory format (weights and clips): faster convolutions on "
                           "oneDNN CPUs and tensor-core GPUs; a rare token id can differ from the default layout's "
                           "(rounding; not a shard setting, like the device)")
    compile: bool = Field(
        False, description="torch.compile the encoder (compiled on the first batch, partial batches padded to "
                           "batch_size); a rare token id can differ from eager's (rounding; not a shard setting)")
    num_workers: int = Field(0, description="DataLoader worker processes that decode videos and cut clips (0: in "
                                            "this process)")
    prefetch_factor: int = Field(2, description="media files each worker decodes ahead (with num_workers > 0)")
    # --- text conditioning (UCF-101 as in the NBP paper: the class name as text; data_prep.text_ids)
    text_tokenizer: Path | None = Field(
        None, description="with label_from_dir: a text tokenizer file (SentencePiece .model, e.g. LLaMA's "
                          "tokenizer.model, or a tokenizers tokenizer.json); each clip also gets text_ids, the ids "
                          "of its class name as text ('ApplyEyeMakeup' -> 'apply eye makeup', with the tokenizer's "
                          "BOS, unpadded); the manifest records the file's sha256 and vocabulary size")

    def validate(self) -> None:
        """Check the rules between fields.

        Raises:
            ValueError: naming the first invalid setting by its flag.
        """
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"--num-frames must be 1 + 4n (1, 5, 9, 13, 17, ...), got {self.num_frames}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("frame_stride", "videos_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.clip_hop is not None and self.clip_hop < 1:
            raise ValueError(f"--clip-hop must be >= 1, got {self.clip_hop}")
        if self.max_clips_per_video is not None and self.max_clips_per_video < 1:
            raise ValueError(f"--max-clips-per-video must be >= 1, got {self.max_clips_per_video}")
        if self.media == "image" and (self.num_frames != 1 or self.fps is not None):
            raise ValueError(f"--media image makes 1-frame clips: needs --num-frames 1 and no --fps, got "
                             f"{self.num_frames} frames, fps {self.fps}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be > 0, got {self.fps}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"--prefetch-factor must be >= 1, got {self.prefetch_factor}")
        if self.text_tokenizer is not None and not self.label_from_dir:
            raise ValueError(f"--text-tokenizer {self.text_tokenizer} turns class names into text ids: it needs "
                             f"--label-from-dir")

    def shard_settings(self, text_tokenizer_sha256: str | None = None) -> dict:
        """Settings that determine a shard's content; stored in each sidecar and checked on rerun.

        ``precision`` appears only for bf16 encoding, so fp32 shards keep the settings of earlier versions
        (a rerun completes an output folder they started). The loader options change nothing in a shard;
        ``device``, ``batch_size``, ``channels_last`` and ``compile`` change only floating-point rounding
        (e.g. cuDNN's TF32 convolutions on GPUs), which can flip a rare token, and are left out so that a
        job may finish on other machines than it started on. ``text_tokenizer_sha256`` (the text
        tokenizer file's hash) appears only with ``text_tokenizer``."""
        settings = {
            "num_frames": self.num_frames,
            "frame_stride": self.frame_stride,
            "clip_hop": self.clip_hop,
            "resolution": self.resolution,
            "max_clips_per_video": self.max_clips_per_video,
            "videos_per_shard": self.videos_per_shard,
            "label_from_dir": self.label_from_dir,
            "media": self.media,
            "fps": self.fps,
            "clip_placement": self.clip_placement,
        }
        if self.precision != "fp32":
            settings["precision"] = self.precision
        if text_tokenizer_sha256 is not None:
            settings["text_tokenizer_sha256"] = text_tokenizer_sha256
        return settings

    def list_inputs(self) -> tuple[list[Path], list[Path]]:
        """``(media, others)`` under ``input_dir``, sorted; files inside ``output_dir`` are left out."""
        media, others = list_media(self.input_dir, VIDEO_EXTENSIONS if self.media == "video" else IMAGE_EXTENSIONS)
        out = Path(self.output_dir).resolve()
        keep = lambda p: out not in p.resolve().parents  # noqa: E731
        return [p for p in media if keep(p)], [p for p in others if keep(p)]


def plan_shards(videos: list[Path], videos_per_shard: int) -> list[list[Path]]:
    """Cut the (already sorted) video list into consecutive groups; group ``k`` is shard ``k``."""
    return [videos[i : i + videos_per_shard] for i in range(0, len(videos), videos_per_shard)]


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shard indices handled by ``rank``: ``k`` with ``k % world_size == rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return list(range(rank, num_shards, world_size))


def _is_finished(shard_path: Path) -> bool:
    """A shard is finished when both the tar and its sidecar (written last) exist."""
    return shard_path.is_file() and shards.sidecar_path(shard_path).is_file()


def _remove_partial(shard_path: Path) -> None:
    """Delete leftovers of a crashed write of this shard (tmp files, a tar without sidecar)."""
    for tmp in shard_path.parent.glob(f"{shard_path.name}.tmp"):
        tmp.unlink(missing_ok=True)
    for tmp in shard_path.parent.glob(f".{shards.sidecar_path(shard_path).name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    shard_path.unlink(missing_ok=True)


@dataclass
class DecodedMedia:
    """One media file, decoded and cut into clips (made in a DataLoader worker or in-process).

    Attributes:
        rel: path relative to the input folder (POSIX); label: its parent folder's name with
            ``label_from_dir``, else None; fps: frame rate of the frames the clips were cut from (0.0 for
            images and containers that do not say).
        starts: clip start frames, in order. clips: uint8 ``[len(starts), T, R, R, 3]`` (None on failure).
        failure: why the file gave no clip (decoding error, too short), else None.
    """

    rel: str
    label: str | None
    fps: float
    starts: list[int]
    clips: torch.Tensor | None
    failure: str | None = None


class MediaClips(Dataset):
    """Map-style dataset: item ``i`` is :class:`DecodedMedia` of ``media[i]`` (decode with PyAV or Pillow,
    resize / center-crop, cut clips as the config says). Undecodable or too short files give an item with
    ``failure`` set, never an exception."""

    def __init__(self, cfg: TokenizeConfig, media: list[Path]):
        self.cfg, self.media = cfg, list(media)
        span = (cfg.num_frames - 1) * cfg.frame_stride + 1
        self.span, self.hop = span, cfg.clip_hop or cfg.num_frames * cfg.frame_stride
        self.max_frames = None
        if cfg.max_clips_per_video is not None and cfg.clip_placement == "first":
            self.max_frames = (cfg.max_clips_per_video - 1) * self.hop + span

    def __len__(self) -> int:
        return len(self.media)

    def __getitem__(self, index: int) -> DecodedMedia:
        cfg, video = self.cfg, self.media[index]
        rel = video.relative_to(cfg.input_dir).as_posix()
        label = video.parent.name if cfg.label_from_dir and video.parent != cfg.input_dir else None
        try:
            if cfg.media == "image":
                frames, fps = load_image(video, size=cfg.resolution), 0.0
            else:
                frames, fps = decode_video(video, max_frames=self.max_frames, size=cfg.resolution, fps=cfg.fps)
            starts = clip_starts(len(frames), cfg.num_frames, cfg.frame_stride, self.hop, cfg.max_clips_per_video,
                                 cfg.clip_placement)
            if not starts:
                raise VideoDecodeError(video, f"too short: {len(frames)} frames, a clip needs {self.span}")
        except VideoDecodeError as exc:
            return DecodedMedia(rel, label, 0.0, [], None, exc.reason)
        clips = np.stack([frames[s : s + self.span : cfg.frame_stride] for s in starts])
        return DecodedMedia(rel, label, fps, list(starts), torch.from_numpy(clips))


def _keep(item: DecodedMedia) -> DecodedMedia:
    """DataLoader ``collate_fn``: items pass unchanged (one media file per item)."""
    return item


def _worker_init(_: int) -> None:
    """One thread per DataLoader worker: the workers are the parallelism."""
    torch.set_num_threads(1)


def decoded_media(cfg: TokenizeConfig, media: list[Path]) -> Iterator[DecodedMedia]:
    """:class:`DecodedMedia` of every file of ``media``, in that order: in ``cfg.num_workers`` DataLoader
    worker processes with ``cfg.prefetch_factor`` files prefetched per worker, or in this process when
    ``num_workers`` is 0. The order, and each item, do not depend on ``num_workers``."""
    dataset = MediaClips(cfg, media)
    workers = cfg.num_workers if len(dataset) else 0
    loader = DataLoader(
        dataset, batch_size=None, shuffle=False, collate_fn=_keep, num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None, worker_init_fn=_worker_init if workers else None)
    return iter(loader)


def frames_batch_to_tensor(clips: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 clips ``[B, T, H, W, 3]`` -> float32 ``[B, 3, T, H, W]`` in [-1, 1] on ``device``: the uint8
    batch is copied (4x fewer bytes than floats), then converted there with the arithmetic of
    :func:`data_prep.video_io.frames_to_tensor`, so the values are the same bits on any device (the divisor
    is a tensor on ``device``: CUDA divides by a host scalar as a multiplication by its reciprocal, which
    moves 111 of the 256 byte values by one ulp)."""
    x = to_device(clips, device).permute(0, 4, 1, 2, 3).to(torch.float32)
    return x / torch.full((), 127.5, dtype=torch.float32, device=x.device) - 1.0


@dataclass
class _Launched:
    """A batch queued on the device: its clips ``(key, frames, meta)``, its ids ``int64 [B, T', H', W']`` (on the
    host in pinned memory when the device is CUDA, filled once ``ready`` has happened), and that CUDA event
    (None elsewhere: the ids are computed)."""

    batch: list
    indices: torch.Tensor
    ready: torch.cuda.Event | None


class _ShardBuilder:
    """Produces the samples of this rank's shards from decoded media: batch the clips of each shard, encode them
    on the tokenizer's device at ``cfg.precision`` (with ``cfg.channels_last`` / ``cfg.compile``:
    :func:`data_prep.tokenizer.precision.make_token_encoder`).

    Batches never mix shards (a shard's last batch may be partial), so the shards do not depend on the device or
    on how far decoding runs ahead. On a GPU the next batch is queued on the device before the previous batch's
    ids are read back, also across shard boundaries, so the host's work (collecting and copying clips, writing
    samples) overlaps the device's."""

    def __init__(self, tokenizer: torch.nn.Module, cfg: TokenizeConfig, latent_shape: tuple[int, int, int],
                 text: TextTokenizer | None = None):
        from data_prep.tokenizer.precision import make_token_encoder  # heavy; import when needed

        self.tok, self.cfg, self.latent_shape, self.text = tokenizer, cfg, tuple(latent_shape), text
        self.device = next(tokenizer.parameters()).device
        self.encode = make_token_encoder(tokenizer, cfg.precision, cfg.channels_last, cfg.compile, cfg.batch_size)
        self.videos_done = 0
        self.clips_done = 0
        self.first_batch: tuple[float, int] | None = None  # (monotonic time it was done, its clips)
        self.batches_queued = self.batches_read = self.clips_queued = 0
        self.wait_data = 0.0  # seconds spent waiting for decoded media
        self.wait_device = 0.0  # seconds spent waiting for the device's token ids
        self.time_queue = 0.0  # seconds spent queueing batches (stacking, copying, launching; cuDNN's autotuning)

    def _clips(self, items: Iterator[DecodedMedia], failures: list[dict],
               labels: set[str]) -> Iterator[tuple[str, torch.Tensor, dict]]:
        """Yield ``(key, frames uint8 [T, R, R, 3], meta)`` for every clip; record failing files in ``failures``
        and class names in ``labels``."""
        cfg = self.cfg
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            self.wait_data += time.perf_counter() - t0
            if item is None:
                return
            if item.failure is None and self.text is not None and item.label is None:
                item.failure = "no class folder: --text-tokenizer takes the text from the parent folder's name"
            if item.failure is not None:
                failures.append({"path": item.rel, "reason": item.failure})
                self.videos_done += 1
                continue
            if item.label is not None:
                labels.add(item.label)
            for s, frames in zip(item.starts, item.clips):
                meta = {
                    "source": item.rel,
                    "clip_start": s,
                    "num_frames": cfg.num_frames,
                    "frame_stride": cfg.frame_stride,
                    "fps": item.fps,
                    "label": item.label,
                    "latent_shape": list(self.latent_shape),
                }
                if self.text is not None:
                    meta["text_ids"] = self.text.class_name_ids(item.label)
                yield shards.clip_key(item.rel, s), frames, meta
            self.videos_done += 1

    def _launch(self, batch: list[tuple[str, torch.Tensor, dict]]) -> _Launched:
        """Queue the encoding of a batch of clips and the copy of its ids to the host, without waiting for them.

        On CUDA the ids are copied into pinned host memory right behind the batch's kernels and a CUDA event
        marks the copy's end: a plain ``.cpu()`` later would be queued behind the next batch's kernels and wait
        for them too, which would serialise the device with the host again."""
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"queue batch {self.batches_queued}"):  # a label for torch.profiler
            video = frames_batch_to_tensor(torch.stack([frames for _, frames, _ in batch]), self.device)
            indices = self.encode(video)
            if tuple(indices.shape) != (len(batch), *self.latent_shape):
                raise RuntimeError(f"tokenizer returned shape {tuple(indices.shape)}, "
                                   f"expected {(len(batch), *self.latent_shape)}")
            ready = None
            if indices.device.type == "cuda":
                host = torch.empty(indices.shape, dtype=indices.dtype, pin_memory=True)
                indices = host.copy_(indices, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
        self.batches_queued += 1
        self.clips_queued += len(batch)
        self.time_queue += time.perf_counter() - t0
        return _Launched(batch, indices, ready)

    def _finish(self, launched: _Launched) -> list[tuple[str, np.ndarray, dict]]:
        """Wait for a launched batch's ids; returns ``(key, tokens uint16 [T', H', W'], meta)`` per clip."""
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"read back batch {self.batches_read}"):
            if launched.ready is not None:
                launched.ready.synchronize()
            indices = launched.indices.cpu()  # already on the host, except on devices other than CUDA
        self.batches_read += 1
        self.wait_device += time.perf_counter() - t0
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi > _MAX_UINT16:
            raise RuntimeError(f"token indices [{lo}, {hi}] do not fit uint16; codebook too large for this format")
        tokens = indices.numpy().astype(np.uint16)
        self.clips_done += len(launched.batch)
        if self.first_batch is None:  # the host read above waited for it: compilation and tuning are behind
            self.first_batch = (time.monotonic(), len(launched.batch))
        return [(key, tokens[i], meta) for i, (key, _, meta) in enumerate(launched.batch)]

    def shards(self, items: Iterator[DecodedMedia], sizes: list[int], failures: list[list[dict]],
               labels: list[set[str]]) -> Iterator[tuple[int, list | None]]:
        """The samples of consecutive shards from one stream of decoded media.

        Args:
            items: decoded media of all the shards, in order (:func:`decoded_media`).
            sizes: media files of each shard (shard ``j`` takes the next ``sizes[j]`` items).
            failures, labels: per shard, filled with its failing files and class names while it is read.
        Yields:
            ``(j, samples)`` for each batch of shard ``j`` (``(key, tokens uint16 [T', H', W'], meta)`` per clip,
            in media then clip-start order), then ``(j, None)`` once shard ``j`` is complete, for every ``j``.
            Shard ``j``'s end comes after the next batch is queued, i.e. after the clips of that batch (of shard
            ``j + 1`` at a boundary) are decoded: a crash there redoes shard ``j`` too on the rerun.
        """
        queue: collections.deque = collections.deque()  # launched batches and shard ends, in order

        def finished(entry: tuple[int, _Launched | None]) -> tuple[int, list | None]:
            return entry[0], None if entry[1] is None else self._finish(entry[1])

        def launched(batch: list) -> Iterator[tuple[int, list | None]]:
            queue.append((j, self._launch(batch)))
            while len(queue) > 1:  # everything before the batch just queued on the device
                yield finished(queue.popleft())

        for j, size in enumerate(sizes):
            batch: list = []
            for clip in self._clips(itertools.islice(items, size), failures[j], labels[j]):
                batch.append(clip)
                if len(batch) == self.cfg.batch_size:
                    yield from launched(batch)
                    batch = []
            if batch:
                yield from launched(batch)
            queue.append((j, None))
        while queue:
            yield finished(queue.popleft())


def _steady_rate(builder: _ShardBuilder, end: float) -> str:
    """``"; 41.20 after the first batch"``: the rate once the first batch is done (worker start-up, cuDNN
    tuning and ``--compile``'s compilation are in the first batch), or "" with fewer than two batches."""
    if builder.first_batch is None or builder.clips_done <= builder.first_batch[1] or end <= builder.first_batch[0]:
        return ""
    done_at, clips = builder.first_batch
    return f"; {(builder.clips_done - clips) / (end - done_at):.2f} after the first batch"


def _init_distributed(timeout_hours: float) -> tuple[int, int, bool]:
    """Join the torchrun process group (gloo: only barriers, also on GPUs) if ``WORLD_SIZE > 1``; returns
    (rank, world, created)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=timeout_hours))
    return dist.get_rank(), dist.get_world_size(), True


def _check_settings(shard_path: Path, sidecar: dict, cfg: TokenizeConfig, videos: list[str], sha: str,
                    text_sha: str | None = None) -> None:
    """Refuse to mix shards made with other settings, another video list or another (text) tokenizer."""
    wanted = {"settings": cfg.shard_settings(text_sha), "videos": videos, "tokenizer_sha256": sha}
    got = {k: sidecar.get(k) for k in wanted}
    if got != wanted:
        diff = sorted(k for k in wanted if got[k] != wanted[k])
        raise RuntimeError(
            f"{shard_path} was made with different {diff} than this run; use a fresh --output directory "
            f"(or delete the old shards) instead of mixing datasets"
        )


def build_manifest(
    cfg: TokenizeConfig, plan: list[list[Path]], tok: torch.nn.Module, sha: str, ignored: list[Path] = (),
    text: TextTokenizer | None = None,
) -> dict:
    """Assemble the manifest from the sidecars of all ``len(plan)`` shards (all must be finished).

    ``ignored`` (files under the input folder that are not media of ``cfg.media``) are appended to
    the failures. ``labels`` lists the distinct clip labels (``--label-from-dir``), sorted. With a text
    tokenizer ``text``, ``text_tokenizer`` records it (:meth:`TextTokenizer.manifest_entry`) and the text
    ids of every label (``class_text_ids``).

    Raises:
        RuntimeError: a shard of the plan has no sidecar.
    """
    entries, failures, labels = [], [], set()
    for k in range(len(plan)):
        path = cfg.output_dir / shards.shard_name(k)
        side = shards.read_sidecar(path) if path.is_file() else None
        if side is None:
            raise RuntimeError(f"shard {path} is not finished; cannot write the manifest")
        entries.append(shards.manifest_entry(path, side["num_samples"]))
        failures.extend(side["failures"])
        labels.update(side.get("labels", []))
    res = (cfg.resolution, cfg.resolution)
    failures.extend(
        {"path": p.relative_to(cfg.input_dir).as_posix(), "reason": f"not {cfg.media} media (suffix {p.suffix!r}); skipped"}
        for p in ignored
    )
    manifest = {
        "format": shards.SHARD_FORMAT,
        "media": cfg.media,
        "tokenizer": {
            "path": str(cfg.tokenizer),
            "sha256": sha,
            "levels": [int(x) for x in tok.config.levels],
            "codebook_size": int(tok.codebook_size),
            "latent_shape": list(tok.latent_shape(cfg.num_frames, *res)),
        },
        "clip": {
            "num_frames": cfg.num_frames,
            "frame_stride": cfg.frame_stride,
            "resolution": list(res),
            "fps": cfg.fps,
            "clip_hop": cfg.clip_hop,
            "clip_placement": cfg.clip_placement,
            "max_clips_per_video": cfg.max_clips_per_video,
        },
        "labels": sorted(labels),
        "shards": entries,
        "num_samples": sum(e["num_samples"] for e in entries),
        "failures": failures,
    }
    if text is not None:
        manifest["text_tokenizer"] = text.manifest_entry()
        manifest["class_text_ids"] = {label: text.class_name_ids(label) for label in manifest["labels"]}
    return manifest


class _Progress:
    """Rank-0 tqdm bar over all pending videos: this rank's videos as they finish, other ranks'
    videos when their shard sidecars appear (checked at most once a second). Disabled elsewhere."""

    def __init__(self, enabled: bool, cfg: TokenizeConfig, plan: list[list[Path]], pending: list[int], others: set[int], world: int):
        self.cfg, self.plan, self.others = cfg, plan, set(others)
        self.others_done = 0
        self.last_poll = self.start = time.monotonic()
        total = sum(len(plan[k]) for k in pending)
        desc = f"tokenize ({world} ranks)" if world > 1 else "tokenize"
        self.bar = tqdm(total=total, desc=desc, unit="video") if enabled else None

    def update(self, own_videos: int, clips: int) -> None:
        """Show ``own_videos`` (this rank, cumulative) plus finished videos of other ranks."""
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self.last_poll >= 1.0:
            self.last_poll = now
            done = {k for k in self.others if _is_finished(self.cfg.output_dir / shards.shard_name(k))}
            self.others -= done
            self.others_done += sum(len(self.plan[k]) for k in done)
        self.bar.set_postfix({"clips/s": f"{clips / max(now - self.start, 1e-9):.2f}"}, refresh=False)
        self.bar.update(own_videos + self.others_done - self.bar.n)

    def close(self) -> None:
        """Mark everything done (all ranks passed the barrier) and close the bar."""
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


def _process_shards(
    cfg: TokenizeConfig, plan: list[list[Path]], mine: list[int], builder: _ShardBuilder, sha: str, rank: int, world: int
) -> _Progress:
    """Write this rank's unfinished shards (after checking that finished ones match these settings).

    The media of all of them go through one :func:`decoded_media` stream (decoding runs ahead across
    shard boundaries); each shard takes its own files from it, in order.

    Returns:
        The progress bar (rank 0), to be closed after the barrier.
    """
    rel = [[v.relative_to(cfg.input_dir).as_posix() for v in group] for group in plan]
    text_sha = builder.text.sha256 if builder.text is not None else None
    pending = [k for k in range(len(plan)) if not _is_finished(cfg.output_dir / shards.shard_name(k))]
    for k in range(len(plan)):  # every rank checks every finished shard: all fail alike, none hangs
        if k not in pending:
            path = cfg.output_dir / shards.shard_name(k)
            _check_settings(path, shards.read_sidecar(path), cfg, rel[k], sha, text_sha)
    progress = _Progress(rank == 0 and cfg.progress, cfg, plan, pending, set(pending) - set(mine), world)
    todo = [k for k in mine if k in pending]
    stream = decoded_media(cfg, [video for k in todo for video in plan[k]])
    # filled while each shard's samples are consumed; its sidecar (written after them) stores them
    failures, labels = [[] for _ in todo], [set() for _ in todo]
    events = builder.shards(stream, [len(plan[k]) for k in todo], failures, labels)
    for j, k in enumerate(todo):
        path = cfg.output_dir / shards.shard_name(k)
        _remove_partial(path)
        extra = {"settings": cfg.shard_settings(text_sha), "videos": rel[k], "tokenizer_sha256": sha,
                 "labels": labels[j]}
        samples = _shard_samples(events, j)
        shards.write_shard(path, _with_progress(samples, builder, progress), failures[j], extra)
        progress.update(builder.videos_done, builder.clips_done)
    return progress


def _shard_samples(events: Iterator[tuple[int, list | None]], j: int) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Shard ``j``'s samples from :meth:`_ShardBuilder.shards`' events, up to its end."""
    for shard, samples in events:
        if shard != j:
            raise RuntimeError(f"internal error: samples of shard {shard} while writing shard {j}")
        if samples is None:
            return
        yield from samples


def _with_progress(samples: Iterator, builder: _ShardBuilder, progress: _Progress) -> Iterator:
    """Pass samples through, updating the progress bar after each one."""
    for sample in samples:
        yield sample
        progress.update(builder.videos_done, builder.clips_done)


def run_tokenize_job(cfg: TokenizeConfig, timeout_hours: float = 24.0) -> dict | None:
    """Run the job on this process's share of the shards; rank 0 also writes the manifest.

    Works as a plain single process or under torchrun (``WORLD_SIZE > 1``: gloo process group). The
    tokenizer is loaded onto ``cfg.device`` (auto: ``cuda:LOCAL_RANK`` when CUDA is available, else cpu).

    Args:
        cfg: job settings.
        timeout_hours: collective timeout (ranks wait for each other at the final barrier).
    Returns:
        The manifest dict on rank 0, ``None`` on other ranks.
    Raises:
        ValueError: invalid settings, or no media files under ``cfg.input_dir``.
        RuntimeError: the output directory holds shards made with other settings, or the tokenizer
            produced out-of-range / wrongly shaped indices.
        FileNotFoundError, NotADirectoryError: missing tokenizer checkpoint (or text tokenizer file) or input
            directory.
        ValueError: a text tokenizer file that neither sentencepiece nor tokenizers can read.
        ValueError: ``cfg.device`` names CUDA on a machine without it.
    """
    from data_prep.tokenizer import load_tokenizer, tokenizer_sha256  # heavy; import when needed

    cfg.validate()
    videos, ignored = cfg.list_inputs()
    if not videos:
        raise ValueError(f"no {cfg.media} files under {cfg.input_dir}")
    if not Path(cfg.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {cfg.tokenizer}")
    text = TextTokenizer.load(cfg.text_tokenizer) if cfg.text_tokenizer is not None else None
    choice = choose_device(cfg.device)
    activate(choice)
    rank, world, created = _init_distributed(timeout_hours)
    try:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        tok = load_tokenizer(cfg.tokenizer, device=choice.device)
        sha = tokenizer_sha256(cfg.tokenizer)
        latent = tuple(tok.latent_shape(cfg.num_frames, cfg.resolution, cfg.resolution))
        plan = plan_shards(videos, cfg.videos_per_shard)
        mine = shards_for_rank(len(plan), rank, world)
        builder = _ShardBuilder(tok, cfg, latent, text)
        start = time.monotonic()
        progress = _process_shards(cfg, plan, mine, builder, sha, rank, world)
        end = time.monotonic()
        seconds = end - start
        print(
            f"tokenize: rank {rank}/{world}: {builder.clips_done} clips from {builder.videos_done} files in "
            f"{seconds:.2f} s ({builder.clips_done / max(seconds, 1e-9):.2f} clips/s{_steady_rate(builder, end)}) "
            f"on {choice.device}, {cfg.precision}{', channels-last' if cfg.channels_last else ''}"
            f"{', compiled' if cfg.compile else ''}, {cfg.num_workers} decode workers; waited "
            f"{builder.wait_data:.2f} s for decoded media, {builder.wait_device:.2f} s for the device's ids; "
            f"{builder.time_queue:.2f} s queueing batches (whole run)",
            flush=True,
        )
        if world > 1:
            dist.barrier()
        progress.close()
        manifest = None
        if rank == 0:
            manifest = build_manifest(cfg, plan, tok, sha, ignored, text)
            shards.write_failures(cfg.output_dir, manifest["failures"])
            shards.write_manifest(cfg.output_dir, manifest)
            print(
                f"tokenize: {manifest['num_samples']} clips in {len(plan)} shards, "
                f"{len(manifest['failures'])} files skipped (reasons in {cfg.output_dir / shards.FAILURES_NAME}) "
                f"-> {cfg.output_dir / shards.MANIFEST_NAME}",
                flush=True,
            )
        if world > 1:
            dist.barrier()
        return manifest
    finally:
        if created:
            dist.destroy_process_group()
