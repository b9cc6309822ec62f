"""The paper's two FVD protocols on a converted NBP model (docs/evaluation.md): the data they read, the
generation they run and the I3D features they collect. ``megatron_nbp.cli.evaluate`` (nbp-evaluate) is
the command line around them.

ucf101 (class-conditional): real distribution = training clips (token-shard metadata -> the source
    video's pixels at the model geometry); for every real clip one video is generated from its class
    label (hybrid layout), or, for a text-conditional model (the paper's), from its class name's
    ``text_ids`` (the tokenization job's ``--text-tokenizer``); FVD between the generated and the real
    clips (first 16 of 17 frames, 224).
k600 (frame prediction): real clips = validation clips; the first ``c`` latent frames (c = 2: 5 pixel
    frames) of each clip's tokens condition generation of the rest; real and generated clips are
    resized to 64x64 (the evaluation resolution of the paper / MAGVIT) before the I3D's 224 resize.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

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


def _generate_from_text_ids(pipe, metas: list[dict], sampling, seeds: list[int]):
    """Generate one clip per shard sample from its ``text_ids``, padded as the training batches were.

    Raises:
        ValueError: a sample without ``text_ids`` (shards tokenized without ``--text-tokenizer``).
    """
    missing = [m.get("source") for m in metas if not isinstance(m.get("text_ids"), list)]
    if missing:
        raise ValueError(f"clips {missing[:3]} carry no text_ids; a text-conditional model needs shards made with "
                         f"--label-from-dir --text-tokenizer")
    condition, padding = pipe.config.token_layout.condition_batch([m["text_ids"] for m in metas])
    return pipe.generate_conditional(condition, padding if bool(padding.any()) else None, sampling, seeds)


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


@torch.no_grad()
def run_protocol(protocol: str, pipe, samples: Iterator[tuple[int, Sample]],
                 load_real: Callable[[dict], np.ndarray], features: Callable[[np.ndarray], torch.Tensor],
                 sampling, batch_size: int = 8, seed: int = 0, condition_frames: int | None = None,
                 eval_resolution: int | None = None, num_frames: int = 16,
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate and featurize one rank's samples.

    Args:
        protocol: "ucf101" (class-conditional, ``NBPPipeline.generate_conditional``) or "k600" (frame
            prediction, ``NBPPipeline.generate_frame_prediction`` from the first ``condition_frames``
            latent frames of each clip's tokens).
        pipe: the converted model and its tokenizer (megatron_nbp.inference.pipeline.NBPPipeline:
            ``config``, the two generate methods, ``decode`` of tokens to uint8 frames).
        samples: (global index, (tokens uint16 [T', H', W'], metadata)) pairs (:func:`iter_samples`).
        load_real: metadata -> uint8 [T, H, W, 3] real clip (:func:`real_clip_loader`).
        features: uint8 [B, T, H, W, 3] -> float64 [B, D] (I3D logits, ``fvd.i3d_features``).
        sampling: SamplingConfig; batch_size: clips per generation call; seed: the sample of global index
            i is generated with seed ``seed + i`` (the pipeline's per-row seeds; results do not depend on
            the number of ranks).
        eval_resolution: resize real and generated clips to this square size first (64 for K600).
        num_frames: frames per clip fed to I3D (the first 16).
    Returns:
        (real features float64 [n, D], generated features float64 [n, D]) for this rank's n samples.
    Raises:
        ValueError: unknown protocol, a UCF label that is not one of the model's condition labels, or (text
            models) a clip without ``text_ids``.
    """
    from megatron_nbp.eval.fvd import resize_clips

    cfg = pipe.config
    _, h, w = cfg.latent_shape
    if protocol == "ucf101":
        labels = {name: i for i, name in enumerate(cfg.condition_labels or [])}
    elif protocol == "k600":
        c = condition_frames or cfg.condition_frames
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    real_feats, fake_feats = [], []
    for batch in _batched(iter(samples), batch_size):
        seeds = [seed + index for index, _ in batch]
        if protocol == "ucf101" and getattr(cfg, "condition_type", "class") == "text":
            result = _generate_from_text_ids(pipe, [m for _, (_, m) in batch], sampling, seeds)
        elif protocol == "ucf101":
            missing = [m.get("label") for _, (_, m) in batch if m.get("label") not in labels]
            if missing:
                raise ValueError(f"labels {missing} are not among the model's condition_labels")
            cond = torch.tensor([[labels[m["label"]]] for _, (_, m) in batch], dtype=torch.long)
            result = pipe.generate_conditional(cond, None, sampling, seeds)
        else:
            prompt = torch.from_numpy(np.stack([tok.astype(np.int64).reshape(-1) for _, (tok, _) in batch]))
            result = pipe.generate_frame_prediction(prompt[:, : c * h * w], sampling, seeds)
        fake = pipe.decode(result.tokens)[:, :num_frames]
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


def merge_rank_features(parts: list[torch.Tensor]) -> torch.Tensor:
    """Features gathered from ``W = len(parts)`` ranks back in global sample order.

    Rank r featurizes global samples r, r + W, r + 2W, ... (:func:`iter_samples`), so concatenating the
    parts rank by rank would put the samples in an order that depends on W, and with it the contiguous folds
    of :func:`summarize` (and the FVD mean and std over them).

    Args:
        parts: rank r's features ``[n_r, D]`` (any dtype), rows in its sample order; n_r = the number of
            indices r, r + W, ... below the total.

    Returns:
        ``[sum n_r, D]``: row i is global sample i.

    Raises:
        ValueError: row counts that no round-robin split of one total gives.
    """
    world, total = len(parts), sum(len(part) for part in parts)
    expected = [len(range(r, total, world)) for r in range(world)]
    if [len(part) for part in parts] != expected:
        raise ValueError(f"rows per rank {[len(part) for part in parts]} are not a round-robin split of {total} "
                         f"samples over {world} ranks ({expected})")
    merged = parts[0].new_empty((total, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        merged[rank::world] = part
    return merged


def summarize(real: torch.Tensor, fake: torch.Tensor, num_folds: int) -> dict:
    """FVD per fold of the generated set against all real features; mean and (population) std."""
    from megatron_nbp.eval.fvd import fvd_folds

    folds = fvd_folds(fake, real, num_folds)
    return {"fvd": float(np.mean(folds)), "fvd_std": float(np.std(folds)), "folds": folds,
            "num_real": len(real), "num_generated": len(fake)}
