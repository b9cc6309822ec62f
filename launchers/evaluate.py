#!/usr/bin/env python
"""FVD evaluation of a converted NBP model under the paper's two protocols (see docs/evaluation.md).

ucf101 (class-conditional): real distribution = training clips (token-shard metadata -> the source
    video's pixels at the model geometry); for every real clip one video is generated from its class
    label (hybrid layout); FVD between the generated and the real clips (first 16 of 17 frames, 224).
k600 (frame prediction): real clips = validation clips; the first ``c`` latent frames (c = 2: 5 pixel
    frames) of each clip's tokens condition generation of the rest; real and generated clips are
    resized to 64x64 (the evaluation resolution of the paper / MAGVIT) before the I3D's 224 resize.

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
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: Per-sample record of the real data: (token clip uint16 [T', H', W'], metadata dict from the shard).
Sample = tuple[np.ndarray, dict]


def iter_samples(data_dir: str | Path, num_samples: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, Sample]]:
    """(global index, sample) for this rank's share of the first ``num_samples`` samples of the token
    shards in manifest order, cycling over the data set if it is smaller (as the NBP release does).

    Raises:
        ValueError: the data set is empty.
    """
    from data_prep.shards import iter_shard, read_manifest

    manifest = read_manifest(data_dir)
    if manifest["num_samples"] == 0:
        raise ValueError(f"no samples in {data_dir}")
    shards = [Path(data_dir) / s["name"] for s in manifest["shards"] if s["num_samples"] > 0]

    def one_pass():
        for shard in shards:
            for _key, tokens, meta in iter_shard(shard):
                yield tokens, meta

    for index, sample in enumerate(itertools.islice(itertools.chain.from_iterable(
            one_pass() for _ in itertools.count()), num_samples)):
        if index % world_size == rank:
            yield index, sample


def real_clip_loader(video_root: str | Path, geometry) -> Callable[[dict], np.ndarray]:
    """Function meta -> uint8 [T, H, W, 3] real clip: the shard's source video decoded at the clip's
    start/stride and resized/center-cropped to the model geometry (as the tokenization job did)."""
    from data_prep.video_io import load_clip

    root = Path(video_root)

    def load(meta: dict) -> np.ndarray:
        source = Path(meta["source"])
        path = source if source.is_absolute() else root / source
        return load_clip(path, geometry.num_frames, (geometry.height, geometry.width),
                         int(meta["clip_start"]), int(meta["frame_stride"]))
    return load


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


@torch.no_grad()
def run_protocol(protocol: str, model, tokenizer, samples: Iterator[tuple[int, Sample]],
                 load_real: Callable[[dict], np.ndarray], features: Callable[[np.ndarray], torch.Tensor],
                 sampling, batch_size: int = 8, seed: int = 0, condition_frames: int | None = None,
                 eval_resolution: int | None = None, num_frames: int = 16,
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate and featurize one rank's samples.

    Args:
        protocol: "ucf101" (class-conditional, ``generate_hybrid``) or "k600" (frame prediction,
            ``generate_frame_prediction`` from the first ``condition_frames`` latent frames).
        model: converted NBP model (megatron_nbp.inference.model.NBPDecoder).
        tokenizer: video tokenizer with ``decode(int64 [B, T', H', W']) -> float [B, 3, T, H, W]`` in [-1, 1].
        samples: (global index, (tokens uint16 [T', H', W'], metadata)) pairs (:func:`iter_samples`).
        load_real: metadata -> uint8 [T, H, W, 3] real clip (:func:`real_clip_loader`).
        features: uint8 [B, T, H, W, 3] -> float64 [B, D] (I3D logits, ``fvd.i3d_features``).
        sampling: SamplingConfig; batch_size: clips per generation call; seed: per-batch generator seed
            is ``seed + first global index`` (results do not depend on the number of ranks).
        eval_resolution: resize real and generated clips to this square size first (64 for K600).
        num_frames: frames per clip fed to I3D (the first 16).
    Returns:
        (real features float64 [n, D], generated features float64 [n, D]) for this rank's n samples.
    Raises:
        ValueError: unknown protocol, or a UCF label that is not one of the model's condition labels.
    """
    from data_prep.video_io import tensor_to_frames
    from megatron_nbp.eval.fvd import resize_clips
    from megatron_nbp.inference import generate as gen

    cfg = model.config
    t, h, w = cfg.latent_shape
    device = next(tokenizer.parameters()).device  # model and tokenizer share the device (main)
    if protocol == "ucf101":
        labels = {name: i for i, name in enumerate(cfg.condition_labels or [])}
    elif protocol == "k600":
        c = condition_frames or cfg.condition_frames
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    real_feats, fake_feats = [], []
    for batch in _batched(iter(samples), batch_size):
        first = batch[0][0]
        generator = torch.Generator(device=device).manual_seed(seed + first)
        if protocol == "ucf101":
            missing = [m.get("label") for _, (_, m) in batch if m.get("label") not in labels]
            if missing:
                raise ValueError(f"labels {missing} are not among the model's condition_labels")
            cond = torch.tensor([[labels[m["label"]]] for _, (_, m) in batch], dtype=torch.long)
            result = gen.generate_hybrid(model, cond, None, sampling, generator)
        else:
            prompt = torch.from_numpy(np.stack([tok.astype(np.int64).reshape(-1) for _, (tok, _) in batch]))
            result = gen.generate_frame_prediction(model, prompt[:, : c * h * w], sampling, generator)
        video = tokenizer.decode(result.tokens.view(-1, t, h, w).to(device))
        fake = np.stack([tensor_to_frames(v) for v in video.cpu()])[:, :num_frames]
        real = np.stack([load_real(meta) for _, (_, meta) in batch])[:, :num_frames]
        if eval_resolution:
            fake, real = resize_clips(fake, eval_resolution), resize_clips(real, eval_resolution)
        real_feats.append(features(real))
        fake_feats.append(features(fake))
        if progress:
            progress(len(batch))
    if not real_feats:
        return torch.zeros(0, 400, dtype=torch.float64), torch.zeros(0, 400, dtype=torch.float64)
    return torch.cat(real_feats), torch.cat(fake_feats)


def summarize(real: torch.Tensor, fake: torch.Tensor, num_folds: int) -> dict:
    """FVD per fold of the generated set against all real features; mean and (population) std."""
    from megatron_nbp.eval.fvd import fvd_folds

    folds = fvd_folds(fake, real, num_folds)
    return {"fvd": float(np.mean(folds)), "fvd_std": float(np.std(folds)), "folds": folds,
            "num_real": len(real), "num_generated": len(fake)}


def main(argv=None) -> dict | None:
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
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=16000)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--i3d-cache", help="download cache for the I3D weights (default ~/.cache/megatron-nbp)")
    p.add_argument("--output", help="write the result JSON here (rank 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is available)")
    args = p.parse_args(argv)
    num_samples = args.num_samples or (10000 if args.protocol == "ucf101" else 50000)
    eval_res = args.eval_resolution if args.eval_resolution is not None else (64 if args.protocol == "k600" else None)

    from megatron_nbp.device import activate, device_plan

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    plan = device_plan(device=args.device)
    activate(plan)
    device = plan.device
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(plan.distributed_backend)

    from data_prep.tokenizer import load_tokenizer
    from megatron_nbp.eval.fvd import i3d_features
    from megatron_nbp.eval.weights import load_i3d
    from megatron_nbp.inference.generate import SamplingConfig
    from megatron_nbp.inference.model import load_inference_model
    from megatron_nbp.inference.video import clip_geometry
    from tqdm import tqdm

    model = load_inference_model(args.checkpoint, device)
    tokenizer = load_tokenizer(args.tokenizer, device=device)
    i3d = load_i3d(args.i3d_cache, device)
    geometry = clip_geometry(model, tokenizer)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale)
    bar = tqdm(total=len(range(rank, num_samples, world)), desc=f"{args.protocol} rank {rank}", unit="clip",
               disable=rank != 0)
    start = time.perf_counter()
    real, fake = run_protocol(
        args.protocol, model, tokenizer, iter_samples(args.data_dir, num_samples, rank, world),
        real_clip_loader(args.video_root, geometry), lambda clips: i3d_features(i3d, clips, args.batch_size),
        sampling, args.batch_size, args.seed, args.condition_frames, eval_res, progress=bar.update)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (real, fake))
        real = torch.cat([g[0] for g in gathered])
        fake = torch.cat([g[1] for g in gathered])
    result = None
    if rank == 0:
        result = summarize(real, fake, args.num_folds)
        result.update(protocol=args.protocol, checkpoint=str(args.checkpoint), eval_resolution=eval_res,
                      top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale, seed=args.seed,
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
