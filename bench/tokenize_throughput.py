#!/usr/bin/env python
"""Tokenization throughput: clips/s per rank of launchers/tokenize_videos.py under torchrun.

Runs the real job (decode with PyAV, resize/crop, encode, write shards) once per world size in
``--nproc`` into a fresh output folder, parses each rank's summary line
(``tokenize: rank r/W: C clips from F files in S s (X clips/s)``) and prints a table, plus the
end-to-end wall time (torchrun start, imports and manifest included) of each run.

    python bench/tokenize_throughput.py                                   # synthetic videos, random tiny tokenizer
    python bench/tokenize_throughput.py --input VIDEOS --tokenizer TOK.safetensors --nproc 1,2,8 --resolution 128

Without ``--input``, ``--num-videos`` synthetic 8 fps H.264 videos (``--video-frames`` frames of
160x120, a moving square on colour gradients) are written with PyAV; without ``--tokenizer``, a
randomly initialised tokenizer of ``--tokenizer-config`` is saved (speed does not depend on weights).
"""

from __future__ import annotations

import os
import sys


import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_RANK_LINE = re.compile(r"tokenize: rank (\d+)/(\d+): (\d+) clips from (\d+) files in ([\d.]+) s \(([\d.]+) clips/s\)")


def make_inputs(root: Path, num_videos: int, frames: int, tokenizer_config: Path) -> tuple[Path, Path]:
    """Write synthetic videos and a random tokenizer under ``root``; returns (video dir, checkpoint)."""
    import torch

    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, save_tokenizer
    from data_prep.synthetic import write_pattern_video

    videos = root / "videos"
    for i in range(num_videos):
        write_pattern_video(videos / f"class{i % 4}/v{i:04d}.mp4", num_frames=frames, height=120, width=160, seed=i)
    torch.manual_seed(0)
    ckpt = save_tokenizer(VideoTokenizer(TokenizerConfig.from_yaml(tokenizer_config)), root / "tok.safetensors")
    return videos, ckpt


def run_once(args: argparse.Namespace, videos: Path, ckpt: Path, out: Path, nproc: int) -> tuple[list[tuple], float]:
    """One job with ``nproc`` ranks; returns ([(rank, world, clips, files, seconds, clips/s)], wall seconds).

    Raises:
        RuntimeError: the job failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "launchers/tokenize_videos.py"), "--input", str(videos), "--output", str(out),
           "--tokenizer", str(ckpt), "--num-frames", str(args.num_frames), "--resolution", str(args.resolution),
           "--batch-size", str(args.batch_size), "--videos-per-shard", str(args.videos_per_shard), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"tokenize job with {nproc} ranks failed:\n{proc.stderr[-3000:]}")
    rows = [(int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5]), float(m[6])) for m in _RANK_LINE.finditer(proc.stdout)]
    return sorted(rows), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, help="video folder (default: synthetic videos)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer checkpoint (default: random --tokenizer-config)")
    p.add_argument("--tokenizer-config", type=Path, default=REPO / "configs/tokenizer/tiny.yaml")
    p.add_argument("--num-videos", type=int, default=16)
    p.add_argument("--video-frames", type=int, default=72)
    p.add_argument("--nproc", default="1,2", help="comma-separated world sizes (default 1,2)")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--videos-per-shard", type=int, default=2)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp = Path(tmp)
        videos, ckpt = args.input, args.tokenizer
        if videos is None or ckpt is None:
            made_videos, made_ckpt = make_inputs(tmp, args.num_videos, args.video_frames, args.tokenizer_config)
            videos, ckpt = videos or made_videos, ckpt or made_ckpt
        print(f"clips of {args.num_frames}x{args.resolution}x{args.resolution}, batch {args.batch_size}, "
              f"tokenizer {ckpt.name if args.tokenizer else args.tokenizer_config.name + ' (random init)'}, "
              f"{os.cpu_count()} CPU cores")
        print("| ranks | rank | clips | files | seconds | clips/s (rank) | clips/s (all ranks) | job wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for nproc in [int(x) for x in args.nproc.split(",")]:
            rows, wall = run_once(args, videos, ckpt, tmp / f"out_{nproc}", nproc)
            total_clips, slowest = sum(r[2] for r in rows), max(r[4] for r in rows)
            for rank, world, clips, files, seconds, rate in rows:
                agg = f"{total_clips / max(slowest, 1e-9):.2f}" if rank == 0 else ""
                print(f"| {world} | {rank} | {clips} | {files} | {seconds:.2f} | {rate:.2f} | {agg} | "
                      f"{f'{wall:.1f}' if rank == 0 else ''} |", flush=True)


if __name__ == "__main__":
    main()
