"""Device placement decided in one place (megatron_nbp.device), checked without a GPU: the decisions a GPU
machine gets (CUDA availability passed in as True), and that the training path follows whatever plan it is
given (the model built for the plan, batches moved through it, masks built on its device)."""

import dataclasses

import pytest
import torch

from megatron_nbp.config import ModelConfig, NBPConfig
from megatron_nbp.device import DevicePlan, device_plan, move_batch, to_device
from megatron_nbp.layouts import frame_prediction_batch

CPU = device_plan(cuda_available=False)


def test_gpu_machine_gets_its_local_gpu_nccl_gpu_initialization_pinned_copies_and_bf16(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    plan = device_plan(cuda_available=True)
    assert plan == DevicePlan(device=torch.device("cuda", 3), distributed_backend="nccl",
                              use_cpu_initialization=False, pin_memory=True, default_precision="bf16")
    assert plan.is_cuda and plan.resolve_precision("auto") == "bf16" and plan.resolve_precision("fp32") == "fp32"
    assert device_plan(local_rank=1, cuda_available=True).device == torch.device("cuda", 1)
    assert device_plan(cuda_available=True, device="cuda").device == torch.device("cuda", 3)


def test_availability_defaults_to_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_plan(local_rank=0).device == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_plan(local_rank=0) == CPU


def test_cpu_machine_gets_cpu_gloo_cpu_initialization_and_fp32():
    assert CPU == DevicePlan(device=torch.device("cpu"), distributed_backend="gloo", use_cpu_initialization=True,
                             pin_memory=False, default_precision="fp32")
    assert CPU.resolve_precision("auto") == "fp32"
    forced = device_plan(cuda_available=True, device="cpu")  # --device cpu on a GPU machine
    assert forced.device.type == "cpu" and forced.distributed_backend == "gloo"


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        device_plan(cuda_available=False, device="cuda:0")
    with pytest.raises(ValueError, match="local rank"):
        device_plan(local_rank=-1, cuda_available=True)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        CPU.resolve_precision("fp8")


def test_megatron_config_follows_the_plan():
    from megatron_nbp.model.builder import transformer_config

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, latent_shape=(5, 4, 4),
                        block_shape=(1, 1, 4))
    gpu = transformer_config(model, precision="bf16", plan=device_plan(local_rank=0, cuda_available=True))
    assert gpu.use_cpu_initialization is False and gpu.batch_p2p_sync is True
    assert gpu.bf16 and gpu.params_dtype == torch.bfloat16 and gpu.pipeline_dtype == torch.bfloat16
    cpu = transformer_config(model, precision="fp32", plan=CPU)
    assert cpu.use_cpu_initialization is True and cpu.batch_p2p_sync is False and not cpu.bf16


def test_batches_move_through_the_plan():
    batch = frame_prediction_batch(torch.randint(0, 100, (2, 80)), 4, (5, 4, 4), (1, 1, 4))
    moved = move_batch(batch, CPU)
    assert type(moved) is type(batch) and moved is not batch
    for field in dataclasses.fields(batch):
        a, b = getattr(batch, field.name), getattr(moved, field.name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert to_device(None, CPU) is None


def test_forward_step_moves_the_batch_and_builds_the_mask_on_the_plan_device(monkeypatch):
    """What only a GPU would reveal, seen on a CPU: with a GPU plan, the forward step hands the model
    tensors that went through move_batch for that plan, and a mask built for that plan's device."""
    from megatron_nbp.model import attention
    from megatron_nbp.training import step as step_pieces

    plan = device_plan(local_rank=2, cuda_available=True)
    moved_for, built_on = [], []

    def fake_move(batch, p):
        moved_for.append(p)
        return dataclasses.replace(batch, tokens=batch.tokens + 0)  # a new tensor, as a device copy would be

    def fake_mask(block_ids, key_padding=None, device=None):
        built_on.append(device)
        return "mask"

    monkeypatch.setattr(step_pieces, "move_batch", fake_move)
    monkeypatch.setitem(attention.ATTENTION_BACKENDS, "dense", (attention.BlockCausalSDPAttention, fake_mask))
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml").model
    step = step_pieces.make_forward_step(cfg, plan=plan)
    batch = frame_prediction_batch(torch.randint(0, 100, (2, 80)), 4, (5, 4, 4), (1, 1, 4))
    seen = {}

    class Model:
        training = True

        def __call__(self, tokens, positions, mask, labels):
            seen.update(tokens=tokens, mask=mask)
            return torch.zeros(2, 76)

    for _ in range(3):
        step(iter([batch]), Model())
    assert moved_for == [plan] * 3
    assert built_on == [torch.device("cuda", 2)]  # once per layout, on the plan's GPU
    assert seen["mask"] == "mask" and seen["tokens"] is not batch.tokens


def test_mask_cache_rebuilds_only_when_the_layout_or_padding_changes():
    from megatron_nbp.training import MaskCache

    cache = MaskCache("dense", "cpu")
    ids = torch.arange(12).view(1, 12) // 4
    first = cache(ids.expand(2, 12))
    assert cache(ids.expand(2, 12).clone()) is first
    assert first.shape == (1, 1, 12, 12)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 0] = True
    padded = cache(ids.expand(2, 12), pad)
    assert padded is not first and padded.shape == (2, 1, 12, 12) and padded[1, 0, 5, 0]
    assert cache(ids.expand(2, 12), pad.clone()) is padded
    assert cache(torch.arange(12).view(1, 12) // 3) is not padded
