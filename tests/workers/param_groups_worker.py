"""torchrun worker for tests/distributed/test_weight_decay_groups.py: the DeepSpeed backend's parameter
groups (megatron_nbp.training.optim.weight_decay_groups) against the groups megatron-core forms for the
same GPTModel stage (its ``_get_param_groups`` with the megatron backend's OptimizerConfig and config
overrides, i.e. what ``get_megatron_optimizer`` uses), for each ``--config``, under the config's own
``train.no_weight_decay`` rule and under the "release" rule. Models are built with the position tables
initialised to zeros (``model.position_embedding_init``), and the tables' largest magnitude recorded.

    torchrun --nproc-per-node 2 -m tests.workers.param_groups_worker --output OUT.json \
        --tp 2 --config A.yaml --config B.yaml

Writes OUT.json (rank 0): {config: [one record per rank]}, each record {"ours", "megatron", "release":
{"ours", "megatron"}, "position_tables": {name: max |value|}}; a group is its keys in order, its
non-parameter values and the names of its parameters in order.
"""

import argparse
import json
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import _get_param_groups

from megatron_nbp.config import NBPConfig
from megatron_nbp.model.builder import build_gpt_model
from megatron_nbp.parallel import destroy_parallel, initialize_parallel
from megatron_nbp.training.megatron_backend import optimizer_config
from megatron_nbp.training.optim import megatron_config_overrides, weight_decay_groups


def describe(groups, names) -> list[dict]:
    """Each group as JSON: keys in order, non-parameter values, parameter names in order."""
    return [{"keys": list(g), "values": {k: v for k, v in g.items() if k != "params"},
             "params": [names[id(p)] for p in g["params"]]} for g in groups]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--config", action="append", required=True)
    args = parser.parse_args()
    results = {}
    for path in args.config:
        cfg = NBPConfig.from_yaml(path, {"model.position_embedding_init": "zeros"})
        plan = initialize_parallel(args.tp, 1, seed=cfg.train.seed)
        module = build_gpt_model(cfg.model, precision="fp32", plan=plan, train=cfg.train)
        names = {id(p): n for n, p in module.named_parameters()}
        t = cfg.train

        def both(rule):
            return {"ours": describe(weight_decay_groups(module, t.lr, t.min_lr, rule), names),
                    "megatron": describe(_get_param_groups([module], optimizer_config(t),
                                                           megatron_config_overrides(rule)), names)}
        record = {**both(t.no_weight_decay), "release": both("release"),
                  "position_tables": {n: float(p.abs().max()) for n, p in module.named_parameters()
                                      if n.startswith("embedding.position_embeddings.")}}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        results[path] = gathered
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(args.output).write_text(json.dumps(results))
    destroy_parallel()


if __name__ == "__main__":
    main()
