"""Run torchrun / launcher subprocesses from tests, with output kept for failure messages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python args...`` in the repo root; raise with the tail of its output if it fails."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc script args`` on a free local port."""
    return run(["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
                script, *args], timeout=timeout)


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process below it at once, like a node failure. torchrun starts its
    workers in their own sessions, so killing the launcher's process group alone leaves them running."""
    import signal

    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


def kill_after_checkpoint(proc: subprocess.Popen, published: Callable[[], int | None], kill_after: int,
                          delay: float, timeout: float = 300, poll: float = 0.02) -> bool:
    """Wait until ``published()`` (the iteration the run's latest pointer names, None before the first)
    reaches ``kill_after``, then ``delay`` seconds more (a random moment inside a later iteration or its
    save), then SIGKILL ``proc``'s whole tree with :func:`kill_process_tree`.

    Returns:
        True if the run was still going when killed, False if it had already exited.
    """
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        step = published()
        if step is not None and step >= kill_after:
            break
        time.sleep(poll)
    time.sleep(delay)
    running = proc.poll() is None
    if running:
        kill_process_tree(proc)
    proc.wait(timeout=60)
    return running
