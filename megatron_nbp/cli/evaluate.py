"""nbp-evaluate: FVD of a converted NBP model under the paper's two protocols, ``ucf101``
(class-conditional, against training clips) and ``k600`` (5-frame prediction at 64x64); the protocols
themselves are megatron_nbp.eval.protocols, the protocol details and figures docs/evaluation.md.

    python launchers/evaluate.py ucf101 --checkpoint runs/ucf_inf --tokenizer runs/tok.safetensors \
        --data-dir data/ucf101_tokens --video-root /data/UCF-101 --num-samples 10000 --top-k 16000 --top-p 0.9
    torchrun --nproc-per-node 8 launchers/evaluate.py k600 --checkpoint runs/k600_inf \
        --tokenizer runs/tok.safetensors --data-dir data/k600_val_tokens --video-root /data/k600/val \
        --num-samples 50000 --num-folds 5 --top-k 16000 --top-p 0.9

Under torchrun every rank takes samples i with i % world_size == rank and the features are gathered
on rank 0, which prints the FVD (mean +- std over --num-folds folds of the generated set) and writes
--output JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path


from megatron_nbp.eval.protocols import iter_samples, real_clip_loader, run_protocol, summarize
from megatron_nbp.inference.dtypes import add_dtype_arg, dtype_name, resolve_dtype
from megatron_nbp.inference.sampling import add_sampling_args, sampling_from_args


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nbp-evaluate`` (sampling flags shared with ``nbp-generate``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["ucf101", "k600"])
    p.add_argument("--checkpoint", required=True, help="converted model directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors)")
    p.add_argument("--data-dir", required=True,
                   help="token shards (+ manifest.json): UCF-101 training clips / K600 validation clips")
    p.add_argument("--video-root", required=True, help="folder the shards' 'source' paths are relative to")
    p.add_argument("--num-samples", type=int, help="generated (= real) clips; default 10000 (ucf101) / 50000 (k600)")
    p.add_argument("--num-folds", type=int, default=1, help="FVD over this many disjoint folds of the samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--condition-frames", type=int, help="k600: latent frames given (default: the model's, 2 = 5 frames)")
    p.add_argument("--eval-resolution", type=int, help="resize clips first (default: 64 for k600, none for ucf101)")
    add_sampling_args(p)
    p.add_argument("--i3d-cache", help="download cache for the I3D weights (default ~/.cache/megatron-nbp)")
    p.add_argument("--output", help="write the result JSON here (rank 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is available)")
    p.add_argument("--distributed-timeout-minutes", type=float, default=120,
                   help="how long a rank waits for the others at the final gather (ranks finish their share of "
                        "the samples at different times; Megatron-LM's flag, default here 120)")
    add_dtype_arg(p, "dtype the model runs in (default: bf16 on CUDA, fp32 on the CPU; logits are sampled in fp32)")
    return p


def main(argv=None) -> None:
    """Console script ``nbp-evaluate``: run :func:`evaluate` (exit status 0; errors exit non-zero)."""
    evaluate(argv)


def evaluate(argv=None) -> dict | None:
    """Generate, extract I3D features of generated and real clips, and compute FVD for one protocol.

    Returns:
        On rank 0 the result dict (fvd, fvd_std, counts, settings, seconds), also written to ``--output``;
        None on other ranks.
    """
    p = build_parser()
    args = p.parse_args(argv)
    try:
        sampling = sampling_from_args(args)
    except ValueError as err:
        p.error(str(err))
    num_samples = args.num_samples or (10000 if args.protocol == "ucf101" else 50000)
    eval_res = args.eval_resolution if args.eval_resolution is not None else (64 if args.protocol == "k600" else None)

    from megatron_nbp.device import activate, device_plan

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    plan = device_plan(device=args.device)
    activate(plan)
    device = plan.device
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(plan.distributed_backend,
                                timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))

    from megatron_nbp.eval.fvd import i3d_features
    from megatron_nbp.eval.weights import load_i3d
    from megatron_nbp.inference.pipeline import NBPPipeline
    from tqdm import tqdm

    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as err:  # a dtype whose kernels do not run on the device
        p.error(str(err))
    pipe = NBPPipeline.from_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=device, dtype=dtype)
    i3d = load_i3d(args.i3d_cache, device)
    geometry = pipe.geometry
    bar = tqdm(total=len(range(rank, num_samples, world)), desc=f"{args.protocol} rank {rank}", unit="clip",
               disable=rank != 0)
    start = time.perf_counter()
    real, fake = run_protocol(
        args.protocol, pipe, iter_samples(args.data_dir, num_samples, rank, world),
        real_clip_loader(args.video_root, geometry), lambda clips: i3d_features(i3d, clips, args.batch_size),
        sampling, args.batch_size, args.seed, args.condition_frames, eval_res, progress=bar.update)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        from megatron_nbp.eval.protocols import merge_rank_features

        gathered = [None] * world
        dist.all_gather_object(gathered, (real, fake))
        real = merge_rank_features([g[0] for g in gathered])  # global sample order: folds independent of W
        fake = merge_rank_features([g[1] for g in gathered])
    result = None
    if rank == 0:
        result = summarize(real, fake, args.num_folds)
        result.update(protocol=args.protocol, checkpoint=str(args.checkpoint), eval_resolution=eval_res,
                      top_k=sampling.top_k, top_p=sampling.top_p, cfg_scale=sampling.cfg_scale, seed=args.seed,
                      dtype=dtype_name(pipe.dtype),
                      seconds=time.perf_counter() - start)
        print(f"> {args.protocol}: FVD {result['fvd']:.2f} +- {result['fvd_std']:.2f} over {args.num_folds} fold(s) "
              f"of {len(fake) // args.num_folds} generated vs {len(real)} real clips", flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(result, indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
