"""torchrun worker for tests/test_memory_plan.py: build each config's GPTModel stage under the given
TP x PP layout and write this rank's parameter count (numel of its stage, tied copies included).

    torchrun --nproc-per-node 4 tests/workers/stage_numel_worker.py --tp 2 --pp 2 --out DIR CONFIG...
"""

import argparse
import json
from pathlib import Path


from megatron.core import parallel_state

from megatron_nbp.config import NBPConfig
from megatron_nbp.model.builder import build_gpt_model
from megatron_nbp.parallel import destroy_parallel, initialize_parallel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("configs", nargs="+")
    a = p.parse_args()
    initialize_parallel(a.tp, a.pp)
    rank = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(), "numel": {}}
    for config in a.configs:
        model = build_gpt_model(NBPConfig.from_yaml(config).model)
        rank["numel"][config] = sum(param.numel() for param in model.parameters())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{parallel_state.get_data_parallel_rank()}_{rank['pp_rank']}_{rank['tp_rank']}.json").write_text(
        json.dumps(rank))
    destroy_parallel()


if __name__ == "__main__":
    main()
