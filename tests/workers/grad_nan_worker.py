"""torchrun worker for tests/test_numerical_faults.py: a non-finite *gradient* with finite weights and a
finite loss, in the megatron backend (1 process, or 2 data-parallel processes).

For each ``--variant`` (VARIANTS: precision and optimizer kind) it builds the training state twice from the
same seed:

    faulted: iteration 1 (micro-batches A), then on the same micro-batches B:
        ``hook``  a tensor hook on one weight of rank ``FAULT_RANK`` (the last rank) multiplies its gradient
                  by NaN during backward (before megatron's data-parallel reduction, which spreads it);
        ``after_reduce`` (data parallel only) the last rank writes +inf into one element of another
                  parameter's main_grad after ``finalize_model_grads``, so every other rank holds finite
                  gradients and only the collective check can make it skip;
        then a clean iteration on B.
    control: iteration 1 on A, iteration 2 on B, no fault.

Written by rank 0 to ``WORKDIR/grad_nan.json``, per variant: for each fault, every rank's
(loss, grad norm, update applied), whether the loss was finite, whether this rank's own gradient buffers
were finite after the step (where the fault reached), and whether the weights, the optimizer's parameters
(fp32 main params under bf16, shards of them under the distributed optimizer), Adam's exp_avg /
exp_avg_sq / step, every group's LR and the scheduler's step count are bitwise unchanged; then whether
the clean iteration after the faults reproduces the control's iteration 2 bitwise (loss, grad norm,
weights) and changed the weights and Adam's step.
"""

import argparse
import json
import math
import os
from pathlib import Path


import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from megatron_nbp.config import NBPConfig
from megatron_nbp.parallel import destroy_parallel, initialize_parallel, set_seed
from megatron_nbp.training import build_training_state, train_step
from tests.workers.tp_pp_worker import micro_batches

VARIANTS = {
    "fp32": {"train.precision": "fp32"},
    "bf16": {"train.precision": "bf16"},
    "bf16_distributed_optimizer": {"train.precision": "bf16", "train.use_distributed_optimizer": True},
}
COMMON = {"train.lr": 3e-3, "train.lr_warmup_iters": 0, "train.micro_batch_size": 2, "train.global_batch_size": 8}


def gpt_model(model):
    """The GPTModel inside megatron's DDP (and, under bf16 / fp16, Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (chained) optimizer."""
    return [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])]


def snapshot(state) -> dict:
    """Bitwise copies of everything a skipped step must leave alone: model weights, the parameters the
    torch optimizer updates (fp32 main params or their shards under mixed precision, the weights
    themselves in fp32), every Adam state tensor, every group's lr, the scheduler's step count."""
    snap = {"weights": {n: p.detach().clone() for n, p in gpt_model(state.model).named_parameters()},
            "optimizer_params": [], "optimizer_state": [], "lr": [], "scheduler_steps": state.scheduler.num_steps}
    for opt in torch_optimizers(state.optimizer):
        for group in opt.param_groups:
            snap["lr"].append(group["lr"])
            for p in group["params"]:
                snap["optimizer_params"].append(p.detach().clone())
                snap["optimizer_state"].append({k: v.detach().clone() if torch.is_tensor(v) else v
                                                for k, v in opt.state[p].items()})
    return snap


def unchanged(before: dict, after: dict) -> dict:
    """Per item of :func:`snapshot`: True iff bitwise equal (and the same set of state keys)."""
    def same_state(key):
        return all(key in a and key in b and torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
                   for a, b in zip(before["optimizer_state"], after["optimizer_state"]))

    return {
        "weights": all(torch.equal(before["weights"][n], t) for n, t in after["weights"].items()),
        "optimizer_params": all(torch.equal(a, b) for a, b in zip(before["optimizer_params"], after["optimizer_params"])),
        "exp_avg": same_state("exp_avg"), "exp_avg_sq": same_state("exp_avg_sq"), "step": same_state("step"),
        "lr": before["lr"] == after["lr"], "scheduler_steps": before["scheduler_steps"] == after["scheduler_steps"],
    }


def adam_steps(state) -> list[float]:
    """Adam's step count of every optimizer parameter."""
    return [float(opt.state[p]["step"]) for opt in torch_optimizers(state.optimizer)
            for g in opt.param_groups for p in g["params"]]


def buffers_finite(state) -> bool:
    """Whether this rank's own megatron DDP gradient buffers (every main_grad) are all finite."""
    return all(bool(torch.isfinite(b.grad_data).all()) for b in state.model.buffers)


def gather(obj):
    """Every rank's ``obj`` (list, rank order)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_variant(name: str) -> dict:
    """The faulted and the control run of one variant (module docstring); returns rank 0's record with
    every rank's outcome of each fault."""
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {**COMMON, **VARIANTS[name]})
    cfg.validate(int(os.environ["WORLD_SIZE"]))
    initialize_parallel(1, 1, seed=cfg.train.seed)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_rank = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    batches = micro_batches(cfg)
    data_a = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    data_b = list(reversed(batches))[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    def step(st, data) -> tuple[float, float, bool]:
        result = train_step(st, iter(data), cfg, per_rank)
        return result.loss, result.grad_norm, result.applied
    fault_rank = dist.get_world_size() - 1
    out = {"dp": dp, "fault_rank": fault_rank, "faults": {}}

    set_seed(cfg.train.seed)
    control = build_training_state(cfg)
    out["control"] = [step(control, data_a), step(control, data_b)]
    control_weights = {n: p.detach().clone() for n, p in gpt_model(control.model).named_parameters()}

    set_seed(cfg.train.seed)
    state = build_training_state(cfg)
    out["first"] = step(state, data_a)
    before = snapshot(state)
    model = gpt_model(state.model)
    out["precision"], out["weight_dtype"] = state.precision, str(model.decoder.layers[0].mlp.linear_fc1.weight.dtype)
    out["num_optimizer_params"] = len(before["optimizer_params"])
    out["optimizer_param_dtypes"] = sorted({str(p.dtype) for p in before["optimizer_params"]})
    out["num_state_tensors"] = sum(len(s) for s in before["optimizer_state"])

    faults = ["hook"] + (["after_reduce"] if dp > 1 else [])
    for fault in faults:
        handle, config = None, get_model_config(state.model)
        finalize = config.finalize_model_grads_func
        if dist.get_rank() == fault_rank:
            if fault == "hook":
                handle = model.decoder.layers[0].mlp.linear_fc1.weight.register_hook(lambda g: g * float("nan"))
            else:
                target = model.decoder.final_layernorm.weight

                def finalize_then_poison(*args, **kwargs):
                    finalize(*args, **kwargs)
                    target.main_grad.view(-1)[0] = float("inf")

                config.finalize_model_grads_func = finalize_then_poison
        weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        loss, grad_norm, ok = step(state, data_b)
        local_finite = buffers_finite(state)
        if handle is not None:
            handle.remove()
        config.finalize_model_grads_func = finalize
        result = {"loss": loss, "grad_norm": grad_norm, "ok": ok, "weights_finite_before": weights_finite,
                  "loss_finite": math.isfinite(loss), "grads_finite_here": local_finite,
                  "unchanged": unchanged(before, snapshot(state))}
        out["faults"][fault] = gather(result)

    steps_before = adam_steps(state)
    out["after"] = step(state, data_b)
    equal_here = (list(out["after"]) == list(out["control"][1])
                  and all(torch.equal(p, control_weights[n]) for n, p in model.named_parameters()))
    out["after_equals_control"] = all(gather(equal_here))  # on every rank
    after = unchanged(before, snapshot(state))
    out["after_changed"] = {"weights": not after["weights"], "exp_avg": not after["exp_avg"],
                            "scheduler_steps": not after["scheduler_steps"],
                            "adam_step_plus_one": all(b == a - 1 for a, b in zip(adam_steps(state), steps_before))}
    parallel_state.destroy_model_parallel()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variant", action="append", required=True, choices=sorted(VARIANTS))
    args = parser.parse_args()
    results = {name: run_variant(name) for name in args.variant}
    if dist.get_rank() == 0:
        (Path(args.workdir) / "grad_nan.json").write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
