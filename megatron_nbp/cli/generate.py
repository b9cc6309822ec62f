"""Generate video with a converted NBP model, block by block with a static KV cache; decode with the
tokenizer; write one mp4 per prompt and sample and a PNG contact sheet. A thin command line over
megatron_nbp.inference.pipeline.NBPPipeline (the Python API).

Frame prediction (K600-style models): condition on the first latent frames of real clips (one or more
``--prompt-video``, generated together as one batch)::

    python launchers/generate.py --checkpoint runs/nbp_inference --tokenizer runs/tokenizer.safetensors \
        --prompt-video runs/media/bikes.mp4 --prompt-video runs/media/waves.mp4 --output runs/generated.mp4

Class-conditional hybrid (UCF-101-style models), optionally with classifier-free guidance::

    python launchers/generate.py --checkpoint CKPT --tokenizer TOK --class-name bikes --class-name dogs \
        --num-samples 4 --cfg-scale 2.0 --output runs/classes.mp4

Text-conditional hybrid models (UCF-101 as in the NBP paper) take a class name and the text tokenizer file
the shards were made with (the tokenization job's ``--text-tokenizer``; the name becomes the ids of its text,
"ApplyEyeMakeup" -> "apply eye makeup", data_prep.text_ids)::

    python launchers/generate.py --checkpoint CKPT --tokenizer TOK --class-name ApplyEyeMakeup \
        --text-tokenizer llama/tokenizer.model --output runs/apply_eye_makeup.mp4

or raw ids, ``--text-ids 12,845,9``; several prompts as repeated flags or ``;``-separated rows
(``--text-ids "12,845,9;7,3"``).
Outputs: OUT.mp4 for one prompt and sample; OUT_0.mp4, OUT_1.mp4, ... for the samples of one prompt;
OUT_p0.mp4, OUT_p1.mp4, ... (OUT_p0_0.mp4, OUT_p0_1.mp4, ... with several samples) for several prompts.
Sampling defaults are the paper's: top-k 16000, top-p 0.9, temperature 1 (``--top-k 0 --top-p 1``
disable the filters, ``--temperature 0`` is greedy). ``--dtype`` defaults to bf16 on a GPU, fp32 on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nbp-generate`` (sampling flags shared with ``nbp-evaluate``)."""
    from megatron_nbp.inference.dtypes import add_dtype_arg
    from megatron_nbp.inference.sampling import add_sampling_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="converted model directory (config.json + model.safetensors)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors)")
    parser.add_argument("--prompt-video", action="append",
                        help="frame prediction: real video whose first frames condition generation "
                             "(repeat for a batch)")
    parser.add_argument("--class-name", action="append",
                        help="class-conditional models: one of the model's condition_labels; text-conditional "
                             "models with --text-tokenizer: a class name made text (repeat for a batch)")
    parser.add_argument("--text-tokenizer",
                        help="text-conditional models: the text tokenizer file the shards were made with "
                             "(SentencePiece .model or tokenizer.json), to take --class-name")
    parser.add_argument("--text-ids", action="append",
                        help="text-conditional models: comma-separated text token ids (repeat, or separate rows "
                             "with ';', for a batch)")
    parser.add_argument("--output", required=True,
                        help="output .mp4 (several samples: OUT_0.mp4, ...; several prompts: OUT_p0.mp4, ...)")
    parser.add_argument("--contact-sheet", help="PNG of real / reconstruction / generated frames (default: OUTPUT.png)")
    parser.add_argument("--start-frame", type=int, default=0)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--condition-frames", type=int, help="latent frames given (default: the model's)")
    parser.add_argument("--num-samples", type=int, default=1, help="videos per prompt")
    add_sampling_args(parser)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--tensorboard-dir", help="also log each sample's frames to TensorBoard (an image series per "
                                                  "sample: SummaryWriter.add_video would need moviepy)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when CUDA is available, else cpu)")
    add_dtype_arg(parser, "dtype the model runs in (default: bf16 on CUDA, fp32 on the CPU; logits are sampled "
                          "in fp32)")
    return parser


def main(argv=None) -> None:
    """Console script ``nbp-generate``: videos from a converted checkpoint, a tokenizer and prompts."""
    from megatron_nbp.inference.sampling import sampling_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sampling = sampling_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")

    from data_prep.video_io import write_contact_sheet, write_mp4
    from megatron_nbp.device import device_plan
    from megatron_nbp.inference.dtypes import dtype_name, resolve_dtype
    from megatron_nbp.inference.pipeline import NBPPipeline, condition_pixel_frames

    try:
        device = device_plan(device=args.device).device
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as err:  # CUDA asked for where there is none, a dtype whose kernels do not run there
        parser.error(str(err))
    if args.text_tokenizer and not args.class_name:
        parser.error("--text-tokenizer turns --class-name into text ids: give --class-name")
    try:
        pipe = NBPPipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=device, dtype=dtype,
                                           text_tokenizer=args.text_tokenizer)
    except (ValueError, FileNotFoundError) as err:  # e.g. a text tokenizer file sentencepiece cannot read
        parser.error(str(err))
    cfg = pipe.config
    output = Path(args.output)
    sheet = Path(args.contact_sheet) if args.contact_sheet else output.with_suffix(".png")
    if cfg.token_layout.conditional:         # class or text condition (hybrid)
        prompts, labels = _prompts(parser, args, cfg)
        _condition(parser, args, cfg, pipe.text_tokenizer)   # usage errors (unknown class, bad ids) first
        out = pipe(**prompts, num_samples=args.num_samples, seeds=args.seed, sampling=sampling, progress=True)
        paths = sample_paths(output, len(labels), args.num_samples)
        rows = list(out.videos)
        row_labels = [f"{labels[p]} #{s}" for p, s in zip(out.prompt_index, out.sample_index)]
    else:
        if not args.prompt_video:
            parser.error("a frame-prediction model needs --prompt-video")
        if args.class_name or args.text_ids:
            parser.error("a frame-prediction model takes --prompt-video, not --class-name / --text-ids")
        clips = [pipe.load_prompt_video(v, args.start_frame, args.frame_stride) for v in args.prompt_video]
        out = pipe(prompt_videos=clips, num_samples=args.num_samples, seeds=args.seed, sampling=sampling,
                   condition_frames=args.condition_frames, return_reconstructions=True, progress=True)
        labels = [Path(v).name for v in args.prompt_video]
        paths = sample_paths(output, len(labels), args.num_samples)
        rows, row_labels = [], []
        for p, label in enumerate(labels):
            rows += [clips[p], out.reconstructions[p], *out.videos_of(p)]
            row_labels += [f"{label} real", f"{label} tokenizer recon"] + [f"{label} generated {s}"
                                                                             for s in range(args.num_samples)]
        c = args.condition_frames or cfg.condition_frames
        print(f"> condition: {condition_pixel_frames(c)} frames ({c} latent frames) of each prompt video; "
              f"generated {pipe.geometry.num_frames - condition_pixel_frames(c)} frames per sample", flush=True)
    for video, path in zip(out.videos, paths):
        write_mp4(video, path, fps=args.fps)
    write_contact_sheet(rows, sheet, row_labels=row_labels)
    _tensorboard(args.tensorboard_dir, out.videos, "; ".join(labels))
    print(f"> {len(labels)} prompt(s) x {args.num_samples} sample(s) in one batch, {dtype_name(pipe.dtype)} on "
          f"{pipe.device}: {out.steps} forward passes (block size {cfg.block_size}) for {out.generated_tokens} "
          f"tokens in {out.generate_seconds:.2f} s ({out.generated_tokens / out.generate_seconds:.0f} tokens/s; prefill "
          f"{out.prefill_seconds:.2f} s, tokenizer decode {out.decode_seconds:.2f} s)", flush=True)
    for label, p, s, path in zip([labels[p] for p in out.prompt_index], out.prompt_index, out.sample_index, paths):
        print(f">   prompt {p} ({label}) sample {s} -> {path}", flush=True)
    print(f"> wrote {len(paths)} video(s) and {sheet}", flush=True)


def sample_paths(output: Path, num_prompts: int, num_samples: int) -> list[Path]:
    """Output file of each row (prompt-major, as NBPPipeline's): OUT.mp4 for one prompt and sample;
    OUT_0.mp4, OUT_1.mp4, ... for one prompt's samples; OUT_p0.mp4, ... for one sample of several prompts;
    OUT_p0_0.mp4, OUT_p0_1.mp4, ... otherwise (numbers zero-padded to a common width)."""
    output = Path(output)
    pw, sw = len(str(num_prompts - 1)), len(str(num_samples - 1))

    def name(p: int, s: int) -> Path:
        parts = ([f"p{p:0{pw}d}"] if num_prompts > 1 else []) + ([f"{s:0{sw}d}"] if num_samples > 1 else [])
        return output.with_name("_".join([output.stem, *parts]) + output.suffix) if parts else output
    return [name(p, s) for p in range(num_prompts) for s in range(num_samples)]


def _tensorboard(logdir, videos, what: str) -> None:
    """Log the frames of every sample (uint8 [T, H, W, 3]) as TensorBoard images, one tag per sample."""
    if not logdir:
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(logdir) as writer:
        for i, video in enumerate(videos):
            writer.add_images(f"generated/{i}", video, dataformats="NHWC")
        writer.add_text("generated/condition", what)


def _prompts(parser, args, cfg) -> tuple[dict, list[str]]:
    """The pipeline keywords of the condition flags (``class_names`` or ``text_ids``: one entry per prompt; a
    ``--text-ids`` value holds one row or several separated by ';') and a label per prompt."""
    layout = cfg.token_layout
    if args.prompt_video:
        parser.error("a conditional model takes --class-name / --text-ids, not --prompt-video")
    if args.text_tokenizer and layout.condition_key != "text_ids":
        parser.error(f"--text-tokenizer is for text-conditional models; this one is {layout.condition_type}-conditional")
    if layout.condition_key == "text_ids" and args.class_name and not args.text_ids:
        if not args.text_tokenizer:
            parser.error("a text-conditional model takes --class-name with --text-tokenizer (the text tokenizer "
                         "file the shards were made with), or --text-ids")
        return {"class_names": list(args.class_name)}, [f"text of {c!r}" for c in args.class_name]
    if layout.condition_key == "text_ids":
        if not args.text_ids:
            parser.error("a text-conditional model needs --text-ids, or --class-name with --text-tokenizer")
        rows = [row for value in args.text_ids for row in value.split(";") if row.strip()]
        try:
            texts = [[int(x) for x in row.split(",") if x.strip()] for row in rows]
        except ValueError:
            parser.error(f"--text-ids must be comma-separated integers (rows separated by ';'), got {args.text_ids!r}")
        return {"text_ids": texts}, [f"text {t[:layout.num_condition_tokens]}" for t in texts]
    if not args.class_name:
        parser.error("a class-conditional model needs --class-name")
    return {"class_names": list(args.class_name)}, [f"class {c!r}" for c in args.class_name]


def _condition(parser, args, cfg, text_tokenizer=None):
    """(condition ids [prompts x num_samples, P], padding [same] or None, a label per prompt) of the flags,
    as the pipeline builds them (megatron_nbp.inference.pipeline.condition_batch: the model's token layout
    turns a class name or text ids into condition ids, text padded / truncated to P); a bad prompt is a
    usage error."""
    from megatron_nbp.inference.pipeline import condition_batch

    prompts, labels = _prompts(parser, args, cfg)
    try:
        condition, padding = condition_batch(cfg, num_samples=args.num_samples, text_tokenizer=text_tokenizer,
                                             **prompts)
    except ValueError as err:
        parser.error(f"{'--text-ids' if 'text_ids' in prompts else '--class-name'}: {err}")
    return condition, padding, labels[0] if len(labels) == 1 else "; ".join(labels)


if __name__ == "__main__":
    main()
