"""The model-FLOPs formula (megatron_nbp.flops) against a hand count, against torch's FLOP counter on a real
forward and backward of the decoder, and its attention term against the block-causal mask itself."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_nbp.config import ModelConfig
from megatron_nbp.flops import (attention_pairs, forward_flops_per_sample, peak_tflops,
                                training_flops_per_iteration)
from megatron_nbp.layouts import frame_prediction_block_ids, hybrid_block_ids
from megatron_nbp.masks import block_causal_allowed


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=32, vocab_size=128,
                make_vocab_size_divisible_by=128, latent_shape=(3, 1, 2), block_shape=(1, 1, 2))
    return ModelConfig(**{**base, **kw})


def test_hand_count_of_a_one_layer_model():
    # frame prediction, N = 6 video tokens, L = 2: s = N - L = 4 positions in blocks [0, 0, 1, 1];
    # allowed pairs A = 2 queries x 2 keys + 2 queries x 4 keys = 12; h = 8, f = 32, V = 128
    m = tiny()
    assert (m.seq_length, m.padded_vocab_size) == (4, 128)
    assert attention_pairs(m) == 12
    qkv = 2 * 4 * 8 * 24          # 2 s h (3h)     = 1536
    scores_and_values = 4 * 8 * 12  # 2 h A + 2 h A  = 384
    proj = 2 * 4 * 8 * 8          # 2 s h h         = 512
    mlp = 2 * 4 * 8 * 32 * 2      # 2 s h f x 2     = 4096
    logits = 2 * 4 * 8 * 128      # 2 s h V         = 8192
    assert forward_flops_per_sample(m) == qkv + scores_and_values + proj + mlp + logits == 14720
    assert training_flops_per_iteration(m, global_batch_size=2) == 3 * 14720 * 2 == 88320
    swiglu = tiny(activation="swiglu")  # fc1 is 2f wide: 2 s h (2f) + 2 s f h
    assert forward_flops_per_sample(swiglu) == 14720 + 2 * 4 * 8 * 32


@pytest.mark.parametrize("layout", ["frame_prediction", "hybrid"])
def test_attention_pairs_equal_the_mask(layout):
    kw = dict(latent_shape=(5, 4, 4), block_shape=(1, 1, 4), num_layers=2, hidden_size=16, num_attention_heads=2)
    if layout == "hybrid":
        m = tiny(layout="hybrid", condition_type="text", text_vocab_size=50, num_condition_tokens=3, **kw)
        ids = hybrid_block_ids(3, m.num_video_tokens, m.block_size)
    else:
        m = tiny(**kw)
        ids = frame_prediction_block_ids(m.seq_length, m.block_size)
    assert ids.numel() == m.seq_length
    allowed = int(block_causal_allowed(ids).sum())
    assert attention_pairs(m) == allowed
    s = m.seq_length
    assert s * (s + 1) // 2 <= allowed < s * s  # more than causal (blocks see themselves whole), less than dense


def test_the_k600_paper_shape():
    # nbp-xl K600: s = 1264 in 79 blocks of 16: A = 16^2 x 79 x 80 / 2 = 808,960 (50.6% of s^2)
    m = ModelConfig(num_layers=24, hidden_size=1536, num_attention_heads=16, ffn_hidden_size=6144,
                    latent_shape=(5, 16, 16), block_shape=(1, 1, 16))
    assert attention_pairs(m) == 808960
    s, h, n, V = 1264, 1536, 24, 64000
    megatron_lm = 72 * s * n * h * h * (1 + s / (6 * h) + V / (12 * n * h))  # Narayanan et al. with A = s^2
    dense_attention_extra = 3 * n * 4 * h * (s * s - 808960)
    assert training_flops_per_iteration(m, 1) == pytest.approx(megatron_lm - dense_attention_extra, rel=1e-12)


def test_matmul_flops_equal_torch_counter_forward_and_backward():
    """The non-attention terms against torch's FLOP counter on the real decoder (its CPU attention kernel
    is not counted by torch, so the attention term is checked against the mask above); backward = 2 x
    forward."""
    from megatron_nbp.inference.model import NBPDecoder

    m = tiny(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=96, latent_shape=(5, 4, 4),
             block_shape=(1, 1, 4), vocab_size=300)
    model = NBPDecoder(m)
    batch = 3
    tokens = torch.randint(0, 300, (batch, m.seq_length))
    positions = torch.arange(m.seq_length).expand(batch, -1)
    allowed = block_causal_allowed(frame_prediction_block_ids(m.seq_length, 4)).unsqueeze(0)
    attention = m.num_layers * 4 * m.hidden_size * attention_pairs(m)
    with FlopCounterMode(display=False) as forward:
        logits = model(tokens, positions, allowed)
    assert forward.get_total_flops() == batch * (forward_flops_per_sample(m) - attention)
    with FlopCounterMode(display=False) as both:
        model(tokens, positions, allowed).float().square().mean().backward()
    assert both.get_total_flops() == 3 * forward.get_total_flops()
    assert logits.shape == (batch, m.seq_length, m.padded_vocab_size)


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", override=300.0) == 300.0
    assert peak_tflops(None) is None and peak_tflops("Some Future GPU") is None
