"""The megatron-core CPU adapter: applied only without CUDA, and its RNG tracker semantics.
(The TP/PP tests run megatron through it end to end.)"""

import subprocess
import sys

import torch

from megatron_nbp.cpu_adapter import CpuRNGStatesTracker


def test_adapter_changes_nothing_when_cuda_is_available():
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "before = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda)\n"
        "from megatron_nbp.cpu_adapter import apply_cpu_adapter\n"
        "import megatron.core.pipeline_parallel.schedules as s\n"
        "assert apply_cpu_adapter() is False\n"
        "assert (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda) == before\n"
        "assert s.torch is torch\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "untouched" in out.stdout, out.stderr[-2000:]


def test_adapter_patches_megatron_on_cpu():
    code = (
        "import torch\n"
        "from megatron_nbp.cpu_adapter import apply_cpu_adapter\n"
        "import megatron.core.pipeline_parallel.schedules as s\n"
        "assert apply_cpu_adapter() is True and apply_cpu_adapter() is True\n"
        "assert s.torch is not torch and s.torch.zeros([], device='cuda').device.type == 'cpu'\n"
        "assert s.torch.nn is torch.nn\n"
        "print('patched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "patched" in out.stdout, out.stderr[-2000:]


def test_cpu_rng_tracker_forks_a_separate_reproducible_stream():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        inner = torch.rand(3)
    outer = torch.rand(3)
    assert torch.equal(outer, outer_expected)  # the default stream is untouched by the fork
    assert torch.equal(inner, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    states = tracker.get_states()
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    tracker.set_states(states)
    with tracker.fork("model-parallel-rng"):
        replay = torch.rand(3)
    assert torch.equal(second, replay) and not torch.equal(second, inner)
