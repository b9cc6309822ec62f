"""torchrun worker for tests/test_numerical_faults.py, DeepSpeed backend (2 ranks: TP1 x DP2, ZeRO-STAGE):
a non-finite loss or gradient on any rank skips the update on every rank (model weights, fp32 master
weights, Adam moments and LR schedule unchanged; DeepSpeed's step counters stay consistent), a good
step afterwards applies, and too many skipped iterations in a row save a checkpoint and abort.

    torchrun --nproc-per-node 2 tests/workers/ds_nan_worker.py --workdir DIR --stage 2 --stage 3

Faults, one iteration each: an inf weight (every rank); an inf loss with finite gradients on rank 1
only (a constant added to the per-token losses, so only the loss check can catch it); a NaN gradient
with finite losses on rank 0 only (a gradient hook). The stages run one after the other in the same
processes; writes DIR/result.json (rank 0): {stage: results}.
"""

import argparse
import itertools
import json
from pathlib import Path


import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nbp.config import NBPConfig
from megatron_nbp.deepspeed_checkpointing import LATEST_TAG_FILE
from megatron_nbp.parallel import destroy_parallel, initialize_parallel
from megatron_nbp.training import DeepSpeedBackend, training_loop
from tests.workers.tp_pp_worker import micro_batches


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Full model weights (collective: ZeRO-3 partitions are gathered), and this rank's fp32 master
    partitions and Adam moments (the tensors the wrapped torch optimizer has stepped)."""
    from deepspeed import zero

    out = {}
    named = list(engine.module.named_parameters())
    with zero.GatheredParameters([p for _, p in named]):
        for name, p in named:
            out[f"weight:{name}"] = p.detach().clone()
    base = engine.optimizer.optimizer  # torch AdamW; its state is keyed by the ZeRO flat fp32 partitions
    for i, (master, moments) in enumerate(base.state.items()):
        out[f"master:{i}"] = master.detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}:{i}"] = moments[key].clone()
    return out


def all_ranks(flag: bool) -> bool:
    """``flag`` and-ed over every rank."""
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def set_entry(param: torch.nn.Parameter, value: float) -> float:
    """Set param[0, 0] to ``value`` on every rank (ZeRO-3: gathered, changed, re-partitioned); returns the old value."""
    from deepspeed import zero

    with zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        old = param[0, 0].item()
        param[0, 0] = value
    return old


def run_stage(stage: int, work: Path) -> dict:
    """The faults above under ZeRO-``stage``, a good step, then the abort; checkpoints go to ``work/ckpt``."""
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {
        "train.backend": "deepspeed", "deepspeed.zero_stage": stage, "train.max_skipped_iterations": 3,
        "save": str(work / "ckpt")})
    backend = DeepSpeedBackend(cfg)
    backend.build(initialize_parallel(1, 1, seed=cfg.train.seed))
    rank = dist.get_rank()
    state = backend.state
    engine = state.engine
    num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dist.get_world_size())
    data = micro_batches(cfg)[rank * num_micro:(rank + 1) * num_micro]  # each DP rank its own micro-batches
    batches = lambda: iter(data)  # noqa: E731

    def step() -> tuple[float, float, bool]:
        result = backend.train_step(batches(), num_micro)
        return result.loss, result.grad_norm, result.applied

    lr = lambda: engine.optimizer.param_groups[0]["lr"]  # noqa: E731
    counters = lambda: [engine.global_steps, engine.skipped_steps, state.scheduler.num_steps]  # noqa: E731

    out = {"first": list(step()), "counters_after_first": counters()}
    before, lr_before = snapshot(engine), lr()
    faults = {}
    poisoned = engine.module.decoder.layers[0].mlp.linear_fc2.weight

    saved = set_entry(poisoned, float("inf"))  # inf weight on every rank
    faults["inf_weight"] = step()
    set_entry(poisoned, saved)

    hook = None
    if rank == 1:  # inf loss on rank 1 only, gradients finite everywhere
        hook = engine.module.register_forward_hook(lambda m, i, o: o + torch.full_like(o, float("inf")))
    faults["inf_loss_rank1"] = step()
    if hook is not None:
        hook.remove()

    if rank == 0:  # NaN gradient on rank 0 only, losses finite everywhere
        hook = poisoned.register_hook(lambda g: g * float("nan"))
    faults["nan_grad_rank0"] = step()
    if hook is not None:
        hook.remove()

    after = snapshot(engine)
    out["faults"] = {k: {"loss": v[0], "grad_norm": v[1], "ok": v[2]} for k, v in faults.items()}
    oks = [None] * dist.get_world_size()
    dist.all_gather_object(oks, [v[2] for v in faults.values()])
    out["ranks_agree"] = all(o == oks[0] for o in oks)
    out["unchanged"] = {kind: all_ranks(all(torch.equal(after[k], before[k]) for k in before
                                            if k.startswith(kind + ":")))
                        for kind in ("weight", "master", "exp_avg", "exp_avg_sq")}
    out["num_state_tensors"] = sum(k.startswith("exp_avg:") for k in before)  # Adam moments exist: a step was taken
    out["lr_unchanged"] = lr() == lr_before
    out["counters_after_faults"] = counters()

    out["good_after"] = list(step())
    out["changed_after_good"] = all_ranks(any(not torch.equal(v, before[k]) for k, v in snapshot(engine).items()
                                              if k.startswith("master:")))
    out["counters_after_good"] = counters()

    set_entry(poisoned, float("nan"))
    try:
        # this rank's same micro-batches every iteration, from iteration 2 (16 samples seen)
        training_loop(cfg, backend, itertools.cycle(data), num_micro, iteration=2, consumed=16)
        out["aborted"] = None
    except FloatingPointError as err:
        out["aborted"] = str(err)
    latest = work / "ckpt" / LATEST_TAG_FILE
    out["latest"] = latest.read_text().strip() if latest.exists() else None
    out["counters_end"] = counters()
    parallel_state.destroy_model_parallel()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stage", type=int, action="append", required=True, help="ZeRO stage (repeatable)")
    args = parser.parse_args()
    results = {}
    for stage in args.stage:
        results[stage] = run_stage(stage, Path(args.workdir) / f"zero{stage}")
    if dist.get_rank() == 0:
        (Path(args.workdir) / "result.json").write_text(json.dumps(results))
    destroy_parallel()


if __name__ == "__main__":
    main()
