"""KV-cache block decoding against a full forward pass of the same (converted-format) model."""

import time

import pytest
import torch

from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.generate import BlockDecoder, generate_frame_prediction
from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.inference.sampling import SamplingConfig
from megatron_nbp.layouts import frame_prediction_batch
from megatron_nbp.masks import block_causal_allowed


def tiny_model(seed=0, latent=(5, 4, 4), block=(1, 1, 4), position="learned_absolute"):
    torch.manual_seed(seed)
    n = latent[0] * latent[1] * latent[2]
    L = block[0] * block[1] * block[2]
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      vocab_size=500, latent_shape=latent, block_shape=block, position_embedding_type=position)
    assert (cfg.padded_vocab_size, cfg.position_table_size, cfg.mrope_section) == (512, n - L, [4, 2, 2])
    model = NBPDecoder(cfg).eval()
    with torch.no_grad():  # larger than default init so attention patterns matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("block,position", [((1, 1, 4), "learned_absolute"), ((1, 4, 4), "learned_absolute"),
                                            ((1, 1, 1), "learned_absolute"), ((1, 1, 4), "rope3d"),
                                            ((1, 4, 4), "rope3d")])
def test_cached_block_decoding_equals_full_forward(block, position):
    model = tiny_model(block=block, position=position)
    cfg = model.config
    L, N = cfg.block_size, cfg.num_video_tokens
    video = torch.randint(0, cfg.vocab_size, (2, N))
    batch = frame_prediction_batch(video, L, tuple(cfg.latent_shape))
    positions = batch.grid_position_ids if position == "rope3d" else batch.position_ids
    with torch.no_grad():
        full = model(batch.tokens, positions, block_causal_allowed(batch.block_ids))  # [2, N-L, V]
        prompt_len = 2 * 16  # two latent frames
        decoder = BlockDecoder(model, 2)
        cached = [decoder.prefill(video[:, :prompt_len])]
        for start in range(prompt_len, N - L, L):
            cached.append(decoder.step(video[:, start:start + L]))
    cached = torch.cat(cached, dim=1)
    reference = full[:, prompt_len - L:]
    assert cached.shape == reference.shape
    err = (cached - reference).norm() / reference.norm()
    assert err <= 1e-5, err


def test_prefill_differs_without_block_mask():
    """Guard that the comparison above is sensitive: a causal (token-level) mask gives other logits."""
    model = tiny_model()
    L = model.config.block_size
    video = torch.randint(0, 500, (1, 80))
    batch = frame_prediction_batch(video, L)
    with torch.no_grad():
        block_logits = model(batch.tokens, batch.position_ids, block_causal_allowed(batch.block_ids))
        causal = torch.ones(76, 76, dtype=torch.bool).tril().unsqueeze(0)
        causal_logits = model(batch.tokens, batch.position_ids, causal)
    assert not torch.allclose(block_logits, causal_logits, atol=1e-3)


def test_generation_steps_and_reproducibility():
    model = tiny_model()
    prompt = torch.randint(0, 500, (2, 32))
    sampling = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    before = time.perf_counter()
    a = generate_frame_prediction(model, prompt, sampling, torch.Generator().manual_seed(3))
    wall = time.perf_counter() - before
    b = generate_frame_prediction(model, prompt, sampling, torch.Generator().manual_seed(3))
    assert a.steps == (80 - 32) // 4 == 12
    assert 0 < a.prefill_seconds < a.seconds <= wall    # times measured inside the call
    assert a.tokens.shape == (2, 80) and torch.equal(a.tokens[:, :32], prompt)
    assert torch.equal(a.tokens, b.tokens)
    assert int(a.tokens.max()) < 500  # padded vocabulary ids are never sampled


def test_paper_step_count_for_frame_prediction():
    """K600 setting of the paper: 5x16x16 latents, L = 16, 2 condition frames -> 48 forward passes."""
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                      vocab_size=64000, latent_shape=[5, 16, 16], block_shape=[1, 1, 16])
    assert (cfg.padded_vocab_size, cfg.position_table_size) == (64000, 1280 - 16)
    model = NBPDecoder(cfg).eval()
    result = generate_frame_prediction(model, torch.randint(0, 64000, (1, 512)), SamplingConfig(temperature=0))
    assert result.steps == 48 and result.tokens.shape == (1, 1280)


def test_bad_prompt_length_is_refused():
    model = tiny_model()
    for length in (30, 0, 80):                       # not whole blocks, empty, the whole input sequence
        with pytest.raises(ValueError, match="multiple of the block size"):
            BlockDecoder(model, 1).prefill(torch.zeros(1, length, dtype=torch.long))


def test_prompt_of_all_but_the_last_block_takes_one_step():
    model = tiny_model()
    video = torch.randint(0, 500, (1, 80))
    out = generate_frame_prediction(model, video[:, :76], SamplingConfig(temperature=0))
    assert out.steps == 1 and torch.equal(out.tokens[:, :76], video[:, :76])


def test_ntp_from_a_one_token_prompt():
    model = tiny_model(latent=(1, 2, 2), block=(1, 1, 1))
    out = generate_frame_prediction(model, torch.tensor([[7]]), SamplingConfig(temperature=0))
    assert out.steps == 3 and out.tokens.shape == (1, 4) and int(out.tokens[0, 0]) == 7


def test_appending_past_the_end_is_refused():
    decoder = BlockDecoder(tiny_model(), 1)
    decoder.prefill(torch.zeros(1, 72, dtype=torch.long))
    decoder.step(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no room for 4 more tokens: 76 of 76 positions used"):
        decoder.step(torch.zeros(1, 4, dtype=torch.long))


def test_prompt_must_be_whole_blocks():
    """2x1x8 blocks span two frames, so a one-frame prompt is not whole blocks; with 1x2x1 blocks on a 2x2x2
    latent the first two (t, h, w) tokens are half of two blocks, and with 1x2x4 blocks on 12-wide frames the
    first 8 are halves of two."""
    for latent, block, length in (((4, 4, 8), (2, 1, 8), 32), ((2, 2, 2), (1, 2, 1), 2), ((3, 2, 12), (1, 2, 4), 8)):
        model = tiny_model(latent=latent, block=block)
        with pytest.raises(ValueError, match="not a whole number of blocks"):
            generate_frame_prediction(model, torch.zeros(1, length, dtype=torch.long))


def test_progress_bar_counts_every_block_step_and_is_off_by_default(capsys):
    model = tiny_model()
    prompt = torch.randint(0, 500, (1, 32))
    generate_frame_prediction(model, prompt, SamplingConfig(temperature=0), progress=True)
    assert "12/12" in capsys.readouterr().err.split("\r")[-1]          # (80 - 32) / 4 block steps, all counted
    generate_frame_prediction(model, prompt, SamplingConfig(temperature=0))
    assert capsys.readouterr().err == ""


def test_num_logits_gives_the_last_positions_of_the_full_output():
    model = tiny_model()
    batch = frame_prediction_batch(torch.randint(0, 500, (2, 80)), 4)
    allowed = block_causal_allowed(batch.block_ids)
    with torch.no_grad():
        full = model(batch.tokens, batch.position_ids, allowed)
        last = model(batch.tokens, batch.position_ids, allowed, num_logits=4)
        assert last.shape == (2, 4, 512) and torch.allclose(last, full[:, -4:], rtol=0, atol=1e-5)
        for bad in (0, 77):
            with pytest.raises(ValueError, match="num_logits must be in"):
                model(batch.tokens, batch.position_ids, allowed, num_logits=bad)
