"""Profiling a window of training iterations with Megatron-LM's flags (both backends).

``--profile --profile-step-start S --profile-step-end E [--profile-ranks 0 ...]`` covers the iterations
logged as ``S+1 .. E`` (Megatron-LM's counting: the window opens once S iterations are done and closes
once E are; its defaults are 10 and 12) on the listed global ranks:

- with ``--use-pytorch-profiler``: torch.profiler (Kineto) records CPU operators and, on CUDA, the GPU
  kernels, with input shapes (no Python stacks: they multiply the trace's size). As in Megatron-LM the
  profiler starts one iteration early and discards it (its own warm-up). When the window closes, each
  profiled rank writes a gzipped Chrome trace ``rank<R>.<time>.pt.trace.json.gz`` into ``--tensorboard-dir``
  (TensorBoard's profiler plugin, https://ui.perfetto.dev or chrome://tracing open it; torch's
  ``tensorboard_trace_handler`` names it) and prints, and writes next to it as
  ``profile_rank<R>_iters<S+1>-<E>.txt``, a summary: the window's wall time per iteration, the fraction of
  it the GPU was busy (the union of kernel intervals over the window: well below 100% means the GPU waits
  for the host) and the operators / kernels taking the most time (torch's ``key_averages`` table);
- without it (CUDA only): ``cudaProfilerStart`` / ``cudaProfilerStop`` around the window and NVTX ranges
  per operator (``torch.autograd.profiler.emit_nvtx``) and per iteration, for
  ``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop``.

Each profiled iteration is labelled ``iteration N`` (a ``record_function`` / NVTX range). Profiling slows
the iterations it records; their iteration times in the log include that.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

__all__ = ["IterationProfiler", "ProfileWindow", "busy_fraction", "profile_summary", "profiler_activities"]

#: rows of the operator table in the printed summary
TABLE_ROWS = 25


@dataclass(frozen=True)
class ProfileWindow:
    """Which iterations and ranks to profile, and how (Megatron-LM's ``--profile*`` flags).

    Attributes:
        start, end: the window opens when ``start`` iterations are done and closes when ``end`` are
            (iterations ``start+1 .. end`` as the log numbers them); 0 <= start < end.
        ranks: global ranks that profile.
        pytorch_profiler: torch.profiler (True) or a CUDA profiler capture range for nsys (False).
        trace_dir: where torch.profiler's trace and summary go (``--tensorboard-dir``).
    """

    start: int
    end: int
    ranks: tuple[int, ...] = (0,)
    pytorch_profiler: bool = True
    trace_dir: str | None = None

    @classmethod
    def from_config(cls, cfg) -> "ProfileWindow | None":
        """The window of an :class:`~megatron_nbp.config.NBPConfig` (validated), None without ``--profile``."""
        t = cfg.train
        if not t.profile:
            return None
        return cls(t.profile_step_start, t.profile_step_end, tuple(t.profile_ranks), t.use_pytorch_profiler,
                   cfg.tensorboard_dir)


def busy_fraction(intervals: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of ``[start, end]`` covered by the union of ``intervals`` (clipped to it).

    Args:
        intervals: ``(begin, finish)`` pairs, e.g. GPU kernel times in microseconds; overlapping ones
            (kernels on several streams) count once.
        start, end: the window, same unit; ``end > start``.

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: ``end <= start``.
    """
    if end <= start:
        raise ValueError(f"empty window [{start}, {end}]")
    covered, reach = 0.0, start
    for begin, finish in sorted((max(b, start), min(f, end)) for b, f in intervals):
        if finish <= reach:
            continue
        covered += finish - max(begin, reach)
        reach = finish
    return covered / (end - start)


def profiler_activities(device: torch.device | str) -> list[torch.profiler.ProfilerActivity]:
    """torch.profiler activities for work on ``device``: the CPU, plus CUDA kernels on a CUDA device."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def _is_device_event(event) -> bool:
    """A kernel or copy on the device. On CUDA the profiler also records every ``record_function`` range a
    second time as a device event (a "GPU user annotation" spanning the range's kernels, idle gaps included):
    those are labels, not work, and would make the device look busy for the whole window."""
    return event.device_type != torch.autograd.DeviceType.CPU and not getattr(event, "is_user_annotation", False)


def _without_device_annotations(events):
    """``events`` without the device copies of ``record_function`` ranges (see :func:`_is_device_event`), so
    they do not top the table by "self device time"; the host ranges stay."""
    kept = [e for e in events
            if e.device_type == torch.autograd.DeviceType.CPU or not getattr(e, "is_user_annotation", False)]
    if len(kept) == len(events):
        return events
    from torch.autograd.profiler_util import EventList

    filtered = EventList(kept, use_device=getattr(events, "_use_device", None),
                         profile_memory=getattr(events, "_profile_memory", False),
                         with_flops=getattr(events, "_with_flops", False))
    filtered._tree_built = getattr(events, "_tree_built", True)  # the kept events keep their parents/children
    return filtered


def profile_summary(events, label_prefix: str = "iteration ", rows: int = TABLE_ROWS,
                    unit: str = "iteration") -> str:
    """The text summary of a profiled window (see the module docstring).

    Args:
        events: torch.profiler's events of the window (``profile.events()``, a FunctionEvent list).
        label_prefix: the name prefix of the per-iteration ranges that delimit the window.
        rows: operator table rows.
        unit: what one labelled range is, for the first line ("iteration", "batch").

    Returns:
        Lines: iterations, wall ms per iteration, device-busy fraction ("n/a" without device events), then
        ``key_averages`` sorted by self device time (self CPU time when nothing ran on a device).
    """
    iterations = [e for e in events
                  if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(label_prefix)]
    kernels = [e for e in events if _is_device_event(e)]
    if not iterations:
        return f"no profiled {unit}s recorded"
    begin = min(e.time_range.start for e in iterations)
    end = max([e.time_range.end for e in iterations] + [k.time_range.end for k in kernels])
    wall_ms = (end - begin) / 1000.0
    busy = (f"{100 * busy_fraction(((k.time_range.start, k.time_range.end) for k in kernels), begin, end):.1f}%"
            if kernels else "n/a (no device events)")
    sort_by = "self_device_time_total" if kernels else "self_cpu_time_total"
    head = (f"{len(iterations)} {unit}(s), {wall_ms / len(iterations):.1f} ms each (wall, profiler on), "
            f"device busy {busy}")
    return head + "\n" + _without_device_annotations(events).key_averages().table(sort_by=sort_by, row_limit=rows)


class IterationProfiler:
    """Drives one :class:`ProfileWindow` from the training loop of this rank.

    The loop calls :meth:`before` with the number of iterations done, wraps the step in
    :meth:`iteration`, calls :meth:`after` with the new count, and :meth:`close` when it leaves (an exit
    signal inside the window still writes what was recorded).

    Args:
        window: the window.
        rank: this process's global rank (profiles only if listed in ``window.ranks``).
        device: this rank's device (CUDA activities are recorded on CUDA only).
        log: where the summary lines go (default: printed, flushed; by every profiled rank).
    """

    def __init__(self, window: ProfileWindow, rank: int, device: torch.device | str, log=None) -> None:
        self.window, self.rank, self.device = window, rank, torch.device(device)
        self.log = log or (lambda text: print(text, flush=True))
        self.enabled = rank in window.ranks
        self._profiler: torch.profiler.profile | None = None
        self._nvtx: contextlib.ExitStack | None = None
        self.summary: str | None = None
        self.trace_files: list[Path] = []

    # ------------------------------------------------------------------ the loop's hooks
    def before(self, done: int) -> None:
        """Called before the iteration ``done + 1``: starts the profiler (warm-up) or the capture range."""
        if not self.enabled:
            return
        w = self.window
        if w.pytorch_profiler:
            if self._profiler is not None:
                self._profiler.step()  # the schedule's next step: warm-up -> recorded iterations
            elif done == w.start - 1:
                self._start_torch_profiler(warmup=1, active=w.end - w.start)
            elif w.start <= done < w.end:  # window 0-based, or a run resumed inside it: no warm-up
                self._start_torch_profiler(warmup=0, active=w.end - done)
            return
        if w.start <= done < w.end and self._nvtx is None:
            self._nvtx = contextlib.ExitStack()
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx.enter_context(torch.autograd.profiler.emit_nvtx(record_shapes=True))

    @contextlib.contextmanager
    def iteration(self, number: int) -> Iterator[None]:
        """Labels iteration ``number`` (1-based, as logged) while a profiler runs, its warm-up iteration
        included (nothing of it reaches the trace: a label there would show a wrong schedule)."""
        if self._profiler is None and self._nvtx is None:
            yield
            return
        if self.window.pytorch_profiler:
            with torch.profiler.record_function(f"iteration {number}"):
                yield
        else:
            torch.cuda.nvtx.range_push(f"iteration {number}")
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()

    def after(self, done: int) -> None:
        """Called once ``done`` iterations are complete: closes the window at ``window.end``."""
        if self.enabled and done >= self.window.end:
            self.close()

    def close(self) -> None:
        """Stop recording (if recording) and write the trace and summary. Safe to call again."""
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            profiler.stop()
        if self._nvtx is not None:
            nvtx, self._nvtx = self._nvtx, None
            torch.cuda.synchronize(self.device)
            nvtx.close()
            torch.cuda.cudart().cudaProfilerStop()
            self.log(f"> profile: rank {self.rank}, iterations {self.window.start + 1}-{self.window.end} in the "
                     "CUDA profiler capture range (nsys)")

    # ------------------------------------------------------------------ torch.profiler
    def _start_torch_profiler(self, warmup: int, active: int) -> None:
        self._profiler = torch.profiler.profile(
            activities=profiler_activities(self.device), record_shapes=True, with_stack=False,
            schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=max(active, 1), repeat=1),
            on_trace_ready=self._write)
        self._profiler.start()

    def _write(self, profiler: torch.profiler.profile) -> None:
        w = self.window
        started = time.perf_counter()
        folder = Path(w.trace_dir or ".")
        pattern = f"rank{self.rank}.*.pt.trace.json.gz"
        before = set(folder.glob(pattern))
        torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{self.rank}", use_gzip=True)(profiler)
        self.trace_files = sorted(set(folder.glob(pattern)) - before)
        self.summary = profile_summary(profiler.events())
        text_path = folder / f"profile_rank{self.rank}_iters{w.start + 1}-{w.end}.txt"
        text_path.write_text(self.summary + "\n")
        trace = ", ".join(str(p) for p in self.trace_files) or "none written"
        self.log(f"> profile: rank {self.rank}, iterations {w.start + 1}-{w.end} | trace {trace} | summary "
                 f"{text_path} (written in {time.perf_counter() - started:.1f} s)\n{self.summary}")
