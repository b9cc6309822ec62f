"""Leaving a TP2 x PP2 run early and resuming it (nbp_common.exit_control), against an
uninterrupted run of the same config:

- SIGTERM sent to every rank (each worker process, as SLURM's ``scancel --signal=TERM --full`` or a
  ``--signal`` to the step delivers it; torchrun's agent is not signalled) while the run trains: every
  rank finishes its iteration, one complete checkpoint is published, the job exits with status 0, and
  the run resumed from it (``--load``) logs losses bitwise equal to the uninterrupted run's;
- ``--exit-duration-in-mins`` (TP2, two ranks): stops after the first iteration past the limit, saves,
  exits 0;
- the run record in the checkpoints: ``config.yaml`` reads back (``nbp-pretrain --config``) to the very
  NBPConfig the command line gave, and the common state holds the same record.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from data_prep.synthetic import write_synthetic_shards
from megatron_nbp.checkpointing import iteration_dir, read_latest_iteration
from megatron_nbp.training_log import read_scalars
from tests.dist_utils import REPO, free_port, kill_process_tree, torchrun

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"
ITERS = 8
SIGNAL_AFTER = 2  # the signal is sent once the log line of this iteration appears, half an iteration later


def args(root, tb, *extra: str) -> list[str]:
    return ["--tp", "2", "--pp", "2", "--config", CONFIG, "--data", str(root / "data"), "--train-iters", str(ITERS),
            "--tensorboard-dir", str(root / tb), "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--exit-signal-handler", *extra]


def signal_every_rank_mid_run(root, argv: list[str], timeout: float = 300) -> tuple[int, str, int]:
    """Start the launcher under torchrun, wait for the log line of iteration SIGNAL_AFTER, wait half an
    iteration more (the time the line reports) and send SIGTERM to each of the 4 worker processes.

    Returns:
        (torchrun's exit status, its whole output, the number of workers signalled).
    """
    import psutil

    log = root / "signalled.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                                 f"--master-port={free_port()}", LAUNCHER, *argv], cwd=REPO,
                                env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"iteration +{SIGNAL_AFTER}/ +{ITERS} \|.*per iteration \(ms\): ([0-9.]+)")
        found = None
        while proc.poll() is None and time.monotonic() < deadline and not found:
            found = pattern.search(log.read_text(errors="replace"))
            time.sleep(0.01)
        assert found, f"no log line of iteration {SIGNAL_AFTER}:\n{log.read_text()[-3000:]}"
        time.sleep(float(found.group(1)) / 2000)  # inside the next iteration
        workers = [p for p in psutil.Process(proc.pid).children() if LAUNCHER in " ".join(p.cmdline())]
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc)
    return code, log.read_text(errors="replace"), len(workers)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit_signal")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    full_argv = args(root, "tb_full", "--save", str(root / "ckpt_full"), "--save-interval", "100")
    torchrun(4, LAUNCHER, *full_argv)
    code, output, signalled = signal_every_rank_mid_run(
        root, args(root, "tb_signalled", "--save", str(root / "ckpt"), "--save-interval", "100"))
    stopped = read_latest_iteration(root / "ckpt")
    resumed = torchrun(4, LAUNCHER, *args(root, "tb_resumed", "--save", str(root / "ckpt"), "--load",
                                          str(root / "ckpt"), "--save-interval", "100")).stdout
    timed_argv = args(root, "tb_timed", "--save", str(root / "ckpt_timed"), "--save-interval", "100",
                      "--exit-duration-in-mins", "0.001")
    timed_argv[3] = "1"  # TP2 x PP1: two ranks whose clocks differ, one decision
    timed = torchrun(2, LAUNCHER, *timed_argv).stdout
    return dict(root=root, full_argv=full_argv, code=code, output=output, signalled=signalled, stopped=stopped,
                resumed=resumed, timed=timed)


def test_sigterm_to_every_rank_saves_exits_0_and_resumes_bitwise(runs):
    root, output = runs["root"], runs["output"]
    assert runs["signalled"] == 4, output[-3000:]
    assert runs["code"] == 0, output[-3000:]
    stopped = runs["stopped"]
    assert stopped is not None and SIGNAL_AFTER <= stopped < ITERS, (stopped, output[-3000:])
    assert f"exiting at iteration {stopped} (exit signal received (SIGTERM on this rank)" in output
    assert not list((root / "ckpt").glob("*.tmp"))
    full = read_scalars(root / "tb_full", "lm-loss")
    first = read_scalars(root / "tb_signalled", "lm-loss")
    resumed = read_scalars(root / "tb_resumed", "lm-loss")
    assert sorted(full) == list(range(1, ITERS + 1))
    assert sorted(first) == list(range(1, stopped + 1))  # it finished the iteration it was in, no more
    assert sorted(resumed) == list(range(stopped + 1, ITERS + 1))
    assert f"loaded checkpoint from {root / 'ckpt'} at iteration {stopped}" in runs["resumed"]
    for step in first:
        assert first[step] == full[step], (step, first[step], full[step])
    for step in resumed:
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # bitwise on CPU


def test_exit_duration_stops_and_saves(runs):
    root, timed = runs["root"], runs["timed"]
    assert read_latest_iteration(root / "ckpt_timed") == 1  # start-up alone takes longer than 0.06 s
    assert "exiting at iteration 1 (" in timed and "(--exit-duration-in-mins 0.001)" in timed
    assert sorted(read_scalars(root / "tb_timed", "lm-loss")) == [1]


def test_checkpoint_config_reloads_to_the_same_run(runs):
    from megatron.core import dist_checkpointing

    from megatron_nbp.cli.pretrain import parse_args
    from megatron_nbp.config import NBPConfig
    from megatron_nbp.run_record import read_run_record

    root = runs["root"]
    ckpt = iteration_dir(root / "ckpt_full", ITERS)
    cwd = os.getcwd()
    os.chdir(REPO)  # the command line's relative --config
    try:
        expected = parse_args(runs["full_argv"])
    finally:
        os.chdir(cwd)
    assert expected.train.exit_signal_handler and expected.model.hidden_size == 64
    assert NBPConfig.from_yaml(ckpt / "config.yaml") == expected
    assert parse_args(["--config", str(ckpt / "config.yaml")]) == expected
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    assert common["run_record"] == read_run_record(ckpt)
    assert common["run_record"]["config"] == expected.to_dict()
    assert set(common["run_record"]["versions"]) >= {"torch", "megatron-core", "deepspeed", "megatron-nbp"}
    # the signalled run's checkpoint carries its record too (written before it was published)
    assert NBPConfig.from_yaml(iteration_dir(root / "ckpt", ITERS) / "config.yaml").load == str(root / "ckpt")
