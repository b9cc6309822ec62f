"""Two "nodes" on one machine: launchers/slurm/pretrain_nbp.sbatch, with stand-ins for srun/scontrol, starts
two concurrent ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d`` agents that train TP=2 x DP=2
for a few iterations; the TensorBoard lm-loss equals a one-node ``torchrun --nproc-per-node 4`` run of the same
config, iteration by iteration. launchers/slurm/train_tokenizer.sbatch the same way (2 nodes x 1 rank, DDP,
--save and --load naming a directory that does not exist yet) ends with the training state and exported
tokenizer of a one-node 2-rank run, bit for bit."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import REPO, free_port, kill_process_tree, torchrun
from data_prep.synthetic import write_synthetic_shards
from tests.faults.test_resume import tb_losses

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"
ITERS = 3


def train_args(data, tb) -> list[str]:
    return ["--tp", "2", "--config", CONFIG, "--data", str(data), "--train-iters", str(ITERS),
            "--tensorboard-dir", str(tb)]


# Stand-ins for the SLURM commands the sbatch script calls: `srun` starts its command once per node
# ($SLURM_NNODES copies, concurrently; each node's output in $NODE_LOGS/node<i>.log) and, like srun, passes
# SIGUSR1 on to them; `scontrol show hostnames` names 127.0.0.1 as the first node, and every scontrol call is
# recorded in $NODE_LOGS/scontrol.txt; `torchrun` is this interpreter's torch.distributed.run.
SHIMS = {
    "srun": """#!/bin/bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do "$@" > "$NODE_LOGS/node$i.log" 2>&1 & pids+=($!); done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for pid in "${pids[@]}"; do
  while true; do wait "$pid"; status=$?; kill -0 "$pid" 2>/dev/null || break; done
  [ "$status" -eq 0 ] || rc=1
done
exit $rc
""",
    "scontrol": """#!/bin/bash
echo "$*" >> "$NODE_LOGS/scontrol.txt"
[ "$1" = show ] && echo 127.0.0.1
exit 0
""",
    "torchrun": f"#!/bin/bash\nexec {sys.executable} -m torch.distributed.run \"$@\"\n",
}


def start_two_nodes(root, argv: list[str], script: str = "launchers/slurm/pretrain_nbp.sbatch", per_node: int = 2,
                    job_id: str | None = None) -> tuple[subprocess.Popen, Path]:
    """Start an sbatch script as a 2-node job of ``per_node`` processes per node: two torchrun agents started at
    once, meeting through c10d rendezvous on a free local port. Returns the script's process (stdout and
    stderr piped) and the folder of each node's output."""
    bin_dir, logs = root / "bin", root / "node_logs"
    bin_dir.mkdir(exist_ok=True)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    for name, text in SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               NODE_LOGS=str(logs), SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]",
               SLURM_JOB_ID=job_id or f"test{free_port()}", SLURM_SUBMIT_DIR=str(REPO),
               GPUS_PER_NODE=str(per_node), RDZV_PORT=str(free_port()))
    proc = subprocess.Popen(["bash", script, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, logs


def two_nodes(root, argv: list[str], script: str = "launchers/slurm/pretrain_nbp.sbatch", per_node: int = 2,
              timeout: int = 300) -> list[str]:
    """:func:`start_two_nodes` and wait for the job; asserts it exits 0. Returns each node's output."""
    proc, logs = start_two_nodes(root, argv, script, per_node)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc)
    outputs = [(logs / f"node{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, f"sbatch script failed ({proc.returncode}):\n{stderr}\n" + "\n".join(
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


def _tokenizer_job(root: Path, steps: int):
    """Pattern videos and a tiny tokenizer config under ``root``; returns ``argv(name)``, the launcher flags of a
    GAN + LeCam + EMA run of ``steps`` steps saving into and loading from ``root/name/ckpt``."""
    from tests.faults.test_tokenizer_faults import _cli
    from tests.tokenizer_data import write_two_videos

    config = write_two_videos(root)

    def argv(name: str, save_interval: int = 2) -> list[str]:
        ckpt = str(root / name / "ckpt")
        return [*_cli(root, config, name, steps)[1:], "--save-interval", str(save_interval), "--load", ckpt]

    return argv


def test_tokenizer_training_on_two_nodes_equals_one_node(tmp_path):
    """launchers/slurm/train_tokenizer.sbatch (it adds --exit-signal-handler) as 2 nodes x 1 rank against
    ``torchrun --nproc-per-node 2`` on one node: the same final training state (tokenizer, discriminator,
    EMA, both optimizers, LeCam, each rank's RNG) and exported tokenizer, bit for bit. --save and --load name
    a directory that does not exist yet, as on a job's first start; without --load the script refuses."""
    from tests.faults.test_tokenizer_faults import assert_same_run

    steps = 4
    argv = _tokenizer_job(tmp_path, steps)
    torchrun(2, "launchers/train_tokenizer.py", *argv("one_node"), "--exit-signal-handler")
    outputs = two_nodes(tmp_path, argv("two_nodes"), "launchers/slurm/train_tokenizer.sbatch", per_node=1)
    assert sum("no checkpoint under" in out for out in outputs) >= 1, outputs  # the first start
    assert_same_run(tmp_path, "one_node", "two_nodes", steps)

    proc, _ = start_two_nodes(tmp_path, argv("no_load")[:-2], "launchers/slurm/train_tokenizer.sbatch", per_node=1)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and stderr.strip() == ("train_tokenizer.sbatch: pass --load (the directory of "
                                                       "--save): a requeued job resumes from it"), stderr


def test_tokenizer_job_usr1_before_the_time_limit_saves_requeues_and_the_requeued_job_finishes_the_run(tmp_path):
    """SIGUSR1 to the sbatch script while the 2-node tokenizer job trains (what ``#SBATCH --signal=B:USR1@180``
    sends): the trap passes it to srun, srun to both torchrun agents, they to their workers; both ranks save
    the same step, nothing is exported, the script asks for ``scontrol requeue JOB`` and exits 0. The requeued
    job (the same command) resumes from --load and ends with the state and tokenizer of an uninterrupted
    one-node run, bit for bit."""
    from tests.faults.test_tokenizer_faults import assert_same_run

    steps = 200  # long enough that the signal lands inside the run
    argv = _tokenizer_job(tmp_path, steps)
    torchrun(2, "launchers/train_tokenizer.py", *argv("one_node", 0), timeout=300)
    proc, logs = start_two_nodes(tmp_path, argv("job", 0), "launchers/slurm/train_tokenizer.sbatch", per_node=1,
                                 job_id="4242")
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not any(
                re.search(r"step +3 \|", log.read_text(errors="replace")) for log in logs.glob("node*.log")):
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc)
    outputs = "\n".join(log.read_text() for log in logs.glob("node*.log"))
    assert proc.returncode == 0, (stdout, stderr, outputs[-4000:])
    assert "requeueing job 4242 to resume from --load" in stdout, stdout
    assert "requeue 4242" in (logs / "scontrol.txt").read_text().splitlines()
    results = [json.loads(line) for line in outputs.splitlines() if line.startswith('{"steps"')]
    assert len(results) == 1 and "exit signal received" in results[0]["stopped"], outputs[-4000:]
    stopped_at = results[0]["steps"]
    print(f"\nSIGUSR1 to the job after step 3 was logged: saved after step {stopped_at}, requeued")
    assert 3 <= stopped_at < steps
    from data_prep.tokenizer.checkpoint import read_latest_training_iteration

    assert read_latest_training_iteration(tmp_path / "job" / "ckpt") == stopped_at
    assert not (tmp_path / "job" / "tok.safetensors").exists()

    outputs = two_nodes(tmp_path, argv("job", 0), "launchers/slurm/train_tokenizer.sbatch", per_node=1)  # requeued
    assert any(f"at step {stopped_at}" in out and "resumed from" in out for out in outputs), outputs
    assert_same_run(tmp_path, "one_node", "job", steps)
