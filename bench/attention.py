#!/usr/bin/env python
"""Block-causal attention: the project's fused FlexAttention vs dense-mask SDPA vs plain causal SDPA.

Forward and forward + backward time and peak memory of one attention call at a given shape, as a table.

    python bench/attention.py                        # CPU, small shape (forward only for flex: see below)
    python bench/attention.py --paper-shape          # nbp-xl: 16 heads x 96, seq 1264 (K600, L=16)

Flex runs exactly as training runs it: ``megatron_nbp.model.attention.flex_kernel(device)`` (compiled once per
process on CUDA) with ``flex_kernel_options`` and one BlockMask built before timing; "flex (torch
defaults)" is the same kernel without the project's kernel options. On GPU every kernel is warmed up
(compiled) first, then timed with CUDA events over ``--repeats`` calls (median); peak memory is
``torch.cuda.max_memory_allocated`` over a call. On CPU flex runs eagerly and forward only (torch
refuses CPU backward), times are wall-clock medians, and the memory column is the bytes of the mask
object (dense S x S bool vs BlockMask).
"""

from __future__ import annotations

import argparse
import statistics
import time


import torch
import torch.nn.functional as F

from megatron_nbp.layouts import frame_prediction_block_ids
from megatron_nbp.masks import block_causal_allowed, block_causal_block_mask
from megatron_nbp.model.attention import flex_kernel, flex_kernel_options

KERNELS = ("flex (fused, tuned)", "flex (torch defaults)", "dense mask SDPA", "causal SDPA (not block-causal)")


def mask_bytes(mask) -> int:
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    tensors = [t for t in vars(mask).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def call(name, q, k, v, dense_allowed, block_mask, backward):
    """One attention call (+ backward of a scalar of its output)."""
    if not backward:
        q, k, v = q.detach(), k.detach(), v.detach()
    if name.startswith("flex"):
        options = flex_kernel_options(q.shape[-1], q.dtype, q.device) if "tuned" in name else None
        out = flex_kernel(q.device)(q, k, v, block_mask=block_mask, kernel_options=options)
    elif name == "dense mask SDPA":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_allowed)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backward:
        out.float().square().mean().backward()
    return out


def bench(name, q, k, v, dense_allowed, block_mask, backward, repeats):
    """(median ms per call, memory figure): warm-up (compiles on CUDA) then ``repeats`` timed calls."""
    for t in (q, k, v):
        t.grad = None
    call(name, q, k, v, dense_allowed, block_mask, backward)
    cuda = q.is_cuda
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        for t in (q, k, v):
            t.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call(name, q, k, v, dense_allowed, block_mask, backward)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            call(name, q, k, v, dense_allowed, block_mask, backward)
            times.append(1000 * (time.perf_counter() - start))
    if cuda:
        memory = torch.cuda.max_memory_allocated() - base
    else:
        memory = mask_bytes(block_mask) if name.startswith("flex") else (
            mask_bytes(dense_allowed) if name == "dense mask SDPA" else 0)
    return statistics.median(times), memory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-shape", action="store_true", help="16 heads x 96, seq 1264, batch 4 (nbp-xl, K600)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--block", type=int, default=16, help="NBP block size L")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    batch, heads, head_dim, seq = (4, 16, 96, 1264) if args.paper_shape else (1, 4, 64, 512)
    batch, heads = args.batch or batch, args.heads or heads
    head_dim, seq = args.head_dim or head_dim, args.seq or seq
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ids = frame_prediction_block_ids(seq, args.block).to(device)
    dense_allowed = block_causal_allowed(ids).view(1, 1, seq, seq)
    block_mask = block_causal_block_mask(ids.unsqueeze(0), device=device)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} | batch {batch} | heads {heads} | "
          f"head dim {head_dim} | seq {seq} | block {args.block} | {dtype} | torch {torch.__version__} | "
          f"BlockMask sparsity {block_mask.sparsity():.1f}% | kernel options "
          f"{flex_kernel_options(head_dim, dtype, device)} | median of {args.repeats}"
          + (" (CUDA events, after one compile)" if cuda else " (wall clock)"))
    print(f"| kernel | fwd ms | fwd+bwd ms | {'peak MiB' if cuda else 'mask KiB'} | fwd+bwd vs causal SDPA |")
    print("|---|---|---|---|---|")
    rows = []
    for name in KERNELS:
        fwd, mem = bench(name, q, k, v, dense_allowed, block_mask, False, args.repeats)
        both = None
        if cuda or not name.startswith("flex"):
            both, mem = bench(name, q, k, v, dense_allowed, block_mask, True, args.repeats)
        rows.append((name, fwd, both, mem))
    causal = rows[-1][2]
    for name, fwd, both, mem in rows:
        size = f"{mem / 2**20:.1f}" if cuda else f"{mem / 2**10:.1f}"
        ratio = f"{both / causal:.2f}x" if both is not None and causal else "n/a"
        print(f"| {name} | {fwd:.3f} | {'n/a (CPU)' if both is None else f'{both:.3f}'} | {size} | {ratio} |")


if __name__ == "__main__":
    main()
