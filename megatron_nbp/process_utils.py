"""Process helpers for jobs that start or stop other jobs (benchmarks, tests, the launchers' local
worlds): a free local port for a rendezvous, and killing a whole process tree the way a node failure does."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT / torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_process_tree(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL a launcher and every process below it at once, like a node failure, and wait for them.

    torchrun starts its workers in their own sessions, so killing the launcher's process group alone
    would leave them running; the tree is read from /proc (psutil) before anything is killed.
    """
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
    proc.wait(timeout=timeout)
    psutil.wait_procs(family, timeout=timeout / 2)
