"""Generate video with a converted NBP model, block by block with a static KV cache; decode with the
tokenizer; write one mp4 per sample and a PNG contact sheet.

Frame prediction (K600-style models): condition on the first latent frames of a real clip::

    python launchers/generate.py --checkpoint runs/nbp_inference --tokenizer runs/tokenizer.safetensors \
        --prompt-video runs/media/bikes.mp4 --output runs/generated.mp4

Class-conditional hybrid (UCF-101-style models), optionally with classifier-free guidance::

    python launchers/generate.py --checkpoint CKPT --tokenizer TOK --class-name bikes --num-samples 4 \
        --cfg-scale 2.0 --output runs/bikes.mp4

Text-conditional hybrid models take ``--text-ids 12,845,9`` (ids from your text tokenizer).
Sampling defaults are the paper's: top-k 16000, top-p 0.9, temperature 1 (``--top-k 0 --top-p 1``
disable the filters, ``--temperature 0`` is greedy).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nbp-generate`` (sampling flags shared with ``nbp-evaluate``)."""
    from megatron_nbp.inference.sampling import add_sampling_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="converted model directory (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors)")
    parser.add_argument("--prompt-video", help="frame prediction: real video whose first frames condition generation")
    parser.add_argument("--class-name", help="class-conditional models: one of the model's condition_labels")
    parser.add_argument("--text-ids", help="text-conditional models: comma-separated text token ids")
    parser.add_argument("--output", required=True, help="output .mp4 (several samples: OUT_0.mp4, OUT_1.mp4, ...)")
    parser.add_argument("--contact-sheet", help="PNG of real / reconstruction / generated frames (default: OUTPUT.png)")
    parser.add_argument("--start-frame", type=int, default=0)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--condition-frames", type=int, help="latent frames given (default: the model's)")
    parser.add_argument("--num-samples", type=int, default=1)
    add_sampling_args(parser)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--tensorboard-dir", help="also log each sample's frames to TensorBoard (an image series per "
                                                  "sample: SummaryWriter.add_video would need moviepy)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return parser


def main(argv=None) -> None:
    """Console script ``nbp-generate``: videos from a converted checkpoint, a tokenizer and a prompt."""
    from megatron_nbp.inference.sampling import sampling_from_args

    parser = build_parser()
    args = parser.parse_args(argv)

    from data_prep.tokenizer import load_tokenizer
    from data_prep.video_io import load_clip, write_contact_sheet, write_mp4
    from megatron_nbp.inference.model import load_inference_model
    from megatron_nbp.inference.video import (clip_geometry, condition_pixel_frames, generate_conditional_videos,
                                              predict_frames, sample_paths)

    model = load_inference_model(args.checkpoint, args.device)
    tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    geo = clip_geometry(model, tokenizer)
    try:
        sampling = sampling_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    output = Path(args.output)
    paths = sample_paths(output, args.num_samples)
    sheet = Path(args.contact_sheet) if args.contact_sheet else output.with_suffix(".png")
    if model.config.token_layout.conditional:         # class or text condition (hybrid)
        condition, padding, what = _condition(parser, args, model.config)
        videos, result = generate_conditional_videos(model, tokenizer, condition, padding, sampling, args.seed)
        for video, path in zip(videos, paths):
            write_mp4(video, path, fps=args.fps)
        write_contact_sheet(videos, sheet, row_labels=[f"{what} #{i}" for i in range(len(videos))])
        _tensorboard(args.tensorboard_dir, videos, what)
        tokens = result.tokens.numel()
        print(f"> {what}: {result.steps} forward passes (block size {model.config.block_size}) for {tokens} "
              f"tokens in {result.seconds:.2f} s ({tokens / result.seconds:.0f} tokens/s)", flush=True)
        print(f"> wrote {', '.join(map(str, paths))} and {sheet}", flush=True)
        return
    if not args.prompt_video:
        parser.error("a frame-prediction model needs --prompt-video")
    clip = load_clip(args.prompt_video, geo.num_frames, (geo.height, geo.width), args.start_frame, args.frame_stride)
    c = args.condition_frames or model.config.condition_frames
    recon, videos, result = predict_frames(model, tokenizer, clip, args.num_samples, c, sampling, args.seed)
    for video, path in zip(videos, paths):
        write_mp4(video, path, fps=args.fps)
    labels = ["real", "tokenizer recon"] + [f"generated {i}" for i in range(len(videos))]
    write_contact_sheet([clip, recon, *videos], sheet, row_labels=labels)
    _tensorboard(args.tensorboard_dir, videos, f"prediction from {Path(args.prompt_video).name}")
    generated = result.tokens.shape[0] * (model.config.num_video_tokens - c * model.config.latent_shape[1]
                                          * model.config.latent_shape[2])
    print(f"> condition: {condition_pixel_frames(c)} frames ({c} latent frames) of {args.prompt_video}; "
          f"generated {geo.num_frames - condition_pixel_frames(c)} frames per sample", flush=True)
    print(f"> {result.steps} forward passes (block size {model.config.block_size}) for {generated} tokens "
          f"in {result.seconds:.2f} s ({generated / result.seconds:.0f} tokens/s; the prompt's prefill "
          f"{result.prefill_seconds:.2f} s)", flush=True)
    print(f"> wrote {', '.join(map(str, paths))} and {sheet}", flush=True)


def _tensorboard(logdir, videos, what: str) -> None:
    """Log the frames of every sample (uint8 [T, H, W, 3]) as TensorBoard images, one tag per sample."""
    if not logdir:
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(logdir) as writer:
        for i, video in enumerate(videos):
            writer.add_images(f"generated/{i}", video, dataformats="NHWC")
        writer.add_text("generated/condition", what)


def _condition(parser, args, cfg):
    """(condition ids [num_samples, P], padding [num_samples, P] or None, a label) from the flags; the model's
    token layout turns a class name or text ids into condition ids (text padded / truncated to P)."""
    layout = cfg.token_layout
    if layout.condition_key == "text_ids":
        if not args.text_ids:
            parser.error("a text-conditional model needs --text-ids")
        try:
            raw = [int(x) for x in args.text_ids.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--text-ids must be comma-separated integers, got {args.text_ids!r}")
        what = f"text {raw[:layout.num_condition_tokens]}"
    else:
        raw, what = args.class_name, f"class {args.class_name!r}"
    try:
        condition, padding = layout.condition_batch([layout.sample_condition(raw)] * args.num_samples)
    except ValueError as err:
        parser.error(f"{'--text-ids' if layout.condition_key == 'text_ids' else '--class-name'}: {err}")
    return condition, (padding if bool(padding.any()) else None), what


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
