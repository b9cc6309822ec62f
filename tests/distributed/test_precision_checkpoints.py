"""bf16 checkpoints (megatron backend, TP1 x PP2, dropout on): a run saved at iteration 3 and resumed gives
the uninterrupted run's losses bitwise; conversion writes the checkpoint's fp32 main params; the checkpoint
loads across precisions (bf16 -> fp16 with the optimizer state; bf16 -> fp32 weights only, refused with a
clear message when the optimizer state is asked for)."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data_prep.synthetic import write_synthetic_shards
from tests.dist_utils import REPO, free_port, run, torchrun
from tests.faults.test_resume import tb_losses

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"


def train_args(data, tb, *extra):
    return ["--tp", "1", "--pp", "2", "--config", CONFIG, "--data", str(data), "--train-iters", "6",
            "--tensorboard-dir", str(tb), "--hidden-dropout", "0.1", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16_ckpt")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    torchrun(2, LAUNCHER, *train_args(root / "data", root / "tb_full", "--bf16"))
    torchrun(2, LAUNCHER, *train_args(root / "data", root / "tb_first", "--bf16", "--exit-interval", "3",
                                      "--save", str(root / "ckpt"), "--save-interval", "100"))
    resumed = torchrun(2, LAUNCHER, *train_args(root / "data", root / "tb_resumed", "--bf16", "--load", str(root / "ckpt")))
    return root, resumed.stdout


def test_bf16_resume_is_bitwise(runs):
    root, stdout = runs
    assert "loaded checkpoint" in stdout and "| bf16 |" in stdout
    full, first, resumed = (tb_losses(root / name) for name in ("tb_full", "tb_first", "tb_resumed"))
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    assert [first[i] for i in (1, 2, 3)] == [full[i] for i in (1, 2, 3)]
    assert [resumed[i] for i in (4, 5, 6)] == [full[i] for i in (4, 5, 6)]
    assert full[6] < full[1]


def test_bf16_checkpoint_converts_from_its_fp32_main_params(runs, tmp_path):
    root, _ = runs
    run(["launchers/convert_checkpoint.py", "--load", str(root / "ckpt"), "--output", str(tmp_path / "converted")])
    converted = load_file(str(tmp_path / "converted" / "model.safetensors"))
    dcp_to_torch_save(str(root / "ckpt" / "iter_0000003"), str(tmp_path / "ckpt.pt"))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    main = [v for k, v in saved.items() if k.startswith("optimizer.state.fp32_param.")]
    weights = [v for k, v in saved.items() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16]
    assert main and all(v.dtype == torch.float32 for v in main)
    flat = lambda tensors: torch.cat([t.float().flatten() for t in tensors]).sort().values  # noqa: E731
    ours = flat(converted.values())
    assert all(t.dtype == torch.float32 for t in converted.values())
    assert torch.equal(ours, flat(main))          # every converted value is a saved fp32 main param, exactly
    assert not torch.equal(ours, flat(weights))   # ... not the bf16 weights rounded from them
    assert torch.equal(ours.bfloat16().float().sort().values, flat(weights))


def test_bf16_checkpoint_resumes_in_fp16_with_its_optimizer_state(runs, tmp_path):
    root, _ = runs
    out = torchrun(2, LAUNCHER, *train_args(root / "data", tmp_path / "tb", "--fp16", "--load", str(root / "ckpt"),
                                            "--train-iters", "4", "--initial-loss-scale", "4096"))
    assert "loaded checkpoint" in out.stdout and "iteration 3" in out.stdout and "| fp16 |" in out.stdout
    assert sorted(tb_losses(tmp_path / "tb")) == [4]


def test_bf16_checkpoint_loads_into_fp32_weights_only(runs, tmp_path):
    root, _ = runs
    base = train_args(root / "data", tmp_path / "tb", "--fp32", "--load", str(root / "ckpt"), "--train-iters", "4")
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                              f"--master-port={free_port()}", LAUNCHER, *base], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode != 0
    assert "was trained in bf16 and this run is fp32" in refused.stderr + refused.stdout
    out = torchrun(2, LAUNCHER, *base, "--no-load-optim")
    assert "loaded checkpoint" in out.stdout and "iteration 3" in out.stdout and "| fp32 |" in out.stdout
    assert sorted(tb_losses(tmp_path / "tb")) == [4]
