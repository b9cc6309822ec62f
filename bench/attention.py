#!/usr/bin/env python
"""Block-causal attention: fused FlexAttention vs dense-mask SDPA vs plain causal SDPA.

Forward + backward time and peak memory for one attention call at a given shape, printed as a table.

    python bench/attention.py                        # CPU, small shape (forward only for flex: see below)
    python bench/attention.py --paper-shape          # nbp-xl: 16 heads x 96, seq 1264 (K600, L=16)

On GPU, flex is compiled (the fused kernel) and peak memory is torch.cuda.max_memory_allocated over the
call; on CPU, flex runs eagerly and forward only (torch 2.13 refuses CPU backward), and the memory
column is the bytes of the mask object (dense S x S bool vs BlockMask) since CPU allocations are not
tracked per call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_nbp.layouts import frame_prediction_block_ids  # noqa: E402
from megatron_nbp.masks import block_causal_allowed, block_causal_block_mask  # noqa: E402


def mask_bytes(mask) -> int:
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    tensors = [t for t in vars(mask).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_kernel(name, q, k, v, dense_allowed, block_mask, backward):
    from torch.nn.attention.flex_attention import flex_attention

    if not backward:
        q, k, v = q.detach(), k.detach(), v.detach()
    if name == "flex (fused)":
        fn = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
        out = fn(q, k, v, block_mask=block_mask)
    elif name == "dense mask SDPA":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_allowed)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backward:
        out.float().square().mean().backward()
    return out


def bench(name, q, k, v, dense_allowed, block_mask, backward, repeats):
    for t in (q, k, v):
        t.grad = None
    run_kernel(name, q, k, v, dense_allowed, block_mask, backward)  # warm-up / compile
    if q.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(repeats):
        for t in (q, k, v):
            t.grad = None
        run_kernel(name, q, k, v, dense_allowed, block_mask, backward)
    if q.is_cuda:
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / repeats
    if q.is_cuda:
        memory = torch.cuda.max_memory_allocated() - base
    else:
        memory = {"flex (fused)": mask_bytes(block_mask), "dense mask SDPA": mask_bytes(dense_allowed)}.get(name, 0)
    return ms, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-shape", action="store_true", help="16 heads x 96, seq 1264, batch 4 (nbp-xl, K600)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--block", type=int, default=16, help="NBP block size L")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    batch, heads, head_dim, seq = (4, 16, 96, 1264) if args.paper_shape else (1, 4, 64, 512)
    batch, heads = args.batch or batch, args.heads or heads
    head_dim, seq = args.head_dim or head_dim, args.seq or seq
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    device = "cuda" if cuda else "cpu"
    ids = frame_prediction_block_ids(seq, args.block).to(device)
    dense_allowed = block_causal_allowed(ids).view(1, 1, seq, seq)
    block_mask = block_causal_block_mask(ids.unsqueeze(0), device=device)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} | batch {batch} | heads {heads} | "
          f"head dim {head_dim} | seq {seq} | block {args.block} | {dtype} | torch {torch.__version__} | "
          f"BlockMask sparsity {block_mask.sparsity():.1f}%")
    print(f"| kernel | fwd ms | fwd+bwd ms | {'peak MiB' if cuda else 'mask KiB'} |")
    print("|---|---|---|---|")
    for name in ("flex (fused)", "dense mask SDPA", "causal SDPA (not block-causal)"):
        fwd, mem = bench(name, q, k, v, dense_allowed, block_mask, False, args.repeats)
        if name == "flex (fused)" and not cuda:
            both = "n/a (CPU)"
        else:
            both_ms, mem = bench(name, q, k, v, dense_allowed, block_mask, True, args.repeats)
            both = f"{both_ms:.2f}"
        size = f"{mem / 2**20:.1f}" if cuda else f"{mem / 2**10:.1f}"
        print(f"| {name} | {fwd:.2f} | {both} | {size} |")


if __name__ == "__main__":
    main()
