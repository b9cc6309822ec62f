"""GPU-only checks (skipped without CUDA; CI has no GPU): compiled FlexAttention against the dense
reference in fp32 and bf16, and the Transformer Engine layer spec against the local spec."""

import pytest
import torch

from megatron_nbp.layouts import frame_prediction_block_ids, hybrid_block_ids
from megatron_nbp.masks import block_causal_allowed, block_causal_block_mask
from megatron_nbp.model.spec import transformer_engine_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["frame_prediction", "hybrid"])
def test_compiled_flex_matches_dense_forward_and_backward(dtype, tol, layout):
    """Paper shape: nbp-xl heads (16 x 96), seq 1264 (frame prediction) / 1281 (hybrid), batch 2."""
    from torch.nn.attention.flex_attention import flex_attention

    ids = frame_prediction_block_ids(1264, 16) if layout == "frame_prediction" else hybrid_block_ids(1, 1280, 16)
    ids = ids.cuda().unsqueeze(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, ids.shape[1], 96, device="cuda", generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    allowed = block_causal_allowed(ids).unsqueeze(1)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block_causal_block_mask(ids))
    out.float().square().sum().backward()
    assert rel(out, ref) <= tol
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads):
        assert rel(got, want) <= tol


def by_checkpoint_key(model):
    """Parameters by (global checkpoint key, offset): the identity dist_checkpointing uses."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return {(v.key, tuple(v.global_offset)): v.data for v in model.sharded_state_dict().values()
            if isinstance(v, ShardedTensor)}


@pytest.mark.skipif(not transformer_engine_available(), reason="needs transformer-engine")
def test_transformer_engine_spec_matches_local_spec():
    """The same weights in the TE spec (norm fused into QKV / fc1) and the local spec give the same
    logits (fp32); the local spec's checkpoint keys are the TE ones, so weights are copied by
    sharded key."""
    from megatron_nbp.config import ModelConfig
    from megatron_nbp.layouts import frame_prediction_batch
    from megatron_nbp.model.builder import build_gpt_model
    from megatron_nbp.parallel import destroy_parallel, initialize_parallel
    from megatron_nbp.training import MaskCache

    cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=1000,
                      latent_shape=(5, 8, 8), block_shape=(1, 1, 8))
    initialize_parallel(1, 1, seed=0)
    try:
        local = build_gpt_model(cfg).cuda().eval()
        cfg.transformer_impl = "transformer_engine"
        te = build_gpt_model(cfg).cuda().eval()
        local_sd, te_sd = by_checkpoint_key(local), by_checkpoint_key(te)
        assert set(local_sd) == set(te_sd) and len(local_sd) > 10
        with torch.no_grad():
            for key, tensor in local_sd.items():
                te_sd[key].copy_(tensor)
        batch = frame_prediction_batch(torch.randint(0, 1000, (2, 320)), 8, (5, 8, 8), (1, 1, 8))
        mask = MaskCache("dense")(batch.block_ids.cuda())
        with torch.no_grad():
            a = local(batch.tokens.cuda(), batch.position_ids.cuda(), mask)
            b = te(batch.tokens.cuda(), batch.position_ids.cuda(), mask)
        assert rel(b, a) <= 1e-4
    finally:
        destroy_parallel()
