"""Leaving a training run early and cleanly, as Megatron-LM's ``--exit-signal-handler`` and
``--exit-duration-in-mins`` do: on SIGTERM or SIGUSR1 (a scheduler's warning before a wall-time limit or
a preemption), or once the job has run for a given time, every rank finishes the iteration it is in,
the checkpoint is saved and the job exits with status 0, so a requeued job resumes where this one stopped.

:class:`ExitSignalHandler` records on one rank that a signal arrived (the handler only sets a flag: it
never interrupts a collective or a save). :class:`ExitControl` is what the training loop asks after each
iteration (:meth:`ExitControl.check`): the rank-local facts (signal received, time over the limit) are
joined over the world with one MAX all-reduce of two integers, so if any rank was signalled or ran out
of time, all ranks stop after the same iteration and save together. The all-reduce runs every
iteration, and only when one of the two options is on. Used by NBP pretraining
(:mod:`megatron_nbp.training.loop`) and tokenizer training (:mod:`data_prep.tokenizer.train`, signals only).
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["EXIT_SIGNALS", "ExitSignalHandler", "ExitControl"]

#: the signals ``--exit-signal-handler`` turns into "save and exit": SIGTERM (what ``scancel``, a
#: preemption and torchrun's shutdown send) and SIGUSR1 (what ``#SBATCH --signal=USR1@SECONDS`` sends
#: before the time limit, see launchers/slurm/pretrain_nbp.sbatch)
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    """A context manager that, while active, turns the signals ``signals`` into a flag of this process
    (:attr:`received`, the signal's name in :attr:`name`) instead of their default action (termination).
    The handlers it replaced are restored on exit. Must be entered in the main thread (Python delivers
    signals there only).

    Args:
        signals: the signals to catch (default :data:`EXIT_SIGNALS`).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = EXIT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received = False
        self.name: str | None = None
        self._previous: dict[signal.Signals, Callable | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        self.name = signal.Signals(signum).name

    def install(self) -> "ExitSignalHandler":
        """Catch :attr:`signals` from now on (again: no change)."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "ExitSignalHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


class ExitControl:
    """Decides, after each training iteration and identically on every rank, whether the run stops there.

    Args:
        signal_handler: catch SIGTERM / SIGUSR1 (``train.exit_signal_handler``); the handler is active
            between :meth:`__enter__` and :meth:`__exit__`.
        duration_mins: stop once this many minutes have passed since ``start`` (``train.exit_duration_in_mins``;
            None: no limit). Each rank measures its own time; the first over the limit stops all.
        start: ``time.time()`` when the job started (default: now). :func:`megatron_nbp.training.loop.pretrain`
            passes its own start, so start-up and checkpoint loading count, as in Megatron-LM.
        device: where the all-reduced flags live (the rank's training device: a CUDA device under nccl).
        clock: the wall clock (``time.time``; tests pass their own).
    """

    def __init__(self, signal_handler: bool = False, duration_mins: float | None = None,
                 start: float | None = None, device: torch.device | str = "cpu",
                 clock: Callable[[], float] = time.time) -> None:
        self.handler = ExitSignalHandler() if signal_handler else None
        self.duration_mins = duration_mins
        self.clock = clock
        self.start = clock() if start is None else start
        self.device = torch.device(device)

    @classmethod
    def for_run(cls, cfg, start: float | None = None) -> "ExitControl":
        """The control ``cfg.train`` asks for (``exit_signal_handler``, ``exit_duration_in_mins``), its
        signal handler installed (:meth:`install`); the device is set by the training loop."""
        t = cfg.train
        return cls(t.exit_signal_handler, t.exit_duration_in_mins, start=start).install()

    @property
    def enabled(self) -> bool:
        """True when either option is on (otherwise :meth:`check` costs nothing)."""
        return self.handler is not None or self.duration_mins is not None

    def install(self) -> "ExitControl":
        """Install the signal handler, if there is one (main thread only; again: no change)."""
        if self.handler is not None:
            self.handler.install()
        return self

    def restore(self) -> None:
        """Put back the signal handlers :meth:`install` replaced."""
        if self.handler is not None:
            self.handler.restore()

    def __enter__(self) -> "ExitControl":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def elapsed_mins(self) -> float:
        """Minutes of wall time since ``start`` on this rank."""
        return (self.clock() - self.start) / 60.0

    def check(self) -> str | None:
        """Collective when :attr:`enabled` (every rank calls it after every iteration): why the run must
        stop now, the same on every rank, or None to go on. One MAX all-reduce of (signal received, time
        over) on :attr:`device` and one host read; none without a process group (one process).

        Returns:
            "signal" (some rank received SIGTERM / SIGUSR1), "duration" (some rank's elapsed time passed
            ``duration_mins``), or None.
        """
        if not self.enabled:
            return None
        flags = torch.tensor([int(self.handler is not None and self.handler.received),
                              int(self.duration_mins is not None and self.elapsed_mins() > self.duration_mins)],
                             dtype=torch.int32, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, over_time = flags.tolist()
        return "signal" if signalled else "duration" if over_time else None

    def describe(self, reason: str) -> str:
        """The log line's reason for stopping (``reason`` from :meth:`check`)."""
        if reason == "signal":
            local = f" ({self.handler.name} on this rank)" if self.handler is not None and self.handler.received else ""
            return f"exit signal received{local} (--exit-signal-handler)"
        return f"{self.elapsed_mins():.2f} minutes elapsed (--exit-duration-in-mins {self.duration_mins})"
