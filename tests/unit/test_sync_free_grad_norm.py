"""megatron_nbp.sync_free_grad_norm: the gradient norm that replaces megatron-core's local fallback equals
it (float64 reference), reads nothing back to the host (it runs on meta tensors, which have no values to
read; the fallback cannot), and is what megatron's gradient clipping uses after initialize_parallel."""

from __future__ import annotations

import pytest
import torch

from megatron_nbp.sync_free_grad_norm import sync_free_l2_norm, use_sync_free_grad_norm


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (7, 5, 3), (1,), (1000,)]
    return [torch.randn(s, generator=g) * (10.0 ** (i - 2)) for i, s in enumerate(shapes)]


def test_equals_megatrons_fallback_and_a_float64_reference():
    from megatron.core.utils import local_multi_tensor_l2_norm

    grads = _grads()
    ours, none = sync_free_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int), [grads], False)
    reference = torch.cat([t.double().ravel() for t in grads]).norm()
    assert none is None and ours.shape == (1,) and ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    from megatron_nbp.cpu_adapter import apply_cpu_adapter

    apply_cpu_adapter()  # the fallback builds its result with device="cuda" (the CPU on a CPU machine)
    theirs, _ = local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def test_reads_nothing_back_to_the_host():
    from megatron.core.utils import local_multi_tensor_l2_norm

    grads = [t.to("meta") for t in _grads()]
    norm, _ = sync_free_l2_norm(0, None, [grads], False)
    assert norm.device.type == "meta" and norm.shape == (1,)
    with pytest.raises((NotImplementedError, RuntimeError)):  # a value of a meta tensor read on the host
        local_multi_tensor_l2_norm(0, None, [grads], False)
    with pytest.raises(NotImplementedError, match="per_tensor"):
        sync_free_l2_norm(0, None, [grads], True)


def test_megatron_gradient_norm_uses_it_after_initialize_parallel():
    """After initialize_parallel, megatron's own ``get_grad_norm_fp32`` (what its optimizer clips with)
    runs :func:`sync_free_l2_norm` where megatron fell back to its local implementation (no Transformer
    Engine, no apex: CI), and gives the float64 norm; calling the switch again changes nothing."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from megatron_nbp.parallel import destroy_parallel, initialize_parallel

    fallback = clip_grads.multi_tensor_applier is utils.local_multi_tensor_applier  # no TE / apex kernel
    initialize_parallel(1, 1, seed=0)
    try:
        assert (clip_grads.l2_norm_impl is sync_free_l2_norm) == fallback
        assert use_sync_free_grad_norm() == fallback
        grads = _grads(1)
        reference = float(torch.cat([t.double().ravel() for t in grads]).norm())
        assert clip_grads.get_grad_norm_fp32(grads) == pytest.approx(reference, rel=1e-6)
    finally:
        destroy_parallel()
