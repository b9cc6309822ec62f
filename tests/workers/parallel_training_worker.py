"""torchrun worker for tests/test_parallel_training.py: several real training iterations under TP2 x PP2
against one process (TP1 x PP1) from the same initial weights on the same data.

    reference (1 process): build the training state from the tiny test config, save its initial weights
        (megatron dist checkpoint), run ITERATIONS ``train_step`` iterations and write ``reference.pt``.
    parallel  (4 processes, TP2 x PP2, 1F1B, DP 1): load those weights, run the same iterations; every
        rank writes ``rank{R}.pt``.

Each result file holds the per-iteration (loss, grad norm, update applied, lr after the step), the
layout of the rank (TP / PP rank and size) and every parameter this rank holds after the last
iteration, as CPU fp32 tensors with the metadata needed to compare them with the single-process model:
the single-process (global) name (local layer numbers mapped to global ones), and for tensor-parallel
parameters the dimension along which megatron splits them.

The global batch (4 micro-batches of 2 clips) is different in every iteration. Gradient clipping is
active (``CLIP_GRAD`` is below the gradient norm of every iteration; the test asserts it), dropout and
token corruption are off, and the LR schedule has no warmup, so every iteration moves the weights.
"""

import argparse
from pathlib import Path


import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from data_prep.synthetic import synthetic_clips
from megatron_nbp.checkpointing import unwrap
from megatron_nbp.config import NBPConfig
from megatron_nbp.layouts import frame_prediction_batch
from megatron_nbp.parallel import destroy_parallel, initialize_parallel
from megatron_nbp.training import build_training_state, train_step

CONFIG = "tests/configs/tiny_test.yaml"
ITERATIONS = 4
CLIP_GRAD = 0.5
# adam_eps 1e-6 (not 1e-8): see tests/test_parallel_training.py (Adam amplifies round-off of near-zero gradients)
OVERRIDES = {"train.clip_grad": CLIP_GRAD, "train.lr": 3e-3, "train.min_lr": 3e-4, "train.lr_warmup_iters": 0,
             "train.train_iters": ITERATIONS, "train.micro_batch_size": 2, "train.global_batch_size": 8,
             "train.pkeep": 1.0, "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
             "train.precision": "fp32", "train.adam_eps": 1e-6}
NUM_MICROBATCHES = 4


def iteration_batches(cfg: NBPConfig, iteration: int):
    """The 4 frame-prediction micro-batches (2 clips each) of ``iteration``: 8 synthetic clips drawn
    with seed 100 + iteration, so each iteration sees different data and both runs see the same."""
    m = cfg.model
    clips = synthetic_clips(8, m.latent_shape, vocab=m.vocab_size, seed=100 + iteration)
    clips = torch.from_numpy(clips.reshape(8, -1).astype("int64"))
    return [frame_prediction_batch(clips[i:i + 2], m.block_size, m.latent_shape, m.block_shape)
            for i in range(0, 8, 2)]


def global_name(model, name: str) -> str:
    """The single-process parameter name of this stage's ``name``: ``decoder.layers.<i>`` gets the
    layer's global index (megatron numbers a stage's layers locally, ``layer_number`` is global,
    1-based); every other name is the same on every stage."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def parameters_record(model) -> list[dict]:
    """Every parameter of this rank: local and global name, fp32 CPU copy, and whether / along which
    dimension megatron splits it over tensor-parallel ranks."""
    out = []
    for name, param in unwrap(model).named_parameters():
        out.append({
            "name": name, "global_name": global_name(unwrap(model), name),
            "tensor": param.detach().float().cpu().clone(),
            "tensor_parallel": bool(getattr(param, "tensor_model_parallel", False)),
            "partition_dim": int(getattr(param, "partition_dim", -1)),
            "partition_stride": int(getattr(param, "partition_stride", 1)),
        })
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["reference", "parallel"], required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    work = Path(args.workdir)
    tp = pp = 1 if args.mode == "reference" else 2
    cfg = NBPConfig.from_yaml(CONFIG, {**OVERRIDES, "parallel.tensor_model_parallel_size": tp,
                                       "parallel.pipeline_model_parallel_size": pp})
    initialize_parallel(tp, pp, seed=cfg.train.seed)
    state = build_training_state(cfg)
    model = unwrap(state.model)
    weights = work / "initial_weights"
    if args.mode == "reference":
        weights.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(weights))
        initial = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(weights)))
        initial = None
    steps = []
    for it in range(ITERATIONS):
        result = train_step(state, iter(iteration_batches(cfg, it)), cfg, NUM_MICROBATCHES)
        steps.append({"loss": result.loss, "grad_norm": result.grad_norm, "ok": result.applied,
                      "lr": state.optimizer.param_groups[0]["lr"]})
    result = {
        "steps": steps, "clip_grad": cfg.train.clip_grad,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "pp_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "tied_embeddings": bool(model.share_embeddings_and_output_weights),
        "params": parameters_record(state.model),
    }
    if args.mode == "reference":
        result["initial"] = initial
        torch.save(result, work / "reference.pt")
    else:
        torch.save(result, work / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    destroy_parallel()


if __name__ == "__main__":
    main()
