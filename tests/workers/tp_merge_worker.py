"""torchrun worker (2 processes) for tests/test_deepspeed_zero.py: megatron-core's own tensor-parallel
split against merge_tensor_parallel_shards.

For each config: build the GPTModel at TP=1 and, after re-initialising parallel_state, at TP=2 from
the same seed. megatron's CPU initialisation draws the full (master) weight and gives each TP rank its
slice, so the TP=2 shards are megatron's partition of the TP=1 weights. Rank 0 merges the two shards
and writes, per config, the largest difference to the TP=1 weights and how many tensors were split
(and with stride 2: SwiGLU's fc1) to --output (JSON).
"""

import argparse
import json
from pathlib import Path


import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nbp.config import NBPConfig
from megatron_nbp.inference.convert_zero import merge_tensor_parallel_shards
from megatron_nbp.model.builder import build_gpt_model
from megatron_nbp.parallel import destroy_parallel, initialize_parallel, set_seed


def tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    initialize_parallel(1, 1, seed=0)
    results = {}
    for config in args.config:
        cfg = NBPConfig.from_yaml(config)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        set_seed(cfg.train.seed)
        reference = build_gpt_model(cfg.model)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        set_seed(cfg.train.seed)
        shard = tensors(build_gpt_model(cfg.model))
        shards = [None, None]
        dist.all_gather_object(shards, shard)
        if dist.get_rank() == 0:
            merged = merge_tensor_parallel_shards(shards, reference)
            expected = tensors(reference)
            split = [k for k, v in reference.state_dict(keep_vars=True).items()
                     if getattr(v, "tensor_model_parallel", False)]
            results[config] = {
                "same_keys": sorted(merged) == sorted(expected),
                "max_abs_diff": max(float((merged[k] - expected[k]).abs().max()) for k in expected),
                "num_split": len(split),
                "num_stride2": sum(getattr(reference.state_dict(keep_vars=True)[k], "partition_stride", 1) == 2
                                   for k in split),
                "shards_differ_from_reference": sum(shards[0][k].shape != expected[k].shape for k in expected),
            }
    if dist.get_rank() == 0:
        Path(args.output).write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
