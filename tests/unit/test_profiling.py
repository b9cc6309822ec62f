"""``--profile`` (megatron_nbp.training.profiling): which iterations a window records, the trace and summary
it writes, the device-busy figure against a hand count, and the refusals of bad profiling flags."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList, FunctionEvent

from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.device import device_plan
from megatron_nbp.training.loop import check_device_support
from megatron_nbp.training.profiling import IterationProfiler, ProfileWindow, busy_fraction, profile_summary


def test_busy_fraction_counts_overlaps_once_and_clips_to_the_window():
    assert busy_fraction([], 0, 10) == 0
    assert busy_fraction([(0, 10)], 0, 10) == 1
    assert busy_fraction([(2, 6), (4, 8)], 0, 10) == pytest.approx(0.6)  # union [2, 8]
    assert busy_fraction([(5, 6), (1, 2), (1.5, 3)], 0, 10) == pytest.approx(0.3)  # unsorted input
    assert busy_fraction([(-5, 2), (9, 20)], 0, 10) == pytest.approx(0.3)  # clipped to [0, 10]
    with pytest.raises(ValueError, match="empty window"):
        busy_fraction([(0, 1)], 3, 3)


def _event(i, name, start, end, device=DeviceType.CPU, thread=0, annotation=False):
    return FunctionEvent(id=i, name=name, thread=thread, start_us=start, end_us=end, device_type=device, stack=[],
                         input_shapes=[], use_device="cuda", is_user_annotation=annotation)


def test_summary_of_device_events_against_a_hand_count():
    """Two iterations on the host over [0, 2000] us, kernels [100, 600], [500, 900] (another stream) and
    [1900, 2200] (the last one outlives the host range, so the window ends at 2200): busy = (800 + 300) /
    2200 = 50.0%, 1.1 ms per iteration, the table sorted by self device time. The device copies of the
    ``record_function`` ranges (CUDA "user annotations" from the first to the last kernel of each range,
    as torch.profiler records them on a GPU) are labels: they count neither as busy time nor as table rows."""
    events = EventList([_event(1, "iteration 1", 0, 1000), _event(2, "iteration 2", 1000, 2000),
                        _event(3, "aten::mm", 10, 100),
                        _event(4, "gemm_kernel", 100, 600, DeviceType.CUDA),
                        _event(5, "gemm_kernel", 500, 900, DeviceType.CUDA, thread=1),
                        _event(6, "adam_kernel", 1900, 2200, DeviceType.CUDA, thread=1),
                        _event(7, "iteration 1", 100, 900, DeviceType.CUDA, thread=2, annotation=True),
                        _event(8, "iteration 2", 1900, 2200, DeviceType.CUDA, thread=2, annotation=True),
                        _event(9, "optimizer", 0, 2200, DeviceType.CUDA, thread=3, annotation=True)],
                       use_device="cuda")
    events._build_tree()
    text = profile_summary(events)
    head, table = text.splitlines()[0], text.splitlines()[4:]
    assert head == "2 iteration(s), 1.1 ms each (wall, profiler on), device busy 50.0%"
    assert table[0].split()[0] == "gemm_kernel" and table[1].split()[0] == "adam_kernel"
    assert "optimizer" not in text


def _trace_iterations(path) -> list[str]:
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("iteration "))


def _loop(profiler: IterationProfiler, first: int, last: int, stop_after: int | None = None) -> None:
    """The training loop's calls, with a little CPU work as the step."""
    x = torch.randn(32, 32)
    done = first
    while done < last:
        profiler.before(done)
        with profiler.iteration(done + 1):
            (x @ x).sum()
        done += 1
        profiler.after(done)
        if stop_after is not None and done == stop_after:
            break
    profiler.close()


@pytest.mark.parametrize("start,end,first,last,stop_after,expected", [
    (2, 4, 0, 6, None, [3, 4]),       # warm-up at iteration 2, not in the trace
    (0, 2, 0, 4, None, [1, 2]),       # no iteration before the window: no warm-up
    (2, 5, 3, 6, None, [4, 5]),       # resumed inside the window
    (1, 5, 0, 6, 3, [2, 3]),          # the loop leaves inside the window (exit signal): what was recorded
])
def test_the_window_records_exactly_its_iterations(tmp_path, start, end, first, last, stop_after, expected):
    lines = []
    profiler = IterationProfiler(ProfileWindow(start, end, (0,), True, str(tmp_path)), 0, "cpu", log=lines.append)
    _loop(profiler, first, last, stop_after)
    traces = list(tmp_path.glob("rank0.*.pt.trace.json.gz"))
    assert len(traces) == 1 and profiler.trace_files == traces
    assert _trace_iterations(traces[0]) == [f"iteration {n}" for n in expected]
    summary = (tmp_path / f"profile_rank0_iters{start + 1}-{end}.txt").read_text()
    assert summary.startswith(f"{len(expected)} iteration(s), ") and "device busy n/a" in summary
    assert "aten::mm" in summary and lines[0].startswith(f"> profile: rank 0, iterations {start + 1}-{end} | ")


def test_ranks_not_listed_and_windows_already_done_record_nothing(tmp_path):
    other = IterationProfiler(ProfileWindow(1, 3, (1,), True, str(tmp_path)), 0, "cpu", log=print)
    _loop(other, 0, 4)
    past = IterationProfiler(ProfileWindow(1, 3, (0,), True, str(tmp_path)), 0, "cpu", log=print)
    _loop(past, 3, 5)  # resumed after the window
    assert list(tmp_path.iterdir()) == [] and other.summary is None and past.summary is None


def _cfg(tmp_path, **train):
    overrides = {f"train.{k}": v for k, v in train.items()}
    overrides.setdefault("train.train_iters", 20)
    return NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {**overrides, "data": str(tmp_path)})


@pytest.mark.parametrize("train,extra,message", [
    ({"use_pytorch_profiler": True}, {}, "--use-pytorch-profiler given without --profile"),
    ({"profile_step_start": 3, "profile_ranks": [1]}, {}, "--profile-step-start / --profile-ranks given without"),
    ({"profile": True, "profile_step_start": 5, "profile_step_end": 5}, {}, "need 0 <= start < end"),
    ({"profile": True, "profile_step_end": 30}, {}, "--profile-step-end 30 is past --train-iters 20"),
    ({"profile": True, "profile_ranks": [0, 4]}, {}, r"--profile-ranks \[4\]: not ranks of this run \(world size 4\)"),
    ({"profile": True, "profile_ranks": []}, {}, "--profile-ranks is empty"),
    ({"profile": True, "use_pytorch_profiler": True}, {}, "writes its trace and summary to --tensorboard-dir"),
])
def test_bad_profiling_flags_are_refused_before_any_work(tmp_path, train, extra, message):
    cfg = _cfg(tmp_path, **train)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=4)


def test_good_profiling_flags_pass_and_nsys_capture_needs_cuda(tmp_path):
    cfg = _cfg(tmp_path, profile=True, use_pytorch_profiler=True, profile_ranks=[0, 3])
    cfg.tensorboard_dir = str(tmp_path / "tb")
    cfg.validate(world_size=4)
    check_device_support(cfg, device_plan(cuda_available=False))  # torch.profiler runs on the CPU
    window = ProfileWindow.from_config(cfg)
    assert window == ProfileWindow(10, 12, (0, 3), True, str(tmp_path / "tb"))
    nsys = _cfg(tmp_path, profile=True)
    nsys.validate(world_size=1)
    with pytest.raises(ConfigError, match="--profile without --use-pytorch-profiler .* needs a CUDA GPU"):
        check_device_support(nsys, device_plan(cuda_available=False))
    assert ProfileWindow.from_config(_cfg(tmp_path)) is None
