"""Checkpoints are loaded without trusting pickle (megatron_nbp.safe_loading): a payload that would run
code (here ``os.system("touch MARKER")``) planted in any pickled part of a real checkpoint of either
backend is refused with a message naming the file, and the marker never appears. A control shows the
hole is real: with our check switched off, torch.distributed.checkpoint itself runs the payload."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.safe_loading import UnsafeCheckpointError, safe_torch_load, verify_megatron_checkpoint
from tests.dist_utils import REPO, free_port, torchrun
from data_prep.synthetic import write_synthetic_shards

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"
EXTRA_STATE = "decoder.layers.mlp.linear_fc1._extra_state/shard_0_4"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": _Evil(str(marker))}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A megatron-backend (TP2) and a DeepSpeed ZeRO-2 (DP2) checkpoint of the tiny model, 3 iterations."""
    root = tmp_path_factory.mktemp("safe")
    write_synthetic_shards(root / "data", num_clips=16, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    common = ("--config", CONFIG, "--data", str(root / "data"), "--train-iters", "3")
    torchrun(2, LAUNCHER, *common, "--tp", "2", "--save", str(root / "megatron"))
    torchrun(2, LAUNCHER, *common, "--backend", "deepspeed", "--zero-stage", "2", "--save", str(root / "zero2"))
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _poison_item(ckpt: Path, fqn_prefix: str, payload: bytes) -> None:
    """Point the .metadata entry of one bytes item at ``payload`` appended to its .distcp file."""
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written by the fixture
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.startswith(fqn_prefix))
    target = ckpt / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset, length=len(payload),
                                              transform_descriptors=getattr(info, "transform_descriptors", None))
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _convert(load_dir: Path, out: Path) -> None:
    from megatron_nbp.inference.convert import convert_checkpoint

    convert_checkpoint(str(load_dir), str(out))


def test_intact_checkpoints_pass_the_checks(checkpoints, tmp_path):
    verify_megatron_checkpoint(checkpoints / "megatron" / "iter_0000003")
    for f in sorted((checkpoints / "zero2" / "global_step3").glob("*.pt")):
        assert isinstance(safe_torch_load(f), dict)
    _convert(checkpoints / "megatron", tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").is_file()


def test_poisoned_distcp_item_is_refused_and_never_runs(checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _copy(checkpoints / "megatron", tmp_path / "ckpt")
    _poison_item(ckpt / "iter_0000003", EXTRA_STATE, _payload(marker))
    with pytest.raises(CheckpointError, match="refusing to unpickle .*__0_0.distcp item decoder.layers.mlp"):
        _convert(ckpt, tmp_path / "out")
    assert not marker.exists()


def test_control_without_the_check_torch_runs_the_payload(checkpoints, tmp_path, monkeypatch):
    """The same poisoned checkpoint with verify_megatron_checkpoint switched off: torch.distributed.checkpoint
    unpickles the item with weights_only=False and the payload runs (so the test above can fail)."""
    import megatron_nbp.checkpointing as checkpointing

    marker = tmp_path / "pwned"
    ckpt = _copy(checkpoints / "megatron", tmp_path / "ckpt")
    _poison_item(ckpt / "iter_0000003", EXTRA_STATE, _payload(marker))
    monkeypatch.setattr(checkpointing, "verify_megatron_checkpoint", lambda path: None)  # what verify_checkpoint calls
    try:
        _convert(ckpt, tmp_path / "out")
    except Exception:
        pass  # the payload's return value is no valid extra state; what matters is that it ran
    assert marker.exists()


def test_poisoned_metadata_and_common_pt_are_refused(checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    meta = _copy(checkpoints / "megatron", tmp_path / "meta")
    (meta / "iter_0000003" / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointError, match=r"\.metadata: refusing to unpickle global posix.system"):
        _convert(meta, tmp_path / "out1")
    common = _copy(checkpoints / "megatron", tmp_path / "common")
    (common / "iter_0000003" / "common.pt").write_bytes(_payload(marker))
    with pytest.raises(CheckpointError, match=r"common.pt: it references \['posix.system'"):
        _convert(common, tmp_path / "out2")
    assert not marker.exists()


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={free_port()}", LAUNCHER, *args], cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def test_training_resume_refuses_poisoned_rng_state(checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _copy(checkpoints / "megatron", tmp_path / "ckpt")
    _poison_item(ckpt / "iter_0000003", "rng_state/", _payload(marker))
    proc = _launch("--config", CONFIG, "--data", str(checkpoints / "data"), "--tp", "2", "--train-iters", "4",
                   "--load", str(ckpt))
    assert proc.returncode != 0
    assert "CheckpointError" in proc.stderr and "refusing to unpickle" in proc.stderr and "rng_state" in proc.stderr
    assert not marker.exists()


def test_deepspeed_resume_and_conversion_refuse_poisoned_optimizer_states(checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _copy(checkpoints / "zero2", tmp_path / "zero2")
    (ckpt / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(_payload(marker))
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt: it references \['posix"):
        _convert(ckpt, tmp_path / "out")
    proc = _launch("--config", CONFIG, "--data", str(checkpoints / "data"), "--backend", "deepspeed",
                   "--zero-stage", "2", "--train-iters", "4", "--load", str(ckpt))
    assert proc.returncode != 0
    assert "refusing to unpickle" in proc.stderr and "optim_states.pt" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


def test_safe_torch_load_refuses_and_allows_exactly(tmp_path):
    """Unit level: DeepSpeed's plain records and numpy RNG states load; anything else does not."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = io.BytesIO()
    torch.save({"rng": np.random.get_state(), "stage": ZeroStageEnum(2), "scaler": LossScaler(1.0),
                "t": torch.ones(2)}, good)
    good.seek(0)
    loaded = safe_torch_load(good)
    assert loaded["stage"] == ZeroStageEnum(2) and torch.equal(loaded["t"], torch.ones(2))
    bad = io.BytesIO(_payload(tmp_path / "pwned"))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        safe_torch_load(bad, what="bad.pt")
    assert not (tmp_path / "pwned").exists()
