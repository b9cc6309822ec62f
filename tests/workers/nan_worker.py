"""torchrun worker for tests/test_numerical_faults.py: a non-finite loss/gradient skips the update
(weights, optimizer and LR unchanged) and too many in a row save a checkpoint and abort."""

import argparse
import itertools
import json
from pathlib import Path


import torch

from megatron_nbp.checkpointing import read_latest_iteration, unwrap
from megatron_nbp.config import NBPConfig
from megatron_nbp.parallel import destroy_parallel, initialize_parallel
from megatron_nbp.training import MegatronBackend, train_step, training_loop
from tests.workers.tp_pp_worker import micro_batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    work = Path(args.workdir)
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {"train.max_skipped_iterations": 3,
                                                               "save": str(work / "ckpt")})
    backend = MegatronBackend(cfg)
    backend.build(initialize_parallel(1, 1, seed=cfg.train.seed))
    state = backend.state
    batches = lambda: iter(micro_batches(cfg))  # noqa: E731
    out = {"first_ok": train_step(state, batches(), cfg, 4).applied}
    params = {n: p.detach().clone() for n, p in unwrap(state.model).named_parameters()}
    lr = state.optimizer.param_groups[0]["lr"]
    poisoned = unwrap(state.model).decoder.layers[0].mlp.linear_fc2.weight
    with torch.no_grad():
        saved = poisoned[0, 0].item()
        poisoned[0, 0] = float("inf")
    result = train_step(state, batches(), cfg, 4)
    with torch.no_grad():
        poisoned[0, 0] = saved
    out.update(skipped_ok=result.applied, skipped_loss=result.loss, lr_unchanged=state.optimizer.param_groups[0]["lr"] == lr,
               weights_unchanged=all(torch.equal(p, params[n]) for n, p in unwrap(state.model).named_parameters()))
    with torch.no_grad():
        poisoned[0, 0] = float("nan")
    try:
        # the same 4 micro-batches every iteration, from iteration 2 (16 samples seen)
        training_loop(cfg, backend, itertools.cycle(micro_batches(cfg)), 4, iteration=2, consumed=16)
        out["aborted"] = None
    except FloatingPointError as err:
        out["aborted"] = str(err)
    out["latest"] = read_latest_iteration(work / "ckpt")
    (work / "result.json").write_text(json.dumps(out))
    destroy_parallel()


if __name__ == "__main__":
    main()
