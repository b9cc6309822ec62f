#!/usr/bin/env python
"""Tokenizer training memory per GPU: activations stored for the backward pass per clip, with and without
``--recompute-granularity full``, and the fp32 training states, for tokenizer layouts at a clip size.

Nothing is allocated: the tokenizer runs forward on fake tensors (``torch._subclasses.FakeTensorMode``)
under bf16 autocast, and every tensor autograd saves is counted once (``saved_tensors_hooks``). CPU autocast
keeps GroupNorm in bf16 while CUDA autocast runs it in fp32 (larger saved tensors); ``--device-policy cuda``
(default) counts GroupNorm as CUDA does. Not counted: the 3D PatchGAN discriminator and the perceptual
network (their activations come on top, also per clip), the recomputed block's own activations during its
backward (one block at a time), allocator fragmentation and the CUDA context.

Usage:
    python bench/tokenizer_memory.py [--configs configs/tokenizer/magvit2.yaml,...] [--num-frames 17]
        [--resolution 128] [--device-policy cuda|cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30
STATE_BYTES_PER_PARAM = 20  # fp32: weights 4 + gradients 4 + Adam moments 8 + EMA weights 4


def saved_bytes_per_clip(config, num_frames: int, resolution: int, recompute: str | None, cuda_policy: bool) -> int:
    """Bytes autograd keeps for the backward pass of one clip through the tokenizer (bf16 autocast)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from data_prep.tokenizer import VideoTokenizer
    from data_prep.tokenizer import layers

    group_norm = F.group_norm  # layers.F is torch.nn.functional itself: patched there, restored below
    if cuda_policy:  # CUDA autocast casts GroupNorm's input to fp32 (its output stays fp32)
        layers.F.group_norm = lambda x, *args, **kwargs: group_norm(x.float(), *args, **kwargs)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = VideoTokenizer(config)
            model.set_recompute(recompute)
            video = torch.empty(1, config.in_channels, num_frames, resolution, resolution)
            saved: dict[int, int] = {}

            def pack(tensor):
                saved[id(tensor)] = tensor.numel() * tensor.element_size()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                    model(video)
            return sum(saved.values())
    finally:
        layers.F.group_norm = group_norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/tokenizer/magvit2.yaml,configs/tokenizer/magvit2_official.yaml")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--device-policy", choices=("cuda", "cpu"), default="cuda",
                   help="whose autocast rules GroupNorm follows (CUDA: fp32, CPU: bf16)")
    args = p.parse_args()

    from data_prep.tokenizer import TokenizerConfig, VideoTokenizer

    print(f"# tokenizer training memory | clips {args.num_frames}x{args.resolution}x{args.resolution} | bf16 "
          f"autocast, GroupNorm as on {args.device_policy} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    print("| config | parameters | fp32 states (GiB) | recompute | stored activations per clip (GiB) |\n"
          "|---|---|---|---|---|")
    for path in args.configs.split(","):
        config = TokenizerConfig.from_yaml(REPO / path if not Path(path).is_absolute() else path)
        with torch.device("meta"):
            params = sum(p.numel() for p in VideoTokenizer(config).parameters())
        for recompute in (None, "full"):
            per_clip = saved_bytes_per_clip(config, args.num_frames, args.resolution, recompute,
                                            args.device_policy == "cuda")
            print(f"| {path} | {params / 1e6:.1f}M | {params * STATE_BYTES_PER_PARAM / GIB:.1f} | "
                  f"{recompute or 'none'} | {per_clip / GIB:.2f} |", flush=True)


if __name__ == "__main__":
    main()
