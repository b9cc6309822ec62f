"""torchrun worker for tests/test_training_variants.py: the same 3 training iterations (same initial
weights, same micro-batches per data-parallel rank) under several megatron-backend settings.

For each ``--variant NAME`` it builds the training state from the tiny test config with that variant's
overrides (VARIANTS), runs 3 real ``train_step`` iterations and writes (rank 0) ``NAME.pt``: the
per-iteration losses and grad norms, the gradients (main_grad) after the first iteration and the final
weights, all keyed by parameter name, as CPU fp32 tensors.

FlexAttention variants lift torch's CPU backward guard, as tests/test_attention_kernels.py does (the
eager kernel differentiates; torch refuses requires_grad inputs on CPU by a device check only).
"""

import argparse
import os
from pathlib import Path


import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nbp.checkpointing import unwrap
from megatron_nbp.config import NBPConfig
from megatron_nbp.parallel import destroy_parallel, initialize_parallel, set_seed
from megatron_nbp.training import build_training_state, train_step
from tests.workers.tp_pp_worker import micro_batches

COMMON = {"model.hidden_dropout": 0.1, "train.lr": 1e-3, "train.lr_warmup_iters": 0, "train.micro_batch_size": 2,
          "train.global_batch_size": 8}
RECOMPUTE_FULL = {"train.recompute_granularity": "full", "train.recompute_method": "uniform",
                  "train.recompute_num_layers": 1}
VARIANTS = {
    "plain": {},
    "distributed_optimizer": {"train.use_distributed_optimizer": True},
    "distributed_optimizer_overlap": {"train.use_distributed_optimizer": True, "train.overlap_grad_reduce": True,
                                      "train.overlap_param_gather": True},
    "overlap_grad_reduce": {"train.overlap_grad_reduce": True},
    "recompute_full_uniform": RECOMPUTE_FULL,
    "recompute_full_block": {**RECOMPUTE_FULL, "train.recompute_method": "block", "train.recompute_num_layers": 2},
    "recompute_selective": {"train.recompute_granularity": "selective"},
    "flex": {"model.attention_backend": "flex"},
    "flex_recompute_full": {"model.attention_backend": "flex", **RECOMPUTE_FULL},
    "flex_recompute_selective": {"model.attention_backend": "flex", "train.recompute_granularity": "selective"},
}


def run_variant(name: str, work: Path) -> None:
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {**COMMON, **VARIANTS[name]})
    cfg.validate(int(os.environ["WORLD_SIZE"]))
    initialize_parallel(1, 1, seed=cfg.train.seed)
    set_seed(cfg.train.seed)  # the same initial weights for every variant
    state = build_training_state(cfg)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_rank = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    data = micro_batches(cfg)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    out = {"loss": [], "grad_norm": [], "ok": []}
    for i in range(3):
        result = train_step(state, iter(data), cfg, per_rank)
        out["loss"].append(result.loss)
        out["grad_norm"].append(result.grad_norm)
        out["ok"].append(result.applied)
        if i == 0:
            out["grads"] = {n: p.main_grad.detach().float().clone() for n, p in unwrap(state.model).named_parameters()}
    if cfg.train.overlap_param_gather:  # the last update's all-gather is still pending
        state.model.start_param_sync(force_sync=True)
    out["weights"] = {n: p.detach().float().clone() for n, p in unwrap(state.model).named_parameters()}
    if dist.get_rank() == 0:
        torch.save(out, work / f"{name}.pt")
    parallel_state.destroy_model_parallel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variant", action="append", required=True, choices=sorted(VARIANTS))
    args = parser.parse_args()
    if any(VARIANTS[v].get("model.attention_backend") == "flex" for v in args.variant):
        import torch.nn.attention.flex_attention as fa

        fa._validate_device = lambda *a, **k: None
    for name in args.variant:
        run_variant(name, Path(args.workdir))
    destroy_parallel()


if __name__ == "__main__":
    main()
