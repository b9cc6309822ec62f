"""Save at iteration k, resume, and the next losses equal an uninterrupted run (TP2 x PP2, dropout on,
shuffled data): model, optimizer, scheduler, RNG and data position are all restored."""

import pytest

from megatron_nbp.checkpointing import LATEST_FILE
from megatron_nbp.training_log import read_scalars
from tests.dist_utils import torchrun
from data_prep.synthetic import write_synthetic_shards

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"


def tb_losses(logdir) -> dict[int, float]:
    """Per-iteration lm-loss a run wrote to TensorBoard."""
    return read_scalars(logdir, "lm-loss")


def train(data, tb, exit_interval=None, save=None, load=None, save_interval=None):
    args = ["--tp", "2", "--pp", "2", "--config", CONFIG, "--data", str(data), "--train-iters", "6",
            "--tensorboard-dir", str(tb), "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    if save:
        args += ["--save", str(save), "--save-interval", str(save_interval)]
    if load:
        args += ["--load", str(load)]
    if exit_interval:
        args += ["--exit-interval", str(exit_interval)]
    return torchrun(4, LAUNCHER, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    train(root / "data", root / "tb_full")
    # "interrupted" after iteration 3 (Megatron's --exit-interval saves and exits), then resumed
    train(root / "data", root / "tb_first", exit_interval=3, save=root / "ckpt", save_interval=100)
    out = train(root / "data", root / "tb_resumed", save=root / "ckpt", load=root / "ckpt", save_interval=3)
    return root, out.stdout


def test_resumed_losses_equal_uninterrupted(runs):
    root, stdout = runs
    assert "loaded checkpoint" in stdout and "iteration 3" in stdout
    full, first, resumed = (tb_losses(root / name) for name in ("tb_full", "tb_first", "tb_resumed"))
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == full[step]
    for step in (4, 5, 6):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    assert full[6] < full[1]


def test_checkpoint_layout_is_megatron_style(runs):
    root, _ = runs
    ckpt = root / "ckpt"
    assert (ckpt / LATEST_FILE).read_text().strip() == "6"
    assert (ckpt / "iter_0000003" / "metadata.json").is_file() and (ckpt / "iter_0000006").is_dir()
    assert not list(ckpt.glob("*.tmp"))


@pytest.fixture(scope="module")
def killed_run(runs, tmp_path_factory):
    """A TP2 x PP2 run saving every iteration, SIGKILLed (whole process tree, like a node failure) at a
    random moment after a random number of published checkpoints and before its last one (a try that
    ended first is thrown away and repeated with an earlier kill: tests.dist_utils.kill_before_the_end),
    then restarted with --load until the end.

    Returns:
        (work dir, seed, the Kill, mtimes of the latest pointer and of the newest file of the checkpoint it
        named, both read before the restart, stdout of the restarted run)
    """
    import os
    import random
    import shutil
    import subprocess
    import sys
    import time

    from megatron_nbp.checkpointing import iteration_dir, read_latest_iteration
    from tests.dist_utils import REPO, free_port, kill_before_the_end

    root, _ = runs
    work = tmp_path_factory.mktemp("killed")
    seed = int(os.environ.get("RESUME_KILL_SEED", time.time_ns() % 1_000_000))
    args = ["--tp", "2", "--pp", "2", "--config", CONFIG, "--data", str(root / "data"), "--train-iters", "6",
            "--tensorboard-dir", str(work / "tb_killed"), "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--save", str(work / "ckpt"), "--save-interval", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def start() -> subprocess.Popen:
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        shutil.rmtree(work / "tb_killed", ignore_errors=True)
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                                 f"--master-port={free_port()}", LAUNCHER, *args], cwd=REPO, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    rng = random.Random(seed)
    # the agent and every worker at once, inside a later iteration or inside its save
    kill = kill_before_the_end(start, lambda: read_latest_iteration(work / "ckpt"), last=6,
                               kill_after=rng.randint(1, 4), delay=rng.uniform(0.0, 0.8))
    ckpt = iteration_dir(work / "ckpt", kill.latest)
    written = ((work / "ckpt" / LATEST_FILE).stat().st_mtime, max(f.stat().st_mtime for f in ckpt.rglob("*")))
    out = train(root / "data", work / "tb_resumed", save=work / "ckpt", load=work / "ckpt", save_interval=1)
    return work, seed, kill, written, out.stdout


def test_sigkill_at_a_random_point_then_resume_equals_uninterrupted(runs, killed_run):
    root, _ = runs
    work, seed, kill, written, stdout = killed_run
    info = (seed, kill)
    assert 1 <= kill.latest < 6, info  # killed before the last checkpoint: something is left to compare
    assert max(written) <= kill.killed_at, (info, written)  # what --load takes was written by the killed run
    assert f"loaded checkpoint from {work / 'ckpt'} at iteration {kill.latest}" in stdout, (info, stdout[-2000:])
    full, resumed = tb_losses(root / "tb_full"), tb_losses(work / "tb_resumed")
    assert sorted(resumed) == list(range(kill.latest + 1, 7)), (info, sorted(resumed))
    compared = 0
    for step in resumed:
        assert resumed[step] == full[step], (info, step, resumed[step], full[step])  # bitwise on CPU
        compared += 1
    assert compared >= 1, info


def test_interrupted_save_is_never_latest_and_a_damaged_one_is_refused(runs, tmp_path):
    """A half-written iter_*.tmp next to a complete checkpoint: --load takes the complete one. A
    checkpoint with a shard file removed: --load fails naming the checkpoint."""
    import shutil

    from megatron_nbp.checkpointing import read_latest_iteration

    root, _ = runs
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    shutil.copytree(ckpt / "iter_0000006", ckpt / "iter_0000009.tmp")     # what a crash mid-save leaves
    for f in list((ckpt / "iter_0000009.tmp").iterdir())[:2]:
        f.unlink()
    assert read_latest_iteration(ckpt) == 6
    other = failing_run("--config", "tests/configs/tiny_test_llama.yaml", "--data", str(root / "data"),
                        "--load", str(ckpt))                                     # another model: refused by name
    assert "does not match the model" in other and "normalization: checkpoint LayerNorm vs model RMSNorm" in other
    for f in (ckpt / "iter_0000006").glob("*.distcp"):
        f.unlink()
        break
    damaged = failing_run("--config", CONFIG, "--data", str(root / "data"), "--load", str(ckpt))
    assert "iter_0000006 is damaged or does not fit this model" in damaged and "No such file" in damaged


def failing_run(*args: str) -> str:
    """Run the TP2 x PP2 launcher for 7 iterations, expect it to fail, return its whole output."""
    import os
    import subprocess
    import sys

    from tests.dist_utils import REPO, free_port

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                           f"--master-port={free_port()}", LAUNCHER, "--tp", "2", "--pp", "2", "--train-iters", "7",
                           *args], cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr
