"""Convert a training checkpoint (megatron backend: any TP/PP layout; DeepSpeed backend: any ZeRO stage
and TP) into one safetensors file + config.json.

    python launchers/convert_checkpoint.py --load runs/ckpt --output runs/nbp_inference
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="training checkpoint directory")
    parser.add_argument("--output", required=True, help="directory for model.safetensors + config.json")
    parser.add_argument("--iteration", type=int, help="iteration to convert (iter_XXXXXXX or global_stepN; default: latest)")
    args = parser.parse_args(argv)
    from megatron_nbp.inference.convert import convert_checkpoint

    start = time.perf_counter()
    out = convert_checkpoint(args.load, args.output, args.iteration)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"> converted {args.load} -> {out}/model.safetensors ({size:.1f} MiB) + config.json "
          f"in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
