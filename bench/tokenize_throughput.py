#!/usr/bin/env python
"""Tokenizer throughput: decode alone, encode alone, the whole tokenization job, and tokenizer training.

Five parts (``--parts``; all but ``loop`` by default), one table (clips/s; training: steps/s and clips/s):

* ``decode``: PyAV decode + resize/crop + clip cutting of every video, through the job's own loader
  (:func:`data_prep.tokenize_job.decoded_media`) with each of ``--decode-workers`` DataLoader workers
  (0 = in-process), no tokenizer (worker start-up included);
* ``encode``: the job's encoding step (uint8 clips copied to the device, converted, encoded at each
  precision: ``frames_batch_to_tensor`` of :mod:`data_prep.tokenize_job`, ``make_token_encoder`` of
  :mod:`data_prep.tokenizer.precision`) on random clips already in host memory, for each of
  ``--batch-sizes``, after one warm-up batch (cuDNN autotuning: on a GPU every row runs with cuDNN's
  benchmark mode, as the job does); the bf16 rows also compare their token ids with fp32's on the first
  clips (the share equal, and equal or one FSQ rounding step apart); ``--encode-variants`` adds rows with
  the job's opt-in encoding settings (``channels_last``: channels-last 3D weights and clips; ``compile``:
  ``torch.compile`` of the encoder, compiled once per batch size; joined with ``+``), each compared (at the
  first batch size, with the same function that was timed) against the plain encoder's ids at the same
  precision; every encode row gives the encoder's model TFLOP/s (its FLOPs per clip counted once by
  ``torch.utils.flop_counter`` on the meta device), and ``--profile-encode`` records one more batch of each
  setting with torch.profiler and prints, right after its row, the fraction of it the GPU was busy and the
  kernels taking the most time;
* ``loop``: the job's shard loop alone, in this process (``_ShardBuilder`` of :mod:`data_prep.tokenize_job`:
  batching, copying, encoding with the next batch queued before the last one is read back, shard writing) on
  random clips already in host memory (4 per video, no decoding, no DataLoader, no torchrun), at each
  ``--job-precisions`` and ``--job-settings``, timed after the first shard (compilation and cuDNN autotuning
  excluded), with the time it waited for the device; ``--profile-loop`` then records three more shards with
  torch.profiler (not in the timing) and prints how busy the GPU was and the operators taking the most
  time. Against ``encode`` it shows what the loop costs, against ``job`` what decoding and the DataLoader cost;
* ``job``: the real job under ``torchrun --standalone`` (decode workers, encode, shard writing) with each
  of ``--job-workers`` at each of ``--job-precisions`` and ``--job-settings`` (the job's ``--channels-last``
  / ``--compile``); the rate is the rank's own summary line (imports, tokenizer loading and the manifest
  excluded; compilation included);
* ``train``: tokenizer training steps of the trainer's own functions (discriminator on, EMA on), after
  one warm-up step, at each of ``--train-precisions`` with ``--train-batch-size`` clips (in micro-batches
  of ``--train-micro-batch-size`` with accumulated gradients when given).

Defaults follow the machine: with CUDA, the 370M layout (``configs/tokenizer/magvit2.yaml``) at 17x128x128
on ``cuda:0``, fp32 and bf16, 8 decode workers; without, ``configs/tokenizer/tiny.yaml`` at 17x64x64 on
the CPU in fp32. Without ``--input``, ``--num-videos`` synthetic H.264 videos of ``--video-frames``
frames (``--video-size``) are written first; without ``--tokenizer``, a randomly initialised tokenizer
of ``--tokenizer-config`` is used (speed does not depend on the weights).

    python bench/tokenize_throughput.py                       # CPU or GPU defaults
    python bench/tokenize_throughput.py --parts encode --batch-sizes 16,32,64 --precisions bf16
    python bench/tokenize_throughput.py --input VIDEOS --tokenizer TOK.safetensors --parts decode,job
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

_RANK_LINE = re.compile(r"tokenize: rank (\d+)/(\d+): (\d+) clips from (\d+) files in ([\d.]+) s \(([\d.]+) clips/s"
                        r"(?:; ([\d.]+) after the first batch)?\)")
_WAIT_LINE = re.compile(r"waited ([\d.]+) s for decoded media, ([\d.]+) s for the device's ids; ([\d.]+) s queueing")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_videos(root: Path, num_videos: int, frames: int, size: tuple[int, int]) -> Path:
    """Write ``num_videos`` synthetic H.264 videos (``frames`` frames of ``size`` = (width, height))."""
    from data_prep.synthetic import write_pattern_video

    videos = root / "videos"
    for i in range(num_videos):
        write_pattern_video(videos / f"class{i % 4}/v{i:04d}.mp4", num_frames=frames, height=size[1], width=size[0],
                            seed=i)
    return videos


def bench_decode(args: argparse.Namespace, videos: Path, ckpt: Path, workers: int) -> tuple[int, float]:
    """(clips, seconds) of decoding every video with ``workers`` DataLoader workers (start-up included)."""
    from data_prep.tokenize_job import TokenizeConfig, decoded_media

    cfg = TokenizeConfig(input_dir=videos, output_dir=videos.parent / "unused", tokenizer=ckpt,
                         num_frames=args.num_frames, resolution=args.resolution, num_workers=workers,
                         prefetch_factor=args.prefetch_factor)
    media = cfg.list_inputs()[0]
    start = time.perf_counter()
    clips = sum(len(item.starts) for item in decoded_media(cfg, media))
    return clips, time.perf_counter() - start


def bench_encode(args: argparse.Namespace, encode, device: torch.device, batch: int) -> tuple[int, float]:
    """(clips, seconds) of ``args.encode_batches`` batches of ``batch`` random uint8 clips, host to tokens
    through ``encode`` (a :func:`data_prep.tokenizer.precision.make_token_encoder` function)."""
    from data_prep.tokenize_job import frames_batch_to_tensor

    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (batch, args.num_frames, args.resolution, args.resolution, 3), generator=g,
                          dtype=torch.uint8)

    def one() -> None:
        encode(frames_batch_to_tensor(clips, device)).cpu()

    one()  # warm-up (cuDNN autotuning for this shape)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.encode_batches):
        one()
    _sync(device)
    return batch * args.encode_batches, time.perf_counter() - start


ENCODE_VARIANTS = ("plain", "channels_last", "compile")


@contextlib.contextmanager
def encoder_variant(tokenizer, variant: str, precision: str, batch_size: int | None = None):
    """The encoding function of ``variant`` (names of :data:`ENCODE_VARIANTS` joined by ``+``) at
    ``precision``: the job's own :func:`data_prep.tokenizer.precision.make_token_encoder` with its
    ``channels_last`` / ``compile`` (compiled for ``batch_size``, smaller batches padded, as the job does);
    the tokenizer's memory format is restored after it. Every row runs with cuDNN's benchmark mode on, as
    the job does on a GPU (:func:`data_prep.device.activate`)."""
    from data_prep.tokenizer.precision import make_token_encoder

    parts = set(variant.split("+"))
    unknown = parts - set(ENCODE_VARIANTS)
    if unknown:
        raise SystemExit(f"--encode-variants: unknown {sorted(unknown)}; known: {', '.join(ENCODE_VARIANTS)}")
    # Dynamo skips the guards on a module's tensors while its parameter dict is unchanged, and `.to(memory_format=)`
    # changes the parameters in place: without a reset, a compiled variant would reuse the previous variant's graph
    # for weights of another layout (on CUDA: a stride assertion). The job compiles once per process.
    torch._dynamo.reset()
    try:
        yield make_token_encoder(tokenizer, precision, channels_last="channels_last" in parts,
                                 compile="compile" in parts, batch_size=batch_size)
    finally:
        tokenizer.encoder.to(memory_format=torch.contiguous_format)
        torch._dynamo.reset()


def encoder_flops_per_clip(config, frames: int, resolution: int) -> float:
    """FLOPs of one clip through the encoder of a tokenizer of ``config`` (counted on the meta device:
    nothing is allocated or run)."""
    from torch.utils.flop_counter import FlopCounterMode

    from data_prep.tokenizer import VideoTokenizer

    with torch.device("meta"):
        encoder = VideoTokenizer(config).encoder
        video = torch.empty(1, config.in_channels, frames, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        encoder(video)
    return float(counter.get_total_flops())


def profile_encode(args: argparse.Namespace, encode, device: torch.device, batch: int) -> str:
    """torch.profiler summary (megatron_nbp.training.profiling.profile_summary) of one more batch through
    ``encode``."""
    from data_prep.tokenize_job import frames_batch_to_tensor
    from megatron_nbp.training.profiling import profile_summary, profiler_activities

    clips = torch.randint(0, 256, (batch, args.num_frames, args.resolution, args.resolution, 3), dtype=torch.uint8)
    with torch.profiler.profile(activities=profiler_activities(device), record_shapes=True) as prof:
        with torch.profiler.record_function("encode batch 1"):
            encode(frames_batch_to_tensor(clips, device)).cpu()
    return profile_summary(prof.events(), label_prefix="encode batch ", unit="batch")


def agreement_clips(args: argparse.Namespace, videos: Path, ckpt: Path, noise_clips: int,
                    seed: int) -> tuple[torch.Tensor, str]:
    """(uint8 clips ``[N, T, H, W, 3]``, what they are) for the token agreement figures.

    With ``--input``: the first ``--agreement-clips`` clips of the given videos, decoded as the job decodes
    them (real footage). Without: ``noise_clips`` uniform-noise clips (a rough figure, noise is the hardest
    input)."""
    from data_prep.tokenize_job import TokenizeConfig, decoded_media

    if args.input is None:
        g = torch.Generator().manual_seed(seed)
        clips = torch.randint(0, 256, (noise_clips, args.num_frames, args.resolution, args.resolution, 3),
                              generator=g, dtype=torch.uint8)
        return clips, f"{noise_clips} noise clips"
    cfg = TokenizeConfig(input_dir=videos, output_dir=videos.parent / "unused", tokenizer=ckpt,
                         num_frames=args.num_frames, resolution=args.resolution, num_workers=0)
    found = []
    for item in decoded_media(cfg, cfg.list_inputs()[0]):
        if item.clips is not None:
            found.extend(item.clips)
        if len(found) >= args.agreement_clips:
            break
    if not found:
        raise SystemExit(f"--input {videos}: no clip of {args.num_frames} frames could be decoded")
    clips = torch.stack(found[: args.agreement_clips])
    return clips, f"{len(clips)} real clips"


def encode_clips(encode, clips: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    """Token ids of uint8 ``clips`` ``[N, T, H, W, 3]`` through ``encode``, ``batch`` clips at a time."""
    from data_prep.tokenize_job import frames_batch_to_tensor

    return torch.cat([encode(frames_batch_to_tensor(clips[i:i + batch], device)).cpu()
                      for i in range(0, len(clips), batch)])


def bf16_agreement(args: argparse.Namespace, tokenizer, device: torch.device, videos: Path,
                   ckpt: Path) -> tuple[str, str]:
    """(bf16 token ids against fp32's, as :meth:`TokenAgreement.describe`; what it was measured on:
    :func:`agreement_clips`, 4 noise clips without ``--input``), in batches of 2."""
    from data_prep.tokenize_job import frames_batch_to_tensor
    from data_prep.tokenizer.precision import token_agreement

    clips, what = agreement_clips(args, videos, ckpt, noise_clips=4, seed=1)
    return token_agreement(tokenizer, frames_batch_to_tensor(clips, device), batch_size=2).describe(), what


JOB_SETTINGS = {"plain": [], "channels_last": ["--channels-last"], "compile": ["--compile"]}


def job_flags(setting: str) -> list[str]:
    """The tokenization job's flags of a ``--job-settings`` entry (names of :data:`JOB_SETTINGS` joined by +)."""
    parts = setting.split("+")
    unknown = set(parts) - set(JOB_SETTINGS)
    if unknown:
        raise SystemExit(f"--job-settings: unknown {sorted(unknown)}; known: {', '.join(JOB_SETTINGS)}")
    return [flag for part in parts for flag in JOB_SETTINGS[part]]


def bench_job(args: argparse.Namespace, videos: Path, ckpt: Path, out: Path, workers: int,
              precision: str, flags: list[str] = ()) -> tuple[int, float, float, float | None, str]:
    """(clips, seconds, clips/s, clips/s after the first batch or None, "; waited ..." or "") from rank 0's
    summary line of one torchrun job with ``workers`` workers and the extra job ``flags`` (the wait is the
    time the job's loop spent blocked on decoded media and on the device's token ids).

    Raises:
        RuntimeError: the job failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(REPO / "launchers/tokenize_videos.py"), "--input", str(videos), "--output", str(out),
           "--tokenizer", str(ckpt), "--num-frames", str(args.num_frames), "--resolution", str(args.resolution),
           "--batch-size", str(args.job_batch_size), "--videos-per-shard", str(args.videos_per_shard),
           "--num-workers", str(workers), "--prefetch-factor", str(args.prefetch_factor), "--device", args.device,
           "--precision", precision, "--no-progress", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # torchrun would set 1: same threads as encode
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"tokenize job with {workers} workers failed:\n{proc.stderr[-3000:]}")
    match = _RANK_LINE.search(proc.stdout)
    if match is None:
        raise RuntimeError(f"no summary line in the job's output:\n{proc.stdout[-2000:]}")
    waits = _WAIT_LINE.search(proc.stdout)
    waited = (f"; waited {waits[1]} s for decoded media, {waits[2]} s for the device, {waits[3]} s queueing "
              "batches (whole run)" if waits else "")
    return int(match[3]), float(match[5]), float(match[6]), (float(match[7]) if match[7] else None), waited


def bench_loop(args: argparse.Namespace, tokenizer, ckpt: Path, device: torch.device, precision: str, setting: str,
               out: Path) -> tuple[int, float, str, str | None]:
    """(clips, seconds, "; waited ..." note, profile summary or None) of the job's shard loop in this process
    after its first shard (the clips queued on the device after it, so a batch queued while the first shard was
    written is not counted): ``args.num_videos`` items of 4 random clips (8 distinct ones, reused) already in host
    memory, ``args.videos_per_shard`` items per shard, batches of ``args.job_batch_size``, encoded at
    ``precision`` with the ``--job-settings`` entry ``setting``; shards written into ``out``. With
    ``args.profile_loop`` three more shards follow the timed ones under torch.profiler (not timed). The
    tokenizer's memory format and torch.compile's caches are restored after it."""
    from data_prep import shards
    from data_prep.tokenize_job import DecodedMedia, TokenizeConfig, _shard_samples, _ShardBuilder
    from megatron_nbp.training.profiling import profile_summary, profiler_activities

    parts = set(setting.split("+"))
    frames, res = args.num_frames, args.resolution
    cfg = TokenizeConfig(input_dir=out, output_dir=out, tokenizer=ckpt, num_frames=frames, resolution=res,
                         batch_size=args.job_batch_size, videos_per_shard=args.videos_per_shard, precision=precision,
                         channels_last="channels_last" in parts, compile="compile" in parts, progress=False)
    timed = max(3, args.num_videos // args.videos_per_shard)
    sizes = [args.videos_per_shard] * (timed + (3 if args.profile_loop else 0))
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 256, (4, frames, res, res, 3), generator=g, dtype=torch.uint8) for _ in range(8)]
    items = (DecodedMedia(f"v{i}.mp4", None, 25.0, [0, frames, 2 * frames, 3 * frames], pool[i % len(pool)])
             for i in range(sum(sizes)))
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.reset()  # as in encoder_variant: no graph of another variant's weight layout is reused
    summary = None
    try:
        builder = _ShardBuilder(tokenizer, cfg, tuple(tokenizer.latent_shape(frames, res, res)))
        failures, labels = [[] for _ in sizes], [set() for _ in sizes]
        events = builder.shards(items, sizes, failures, labels)

        def write(j: int) -> None:
            shards.write_shard(out / shards.shard_name(j), _shard_samples(events, j), failures[j], {})

        write(0)  # compiles / autotunes; the next shard's first batch is queued by now (on a CPU: computed)
        _sync(device)
        clips, waited = builder.clips_queued, builder.wait_device  # the clips queued in the window are counted
        start = time.perf_counter()
        for j in range(1, timed):
            write(j)
        _sync(device)
        seconds = time.perf_counter() - start
        clips, waited = builder.clips_queued - clips, builder.wait_device - waited
        if args.profile_loop:
            with torch.profiler.profile(activities=profiler_activities(device)) as profiler:
                for j in range(timed, len(sizes)):
                    write(j)
                _sync(device)
            summary = profile_summary(profiler.events(), label_prefix="queue batch ", unit="batch")
    finally:
        tokenizer.encoder.to(memory_format=torch.contiguous_format)
        torch._dynamo.reset()
    return clips, seconds, f"; waited {waited:.2f} s for the device", summary


def bench_train(args: argparse.Namespace, videos: Path, choice, precision: str,
                recompute: str | None = None) -> tuple[int, float, float | None]:
    """(steps, seconds, peak GiB allocated on the GPU or None on the CPU) of ``args.train_steps`` tokenizer
    training steps after one warm-up step, with ``recompute`` as ``--recompute-granularity`` and
    ``args.train_micro_batch_size`` as ``--micro-batch-size``."""
    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.config import TrainOptions
    from data_prep.tokenizer.train import _checked_config, _train_step, _Trainables, micro_batches

    opts = TrainOptions(config=str(args.tokenizer_config), data=str(videos), output=str(videos.parent / "t.st"),
                        resolution=args.resolution, num_frames=args.num_frames, batch_size=args.train_batch_size,
                        lr=1e-4, warmup_steps=1, disc_weight=0.1, disc_start=0, lecam_weight=0.001,
                        ema_decay=0.999, precision=precision, device=str(choice.device),
                        recompute_granularity=recompute, micro_batch_size=args.train_micro_batch_size)
    micro = micro_batches(opts, 1)[0]
    if choice.is_cuda:
        torch.cuda.reset_peak_memory_stats(choice.device)
    t = _Trainables.build(opts, _checked_config(opts), 1, choice)
    bank = load_clip_bank(opts.data, opts.resolution, opts.num_frames)
    generator = torch.Generator().manual_seed(0)
    _train_step(opts, t, bank, generator, 0, 0.0, micro_batch_size=micro)
    _sync(choice.device)
    start = time.perf_counter()
    for step in range(1, args.train_steps + 1):
        _train_step(opts, t, bank, generator, step, 0.0, micro_batch_size=micro)
    _sync(choice.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(choice.device) / 2**30 if choice.is_cuda else None
    del t
    if choice.is_cuda:
        torch.cuda.empty_cache()
    return args.train_steps, seconds, peak


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="decode,encode,job,train",
                   help="comma-separated: decode, encode, loop, job, train")
    p.add_argument("--input", type=Path, help="video folder (default: synthetic videos)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer checkpoint (default: random --tokenizer-config)")
    p.add_argument("--tokenizer-config", type=Path,
                   default=REPO / "configs/tokenizer" / ("magvit2.yaml" if cuda else "tiny.yaml"))
    p.add_argument("--device", default="auto", help="auto (cuda:0 when CUDA is available, else cpu), cpu, cuda:N")
    p.add_argument("--precisions", default="fp32,bf16" if cuda else "fp32", help="encode / train / job precisions")
    p.add_argument("--num-videos", type=int, default=32 if cuda else 8)
    p.add_argument("--video-frames", type=int, default=72)
    p.add_argument("--video-size", default="320x240" if cuda else "160x120", help="WIDTHxHEIGHT of synthetic videos")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--resolution", type=int, default=128 if cuda else 64)
    p.add_argument("--decode-workers", default="0,8" if cuda else "0,2")
    p.add_argument("--prefetch-factor", type=int, default=2)
    p.add_argument("--batch-sizes", default="8,32" if cuda else "1,8", help="encode batch sizes")
    p.add_argument("--encode-batches", type=int, default=4 if cuda else 2, help="timed batches per encode row")
    p.add_argument("--job-workers", default="8" if cuda else "0,2")
    p.add_argument("--job-precisions", default="bf16" if cuda else "fp32", help="precisions of the job rows")
    p.add_argument("--job-batch-size", type=int, default=32 if cuda else 8)
    p.add_argument("--job-settings", default="plain",
                   help="comma-separated encoding settings of the job rows: plain, or names of "
                        f"{', '.join(list(JOB_SETTINGS)[1:])} joined by '+' (the job's --channels-last / --compile)")
    p.add_argument("--videos-per-shard", type=int, default=8 if cuda else 2)
    p.add_argument("--train-batch-size", type=int, default=2)
    p.add_argument("--train-micro-batch-size", type=int,
                   help="clips per forward/backward pass of the train rows (gradients accumulated; must divide "
                        "--train-batch-size; default: the whole batch)")
    p.add_argument("--train-precisions", help="precisions of the train rows (default: --precisions)")
    p.add_argument("--train-recompute", default="none",
                   help="comma-separated --recompute-granularity settings of the train rows: none, full")
    p.add_argument("--train-steps", type=int, default=3 if cuda else 2, help="timed steps per train row")
    p.add_argument("--encode-variants", default="plain",
                   help="comma-separated encoder settings for the encode rows: plain, or names of "
                        f"{', '.join(ENCODE_VARIANTS[1:])} joined by '+' (e.g. plain,compile+channels_last)")
    p.add_argument("--profile-loop", action="store_true",
                   help="after each loop row's timed shards, record three more with torch.profiler and print the "
                        "summary")
    p.add_argument("--profile-encode", action="store_true",
                   help="record one more batch of each encode setting with torch.profiler and print its summary")
    p.add_argument("--agreement-clips", type=int, default=32,
                   help="real clips (from --input) of the bf16 vs fp32 token agreement")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"decode", "encode", "loop", "job", "train"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}")
    precisions = args.precisions.split(",")

    from data_prep.device import activate, choose_device
    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, load_tokenizer, save_tokenizer

    choice = choose_device(args.device)
    activate(choice)
    args.device = str(choice.device)
    gpu = torch.cuda.get_device_name(choice.device) if choice.is_cuda else f"{os.cpu_count()}-core CPU"
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp = Path(tmp)
        videos = args.input or make_videos(tmp, args.num_videos, args.video_frames,
                                           tuple(int(x) for x in args.video_size.split("x")))
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer, device=choice.device)
            ckpt, name = args.tokenizer, args.tokenizer.name
        else:
            torch.manual_seed(0)
            tokenizer = VideoTokenizer(TokenizerConfig.from_yaml(args.tokenizer_config))
            ckpt = save_tokenizer(tokenizer, tmp / "tok.safetensors") if "job" in parts else tmp / "none"
            tokenizer = tokenizer.to(choice.device).eval()
            name = f"{args.tokenizer_config.name} (random init)"
        params = sum(p.numel() for p in tokenizer.parameters()) / 1e6
        print(f"# tokenizer {name}, {params:.1f}M parameters | clips {args.num_frames}x{args.resolution}x"
              f"{args.resolution} | {choice.device} ({gpu}) | torch {torch.__version__} | "
              f"{time.strftime('%Y-%m-%d')}", flush=True)
        print("| part | setting | clips | seconds | clips/s | note |\n|---|---|---|---|---|---|", flush=True)
        if "decode" in parts:
            for workers in _ints(args.decode_workers):
                clips, seconds = bench_decode(args, videos, ckpt, workers)
                print(f"| decode | {workers} workers | {clips} | {seconds:.2f} | {clips / seconds:.1f} | PyAV + "
                      f"resize/crop + clips, {args.video_size if not args.input else 'given'} videos |", flush=True)
        if "encode" in parts:
            from data_prep.tokenizer.precision import compare_token_ids, encode_tokens, fp32_label

            flops = encoder_flops_per_clip(tokenizer.config, args.num_frames, args.resolution)
            first_batch = _ints(args.batch_sizes)[0]
            variants = args.encode_variants.split(",")
            if any(v != "plain" for v in variants):
                clips_v, what_v = agreement_clips(args, videos, ckpt, noise_clips=2, seed=2)
            for precision in precisions:
                note = ""
                if precision == "bf16":
                    rate, what = bf16_agreement(args, tokenizer, choice.device, videos, ckpt)
                    note = f"token ids vs {fp32_label(choice.device)}: {rate} ({what})"
                if any(v != "plain" for v in variants):
                    plain_ids = encode_clips(functools.partial(encode_tokens, tokenizer, precision=precision),
                                             clips_v, choice.device, first_batch)
                for variant in variants:
                    label = "" if variant == "plain" else f", {variant}"
                    for batch in _ints(args.batch_sizes):
                        vnote, profile = (note if variant == "plain" else ""), None
                        with encoder_variant(tokenizer, variant, precision, batch) as encode:
                            clips, seconds = bench_encode(args, encode, choice.device, batch)
                            if batch == first_batch and variant != "plain":
                                agreement = compare_token_ids(tokenizer.quantizer, plain_ids, encode_clips(
                                    encode, clips_v, choice.device, batch))
                                vnote = f"token ids vs plain {precision}: {agreement.describe()} ({what_v})"
                            if args.profile_encode and batch == first_batch:
                                profile = profile_encode(args, encode, choice.device, batch)
                        tflops = flops * clips / seconds / 1e12
                        print(f"| encode | {precision}, batch {batch}{label} | {clips} | {seconds:.2f} | "
                              f"{clips / seconds:.1f} | {tflops:.3g} TFLOP/s ({flops / 1e12:.3g} TFLOP per clip)"
                              f"{'; ' + vnote if vnote else ''} |", flush=True)
                        if profile is not None:  # at once: a later row running out of time loses nothing
                            print(f"\n### profile: encode {precision}, batch {batch}{label} (torch.profiler, one "
                                  f"batch)\n```\n{profile.rstrip()}\n```\n", flush=True)
        if "loop" in parts:
            for setting in args.job_settings.split(","):
                job_flags(setting)  # validates the names
                label = "" if setting == "plain" else f", {setting}"
                for precision in args.job_precisions.split(","):
                    clips, seconds, waited, profile = bench_loop(args, tokenizer, ckpt, choice.device, precision,
                                                                 setting, tmp / f"loop_{setting}_{precision}")
                    print(f"| loop | {precision}, batch {args.job_batch_size}{label} | {clips} | {seconds:.2f} | "
                          f"{clips / seconds:.1f} | the job's shard loop in-process on clips in host memory, after "
                          f"the first shard{waited} |", flush=True)
                    if profile is not None:
                        print(f"\n### profile: loop {precision}{label} (torch.profiler, three shards after the "
                              "timed ones)\n"
                              f"```\n{profile.rstrip()}\n```\n", flush=True)
        del tokenizer
        if choice.is_cuda:
            torch.cuda.empty_cache()
        if "job" in parts:
            for setting in args.job_settings.split(","):
                flags = job_flags(setting)
                label = "" if setting == "plain" else f", {setting}"
                for precision in args.job_precisions.split(","):
                    for workers in _ints(args.job_workers):
                        clips, seconds, rate, steady, waited = bench_job(args, videos, ckpt, tmp / f"out_{setting}_"
                                                                 f"{precision}_{workers}", workers, precision, flags)
                        after = "" if steady is None else f"; {steady:.1f} clips/s after the first batch"
                        print(f"| job | {precision}, {workers} workers, batch {args.job_batch_size}{label} | {clips} | "
                              f"{seconds:.2f} | {rate:.1f} | torchrun, 1 rank, shards written{after}{waited} |",
                              flush=True)
        if "train" in parts:
            for precision in (args.train_precisions or args.precisions).split(","):
                for recompute in args.train_recompute.split(","):
                    if recompute not in ("none", "full"):
                        raise SystemExit(f"--train-recompute: unknown {recompute!r}; known: none, full")
                    steps, seconds, peak = bench_train(args, videos, choice, precision,
                                                       None if recompute == "none" else recompute)
                    clips = steps * args.train_batch_size
                    label = "" if recompute == "none" else ", recompute full"
                    if args.train_micro_batch_size:
                        label = f" in micro-batches of {args.train_micro_batch_size}{label}"
                    memory = "" if peak is None else f"; peak {peak:.1f} GiB allocated"
                    print(f"| train | {precision}, batch {args.train_batch_size}{label} | {clips} | {seconds:.2f} | "
                          f"{clips / seconds:.2f} | {steps / seconds:.3f} steps/s (GAN + EMA on){memory} |",
                          flush=True)


if __name__ == "__main__":
    main()
