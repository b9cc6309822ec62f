#!/usr/bin/env python
"""Generate video with a converted NBP model: condition on the first latent frames of a real clip,
generate the rest block by block with a static KV cache, decode with the tokenizer, write mp4 + PNG.

    python launchers/generate.py --checkpoint runs/nbp_inference --tokenizer runs/tokenizer.safetensors \
        --prompt-video runs/media/bikes.mp4 --output runs/generated.mp4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="converted model directory (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors)")
    parser.add_argument("--prompt-video", required=True, help="real video whose first frames condition generation")
    parser.add_argument("--output", required=True, help="output .mp4 (several samples: OUT_0.mp4, OUT_1.mp4, ...)")
    parser.add_argument("--contact-sheet", help="PNG of real / reconstruction / generated frames (default: OUTPUT.png)")
    parser.add_argument("--start-frame", type=int, default=0)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--condition-frames", type=int, help="latent frames given (default: the model's)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)

    from data_prep.tokenizer import load_tokenizer
    from data_prep.video_io import load_clip, write_contact_sheet, write_mp4
    from megatron_nbp.inference.generate import SamplingConfig
    from megatron_nbp.inference.model import load_inference_model
    from megatron_nbp.inference.video import clip_geometry, condition_pixel_frames, predict_frames, sample_paths

    model = load_inference_model(args.checkpoint, args.device)
    tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    geo = clip_geometry(model, tokenizer)
    clip = load_clip(args.prompt_video, geo.num_frames, (geo.height, geo.width), args.start_frame, args.frame_stride)
    c = args.condition_frames or model.config.condition_frames
    recon, videos, result = predict_frames(
        model, tokenizer, clip, args.num_samples, c,
        SamplingConfig(args.temperature, args.top_k, args.top_p), args.seed,
    )
    output = Path(args.output)
    paths = sample_paths(output, args.num_samples)
    for video, path in zip(videos, paths):
        write_mp4(video, path, fps=args.fps)
    sheet = Path(args.contact_sheet) if args.contact_sheet else output.with_suffix(".png")
    labels = ["real", "tokenizer recon"] + [f"generated {i}" for i in range(len(videos))]
    write_contact_sheet([clip, recon, *videos], sheet, row_labels=labels)
    generated = result.tokens.shape[0] * (model.config.num_video_tokens - c * model.config.latent_shape[1]
                                          * model.config.latent_shape[2])
    print(f"> condition: {condition_pixel_frames(c)} frames ({c} latent frames) of {args.prompt_video}; "
          f"generated {geo.num_frames - condition_pixel_frames(c)} frames per sample", flush=True)
    print(f"> {result.steps} forward passes (block size {model.config.block_size}) for {generated} tokens "
          f"in {result.seconds:.2f} s ({generated / result.seconds:.0f} tokens/s)", flush=True)
    print(f"> wrote {', '.join(map(str, paths))} and {sheet}", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
