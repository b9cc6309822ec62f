"""Two "nodes" on one machine: launchers/slurm/pretrain_nbp.sbatch, with stand-ins for srun/scontrol, starts
two concurrent ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d`` agents that train TP=2 x DP=2
for a few iterations; the TensorBoard lm-loss equals a one-node ``torchrun --nproc-per-node 4`` run of the same
config, iteration by iteration. launchers/slurm/train_tokenizer.sbatch the same way (2 nodes x 1 rank, DDP,
--save and --load naming a directory that does not exist yet) ends with the training state and exported
tokenizer of a one-node 2-rank run, bit for bit."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.dist_utils import REPO, free_port, torchrun
from data_prep.synthetic import write_synthetic_shards
from tests.faults.test_resume import tb_losses

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"
ITERS = 3


def train_args(data, tb) -> list[str]:
    return ["--tp", "2", "--config", CONFIG, "--data", str(data), "--train-iters", str(ITERS),
            "--tensorboard-dir", str(tb)]


# Stand-ins for the SLURM commands the sbatch script calls: `srun` starts its command once per node
# ($SLURM_NNODES copies, concurrently; each node's output in $NODE_LOGS/node<i>.log), `scontrol show
# hostnames` names 127.0.0.1 as the first node, `torchrun` is this interpreter's torch.distributed.run.
SHIMS = {
    "srun": """#!/bin/bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do "$@" > "$NODE_LOGS/node$i.log" 2>&1 & pids+=($!); done
rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done; exit $rc
""",
    "scontrol": "#!/bin/bash\necho 127.0.0.1\n",
    "torchrun": f"#!/bin/bash\nexec {sys.executable} -m torch.distributed.run \"$@\"\n",
}


def two_nodes(root, argv: list[str], script: str = "launchers/slurm/pretrain_nbp.sbatch", per_node: int = 2,
              timeout: int = 300) -> list[str]:
    """Run an sbatch script as a 2-node job of ``per_node`` processes per node: two torchrun agents started at
    once, meeting through c10d rendezvous on a free local port. Returns each node's output."""
    bin_dir, logs = root / "bin", root / "node_logs"
    bin_dir.mkdir(exist_ok=True)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    for name, text in SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               NODE_LOGS=str(logs), SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]",
               SLURM_JOB_ID=f"test{free_port()}", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE=str(per_node),
               RDZV_PORT=str(free_port()))
    proc = subprocess.run(["bash", script, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    outputs = [(logs / f"node{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, f"sbatch script failed ({proc.returncode}):\n{proc.stderr}\n" + "\n".join(
        out[-4000:] for out in outputs)
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    torchrun(4, LAUNCHER, *train_args(root / "data", root / "tb_one_node"))
    outputs = two_nodes(root, train_args(root / "data", root / "tb_two_nodes"))
    return tb_losses(root / "tb_one_node"), tb_losses(root / "tb_two_nodes"), outputs


def test_two_nodes_form_one_tp2_dp2_world(runs):
    _, _, outputs = runs
    # global rank 0 prints the layout, the last rank (3) logs iterations: they sit on different agents
    layout = [out for out in outputs if "TP=2 PP=1 DP=2" in out]
    logging = [out for out in outputs if re.search(rf"iteration\s+{ITERS}/", out)]
    assert len(layout) == 1 and len(logging) == 1 and layout[0] is not logging[0], outputs


def test_two_node_losses_equal_one_node(runs):
    one, two, _ = runs
    assert sorted(one) == list(range(1, ITERS + 1)) and sorted(two) == sorted(one)
    for step in one:
        assert two[step] == one[step], (step, two[step], one[step])
    assert one[ITERS] < one[1]


def test_tokenizer_training_on_two_nodes_equals_one_node(tmp_path):
    """launchers/slurm/train_tokenizer.sbatch (it adds --exit-signal-handler) as 2 nodes x 1 rank against
    ``torchrun --nproc-per-node 2`` on one node: the same final training state (tokenizer, discriminator,
    EMA, both optimizers, LeCam, each rank's RNG) and exported tokenizer, bit for bit. --save and --load name
    a directory that does not exist yet, as on a job's first start."""
    from data_prep.tokenizer import load_tokenizer
    from tests.distributed.test_tokenizer_recipe import _assert_same, _write_pattern
    from tests.faults.test_tokenizer_faults import SMALL_MODEL, _cli, _load

    _write_pattern(tmp_path / "videos" / "a.mp4")
    _write_pattern(tmp_path / "videos" / "b.mp4", frames=20)
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_MODEL)
    steps = 4

    def argv(name: str) -> list[str]:
        ckpt = str(tmp_path / name / "ckpt")
        return [*_cli(tmp_path, config, name, steps)[1:], "--save-interval", "2", "--load", ckpt]

    torchrun(2, "launchers/train_tokenizer.py", *argv("one_node"), "--exit-signal-handler")
    outputs = two_nodes(tmp_path, argv("two_nodes"), "launchers/slurm/train_tokenizer.sbatch", per_node=1)
    assert sum("no checkpoint under" in out for out in outputs) >= 1, outputs  # the first start
    a, b = tmp_path / "one_node" / "ckpt" / f"iter_{steps:07d}", tmp_path / "two_nodes" / "ckpt" / f"iter_{steps:07d}"
    _assert_same(_load(a, "state.pt"), _load(b, "state.pt"), "state")
    for r in range(2):
        _assert_same(_load(a, f"rng_rank{r}.pt"), _load(b, f"rng_rank{r}.pt"), f"rng_rank{r}")
    _assert_same(load_tokenizer(tmp_path / "one_node" / "tok.safetensors").state_dict(),
                 load_tokenizer(tmp_path / "two_nodes" / "tok.safetensors").state_dict(), "exported")
