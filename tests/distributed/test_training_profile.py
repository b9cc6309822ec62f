"""``--profile --use-pytorch-profiler`` in a real training job (megatron backend, TP2 on 2 gloo ranks, both
ranks profiling iterations 3-4 of 5): each rank writes one trace holding exactly those iterations and a
summary, and the run's losses equal an unprofiled run's (profiling observes, it changes nothing)."""

from __future__ import annotations

import gzip
import json
import re

from data_prep.synthetic import write_synthetic_shards
from tests.dist_utils import torchrun

LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* lm loss: (\S+) \|")


def _losses(stdout: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in LOSS.findall(stdout)}


def test_profiled_run_records_its_window_and_trains_the_same(tmp_path):
    write_synthetic_shards(tmp_path / "data", num_clips=32, clips_per_shard=8, latent_shape=(5, 4, 4), seed=0,
                           vocab=64)
    common = ["--config", "tests/configs/tiny_test.yaml", "--data", str(tmp_path / "data"), "--vocab-size", "64",
              "--tp", "2", "--train-iters", "5", "--fp32"]
    plain = torchrun(2, "launchers/pretrain_nbp.py", *common).stdout
    tb = tmp_path / "tb"
    profiled = torchrun(2, "launchers/pretrain_nbp.py", *common, "--profile", "--use-pytorch-profiler",
                        "--profile-step-start", "2", "--profile-step-end", "4", "--profile-ranks", "0", "1",
                        "--tensorboard-dir", str(tb)).stdout
    assert sorted(_losses(plain)) == [1, 2, 3, 4, 5]
    assert _losses(profiled) == _losses(plain)
    for rank in (0, 1):
        traces = list(tb.glob(f"rank{rank}.*.pt.trace.json.gz"))
        assert len(traces) == 1, traces
        with gzip.open(traces[0], "rt") as f:
            names = [e.get("name", "") for e in json.load(f)["traceEvents"]]
        assert sorted(n for n in names if n.startswith("iteration ")) == ["iteration 3", "iteration 4"]
        assert any("allreduce" in n for n in names)  # the tensor-parallel all-reduces are in the trace
        summary = (tb / f"profile_rank{rank}_iters3-4.txt").read_text()
        assert summary.startswith("2 iteration(s), ")
        assert f"> profile: rank {rank}, iterations 3-4 | trace {traces[0]}" in profiled
