"""Tokenize a folder of videos (or images) into WebDataset token shards (entry point; logic in data_prep.tokenize_job).

Usage::

    torchrun --nproc-per-node 2 launchers/tokenize_videos.py --input DIR --output DIR --tokenizer CKPT
    python launchers/tokenize_videos.py --input DIR --output DIR --tokenizer CKPT   # one process
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        launchers/tokenize_videos.py ...                                            # many nodes
    python launchers/tokenize_videos.py --media image --num-frames 1 ...           # images, T = 1

Rerunning the same command after a crash (any rank killed at any point) finishes only the missing
shards; every clip is written exactly once. Files that gave no clip are listed with the reason in
OUTPUT/failures.jsonl (and in manifest.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from data_prep.tokenize_job import TokenizeConfig, run_tokenize_job


def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    """Parse command-line flags into a :class:`TokenizeConfig` (exits with a usage message on errors)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, required=True, help="folder searched recursively for videos")
    p.add_argument("--output", type=Path, required=True, help="folder for shards and manifest.json")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer checkpoint")
    p.add_argument("--num-frames", type=int, default=17, help="frames per clip, 1 + 4n (default 17)")
    p.add_argument("--frame-stride", type=int, default=1, help="step between clip frames (default 1)")
    p.add_argument("--clip-hop", type=int, default=None, help="frames between clip starts (default: no overlap)")
    p.add_argument("--resolution", type=int, default=64, help="square clip side, multiple of 8 (default 64)")
    p.add_argument("--max-clips-per-video", type=int, default=None, help="keep the first N clips of each video")
    p.add_argument("--videos-per-shard", type=int, default=8, help="consecutive videos per shard (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per tokenizer forward pass (default 8)")
    p.add_argument("--label-from-dir", action="store_true", help="label = name of the video's parent folder")
    p.add_argument("--media", choices=["video", "image"], default="video",
                   help="video files (PyAV) or PNG/JPEG images as 1-frame clips (needs --num-frames 1)")
    p.add_argument("--fps", type=float, default=None, help="resample videos to this frame rate first (default: keep)")
    p.add_argument("--clip-placement", choices=["first", "uniform"], default="first",
                   help="first: clips every --clip-hop frames from the start; uniform: --max-clips-per-video "
                        "clips spread over the video (1 = middle clip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = TokenizeConfig(
        input_dir=a.input,
        output_dir=a.output,
        tokenizer=a.tokenizer,
        num_frames=a.num_frames,
        frame_stride=a.frame_stride,
        clip_hop=a.clip_hop,
        resolution=a.resolution,
        max_clips_per_video=a.max_clips_per_video,
        videos_per_shard=a.videos_per_shard,
        batch_size=a.batch_size,
        label_from_dir=a.label_from_dir,
        progress=not a.no_progress,
        media=a.media,
        fps=a.fps,
        clip_placement=a.clip_placement,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        p.error(str(exc))
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse flags and run the job on this rank."""
    run_tokenize_job(parse_args(argv))


if __name__ == "__main__":
    main()
