"""torchrun worker for tests/test_numerical_faults.py: a non-finite loss/gradient skips the update
(weights, optimizer and LR unchanged) and too many in a row save a checkpoint and abort."""

import argparse
import json
from pathlib import Path


import torch

from megatron_nbp.checkpointing import read_latest_iteration, save_checkpoint, unwrap
from megatron_nbp.config import NBPConfig
from megatron_nbp.parallel import destroy_parallel, initialize_parallel
from megatron_nbp.training import build_training_state, train_step, training_loop
from tests.workers.tp_pp_worker import micro_batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    work = Path(args.workdir)
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {"train.max_skipped_iterations": 3,
                                                               "save": str(work / "ckpt")})
    initialize_parallel(1, 1, seed=cfg.train.seed)
    state = build_training_state(cfg)
    batches = lambda: iter(micro_batches(cfg))  # noqa: E731
    out = {"first_ok": train_step(state, batches(), cfg, 4)[2]}
    params = {n: p.detach().clone() for n, p in unwrap(state.model).named_parameters()}
    lr = state.optimizer.param_groups[0]["lr"]
    poisoned = unwrap(state.model).decoder.layers[0].mlp.linear_fc2.weight
    with torch.no_grad():
        saved = poisoned[0, 0].item()
        poisoned[0, 0] = float("inf")
    loss, grad_norm, ok = train_step(state, batches(), cfg, 4)
    with torch.no_grad():
        poisoned[0, 0] = saved
    out.update(skipped_ok=ok, skipped_loss=loss, lr_unchanged=state.optimizer.param_groups[0]["lr"] == lr,
               weights_unchanged=all(torch.equal(p, params[n]) for n, p in unwrap(state.model).named_parameters()))
    with torch.no_grad():
        poisoned[0, 0] = float("nan")
    try:
        training_loop(cfg, 2, 16, step=lambda: train_step(state, batches(), cfg, 4),
                      save=lambda it, seen: save_checkpoint(cfg.save, it, state.model, state.optimizer,
                                                            state.scheduler, seen, cfg.to_dict()["model"]),
                      current_lr=lambda: state.optimizer.param_groups[0]["lr"])
        out["aborted"] = None
    except FloatingPointError as err:
        out["aborted"] = str(err)
    out["latest"] = read_latest_iteration(work / "ckpt")
    (work / "result.json").write_text(json.dumps(out))
    destroy_parallel()


if __name__ == "__main__":
    main()
