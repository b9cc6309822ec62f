"""Convert a training checkpoint (megatron backend: any TP/PP layout; DeepSpeed backend: any ZeRO stage
and TP) into the single-device inference format: model.safetensors (or shards + an index past
--max-shard-size) + config.json, in the dtype of --dtype.

    python launchers/convert_checkpoint.py --load runs/ckpt --output runs/nbp_inference
    python launchers/convert_checkpoint.py --load runs/ckpt --output runs/nbp_bf16 --dtype bf16 --max-shard-size 2GB
"""

from __future__ import annotations

import argparse
import time


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nbp-convert``."""
    from megatron_nbp.inference.dtypes import add_dtype_arg
    from megatron_nbp.inference.weight_files import DEFAULT_MAX_SHARD_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="training checkpoint directory")
    parser.add_argument("--output", required=True, help="directory for model.safetensors + config.json")
    parser.add_argument("--iteration", type=int, help="iteration to convert (iter_XXXXXXX or global_stepN; default: latest)")
    add_dtype_arg(parser, "dtype of the written weights (default: fp32, the trained weights unchanged; bf16 halves "
                          "the size and is what generation runs in on a GPU)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="bytes per weights file, e.g. 5GB or 500MiB; larger models are written as "
                             f"model-0000i-of-0000N.safetensors + model.safetensors.index.json "
                             f"(default: {DEFAULT_MAX_SHARD_SIZE})")
    return parser


def main(argv=None) -> None:
    """Console script ``nbp-convert``."""
    from megatron_nbp.inference.weight_files import parse_size

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        parser.error(f"--max-shard-size: {err}")
    from megatron_nbp.inference.convert import convert_checkpoint
    from megatron_nbp.inference.weight_files import weight_file_names, weight_files_size

    start = time.perf_counter()
    out = convert_checkpoint(args.load, args.output, args.iteration, args.dtype or "fp32", args.max_shard_size)
    files = weight_file_names(out)
    size = weight_files_size(out) / 2**20
    print(f"> converted {args.load} -> {out}/{files[0] if len(files) == 1 else f'{len(files)} shards'} "
          f"({size:.1f} MiB, {args.dtype or 'fp32'}) + config.json in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
