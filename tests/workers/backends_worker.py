"""torchrun worker for tests/test_deepspeed_zero.py: several complete training runs, one after the other,
in one set of processes (torchrun start-up and the DeepSpeed / megatron imports are paid once).

    torchrun --nproc-per-node 4 tests/workers/backends_worker.py --config CONFIG \
        --runs '{"megatron": {"train.backend": "megatron", ...}, "zero1": {...}}'

Each run is NBPConfig.from_yaml(CONFIG, overrides) handed to the backend's real ``pretrain`` function
(megatron_nbp.training.pretrain, which picks the backend from ``train.backend``), which
re-seeds, rebuilds the model and restarts the data stream; megatron's parallel groups are torn down
between runs, the default process group is kept.
"""

import argparse
import json


from megatron.core import parallel_state

from megatron_nbp.config import NBPConfig
from megatron_nbp.parallel import destroy_parallel
from megatron_nbp.training import pretrain


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--runs", required=True, help="JSON: run name -> config overrides")
    args = parser.parse_args()
    for name, overrides in json.loads(args.runs).items():
        cfg = NBPConfig.from_yaml(args.config, overrides)
        pretrain(cfg)
        parallel_state.destroy_model_parallel()
        print(f"> run {name} done", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
