"""Run torchrun / launcher subprocesses from tests, with output kept for failure messages; kill a run in
the middle of its work (:func:`kill_before_the_end`); fork the ranks of a distributed job from one process
that paid the imports (:func:`fork_job`, for the tests/workers/crash_*.py workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_nbp.process_utils import free_port, kill_process_tree  # noqa: F401 (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python args...`` in the repo root (a ``tests/...py`` script as its module, see
    :func:`torchrun`); raise with the tail of its output if it fails."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if args and args[0].startswith("tests/") and args[0].endswith(".py"):
        args = ["-m", args[0][:-3].replace("/", "."), *args[1:]]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc script args`` on a free local port, in the repo root. A test
    worker (``tests/workers/x.py``) runs as the module ``tests.workers.x`` (torchrun's ``-m``), so it can
    import the test helpers; launchers run as scripts."""
    target = ["-m", script[:-3].replace("/", ".")] if script.startswith("tests/") else [script]
    return run(["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
                *target, *args], timeout=timeout)


@dataclass
class Kill:
    """How :func:`kill_before_the_end` ended a run.

    Attributes:
        latest: the iteration the run's latest pointer named once every process was dead (always below
            the run's last iteration).
        killed_at: ``time.time()`` once every process of the run was dead: anything the run wrote is older.
        attempts: one line per try (kill point, delay, outcome), for failure messages.
    """

    latest: int
    killed_at: float
    attempts: list[str]


def kill_before_the_end(start: Callable[[], subprocess.Popen], published: Callable[[], int | None], last: int,
                        kill_after: int, delay: float, tries: int = 3, timeout: float = 300,
                        poll: float = 0.02) -> Kill:
    """SIGKILL a run (its whole process tree, :func:`kill_process_tree`) in the middle of its work, never after it.

    ``start()`` launches the run (into an empty checkpoint directory: it is called again for every try) and
    ``published()`` reads the iteration its latest pointer names (None before the first checkpoint). The kill
    comes ``delay`` seconds after ``published()`` reached ``kill_after``: a random moment inside a later
    iteration or its save. A try in which the run had already exited, or had already published its ``last``
    checkpoint, when the kill came proves nothing about resuming (nothing would be left to compare); it is
    thrown away and the run started again with an earlier kill: after the first checkpoint with a quarter of
    the delay, then with none; ``tries`` in all.

    Returns:
        the :class:`Kill` of the first try that killed the run before its last checkpoint.

    Raises:
        AssertionError: every try ended before its kill, the run failed on its own, or no checkpoint appeared
            within ``timeout`` seconds; the message lists the tries.
    """
    import time

    attempts = []
    for attempt in range(tries):
        after, wait = (kill_after, delay) if attempt == 0 else (1, delay / 4 if attempt == 1 else 0.0)
        proc = start()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            step = published()
            if step is not None and step >= after:
                break
            time.sleep(poll)
        end = time.monotonic() + wait
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(min(poll, max(end - time.monotonic(), 0.0)))
        running = proc.poll() is None
        kill_process_tree(proc)  # also when it has exited: nothing it started may survive
        killed_at = time.time()
        latest = published()
        outcome = (f"try {attempt + 1}: kill after checkpoint {after} + {wait:.3f} s: exit status "
                   f"{'killed' if running else proc.returncode}, latest checkpoint {latest}")
        attempts.append(outcome)
        if not running and proc.returncode != 0:
            raise AssertionError(f"the run failed before the kill: {attempts}")
        if latest is None:
            raise AssertionError(f"no checkpoint within {timeout} s: {attempts}")
        if running and latest < last:
            return Kill(latest, killed_at, attempts)
    raise AssertionError(f"every try ended before its kill (the run is faster than the kill points): {attempts}")


CRASH_EXIT = 86  # exit status of a worker made to crash on purpose (tests/workers/crash_*.py)


def fork_job(nproc: int, target: Callable[[int], None], log_dir: str | Path, timeout: float = 300) -> list[int]:
    """Run ``target(rank)`` in ``nproc`` forked processes that form one torch.distributed job the way
    torchrun's workers do (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a
    free port), without paying the imports again: call it from a process that has imported what ``target``
    needs and has started no thread and no process group (checked). When a rank exits with a non-zero status
    the others are SIGKILLed at once, as torchrun's agent ends a job whose worker failed.

    Each rank runs in its own process group, SIGKILLed when the job ends (what a rank started dies with the
    job). Each rank's stdout and stderr go to ``log_dir/rank{r}.log`` (line-buffered). ``target`` returning
    means exit status 0, an exception prints its traceback and means 1, ``SystemExit`` its code (a string:
    printed, then 1). A rank that succeeded waits for the others before it exits: rank 0 hosts the job's
    store (torchrun's agent does under torchrun), which the others may still need to shut down.

    Returns:
        Each rank's exit status (negative: killed by that signal; ranks killed by this function after
        another failed read ``-9``).

    Raises:
        RuntimeError: the calling process runs more than one thread (fork would copy a held lock).
        TimeoutError: the job ran past ``timeout`` seconds (every rank is killed first).
    """
    import signal
    import threading
    import time
    import traceback

    if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1:
        raise RuntimeError("fork_job needs a single-threaded caller")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for done in log_dir.glob(".done*"):
        done.unlink()
    port = str(free_port())
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                os.setpgid(0, 0)  # its own process group: what it starts is ended with it (below)
                log = os.open(log_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.stdout.reconfigure(line_buffering=True)  # a rank killed later keeps what it printed
                sys.stderr.reconfigure(line_buffering=True)
                os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                                  LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
                target(rank)
                code = 0
            except SystemExit as err:
                if isinstance(err.code, str):
                    print(err.code, file=sys.stderr)
                code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported in the log, the status says it failed
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                if code == 0:  # rank 0 hosts the job's store: stay until every rank is done with it
                    (log_dir / f".done{rank}").touch()
                    while len(list(log_dir.glob(".done*"))) < nproc:
                        time.sleep(0.01)
                os._exit(code)
        pids.append(pid)
    status: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(status) < nproc:
        for rank, pid in enumerate(pids):
            if rank not in status:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[rank] = os.waitstatus_to_exitcode(raw)
        failed = any(code != 0 for code in status.values())
        if failed or time.monotonic() > deadline:
            for rank, pid in enumerate(pids):
                if rank not in status:
                    os.kill(pid, signal.SIGKILL)
                    status[rank] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if not failed:
                _end_groups(pids)
                raise TimeoutError(f"forked job of {nproc} ranks ran past {timeout} s (logs in {log_dir})")
        time.sleep(0.01)
    _end_groups(pids)
    return [status[rank] for rank in range(nproc)]


def _end_groups(pids: list[int]) -> None:
    """SIGKILL what the (finished) ranks of :func:`fork_job` left running in their process groups: helper
    processes such as the multiprocessing manager megatron's checkpoint writer spawns, which outlive a rank
    that ends with ``os._exit`` or a signal."""
    import signal

    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def read_logs(log_dir: str | Path) -> str:
    """The ``rank{r}.log`` files :func:`fork_job` wrote, concatenated in rank order."""
    return "".join(p.read_text(errors="replace") for p in sorted(Path(log_dir).glob("rank*.log")))
