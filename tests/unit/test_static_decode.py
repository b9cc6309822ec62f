"""The static-shape decode step (megatron_nbp.inference.static_decode) on the CPU: the cache's index write
against its slice write, the decode modes and their refusals, the runner kept per (model, batch size) and
reused across clips, and the decoder-level logits of every step against the full forward pass. (The
teacher-forced generation loops and greedy decoding in every mode, torch.compile's included, and one
compilation per model and batch size: test_generation_e2e.py; CUDA graphs: tests/gpu.)"""

import pytest
import torch

from megatron_nbp.inference.generate import BlockDecoder, generate_frame_prediction
from megatron_nbp.inference.kv_cache import StaticKVCache
from megatron_nbp.inference.sampling import SamplingConfig
from megatron_nbp.inference.static_decode import (DECODE_MODES, clear_static_step_runners, resolve_decode_mode,
                                                  static_step_runner)
from megatron_nbp.layouts import frame_prediction_batch
from megatron_nbp.masks import block_causal_allowed
from tests.unit.test_generation import hybrid_model, teacher_forced_cached_logits
from tests.unit.test_kv_cache import tiny_model


def test_decode_modes_and_their_defaults():
    assert DECODE_MODES == ("eager", "static", "compile", "cuda_graph")
    assert resolve_decode_mode(None, "cpu") == "eager"
    assert resolve_decode_mode(None, torch.device("cuda", 0)) == "cuda_graph"   # resolving touches no GPU
    for mode in ("eager", "static", "compile"):
        assert resolve_decode_mode(mode, "cpu") == mode
    with pytest.raises(ValueError, match="decode_mode 'cuda_graph' needs a model on a CUDA device; this one is on cpu"):
        resolve_decode_mode("cuda_graph", "cpu")
    with pytest.raises(ValueError, match="decode_mode 'graph' is not one of eager, static, compile, cuda_graph"):
        resolve_decode_mode("graph", "cpu")


def test_generation_refuses_cuda_graphs_on_the_cpu_by_name():
    with pytest.raises(ValueError, match="decode_mode 'cuda_graph'"):
        generate_frame_prediction(tiny_model(), torch.zeros(1, 32, dtype=torch.long), decode_mode="cuda_graph")
    with pytest.raises(ValueError, match="decode_mode 'fast'"):
        BlockDecoder(tiny_model(), 1, decode_mode="fast")


def test_index_write_equals_slice_write():
    """StaticKVCache.write at positions held in a tensor leaves the buffers the slice write leaves, and returns
    the whole buffers; a fresh cache is zero-filled (masked keys must be finite)."""
    g = torch.Generator().manual_seed(0)
    a, b = StaticKVCache(2, 3, 4, 10, 8), StaticKVCache(2, 3, 4, 10, 8)
    assert not a.keys.any() and not a.values.any()
    for layer, start, s in ((0, 0, 4), (1, 0, 4), (0, 4, 2), (1, 4, 2), (1, 6, 4)):
        k, v = torch.randn(3, 4, s, 8, generator=g), torch.randn(3, 4, s, 8, generator=g)
        ka, va = a.update(layer, start, k, v)
        kb, vb = b.write(layer, torch.arange(start, start + s), k, v)
        assert ka.shape == (3, 4, start + s, 8) and kb.shape == (3, 4, 10, 8)
        assert torch.equal(kb[:, :, :start + s], ka) and torch.equal(vb[:, :, :start + s], va)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(ValueError, match="batch/heads"):
        b.write(0, torch.arange(2), torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8))


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("block,position", [((1, 1, 4), "learned_absolute"), ((1, 4, 4), "rope3d"),
                                            ((1, 1, 1), "learned_absolute")])
def test_block_decoder_steps_equal_the_full_forward(block, position, mode):
    """BlockDecoder's prefill and every step in ``mode`` against the full forward pass (fp32, 1e-5)."""
    model = tiny_model(block=block, position=position)
    cfg = model.config
    L, N = cfg.block_size, cfg.num_video_tokens
    video = torch.randint(0, cfg.vocab_size, (2, N), generator=torch.Generator().manual_seed(0))
    batch = frame_prediction_batch(video, L, tuple(cfg.latent_shape))
    positions = batch.grid_position_ids if position == "rope3d" else batch.position_ids
    with torch.no_grad():
        full = model(batch.tokens, positions, block_causal_allowed(batch.block_ids))
        decoder = BlockDecoder(model, 2, decode_mode=mode)
        cached = [decoder.prefill(video[:, :32])]
        cached += [decoder.step(video[:, start:start + L]) for start in range(32, N - L, L)]
    cached, reference = torch.cat(cached, dim=1), full[:, 32 - L:]
    assert cached.shape == reference.shape
    assert float((cached - reference).norm() / reference.norm()) <= 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(P=4, C=20, condition_type="text", position="rope3d")],
                         ids=["class", "text_padded_rope3d"])
def test_hybrid_decoder_steps_in_the_static_mode_equal_eager(kw):
    """HybridDecoder fed the same clip (token by token, then the MBOS step, then blocks) gives the eager
    logits in the static mode, padded text conditions included."""
    model = hybrid_model(**kw)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, cfg.vocab_size, (2, cfg.num_video_tokens), generator=g)
    if cfg.condition_type == "text":
        condition = torch.randint(0, 20, (2, 4), generator=g)
        padding = torch.tensor([[False, True, True, True], [False] * 4])
    else:
        condition, padding = torch.tensor([[0], [2]]), None
    with torch.no_grad():
        eager = teacher_forced_cached_logits(model, video, condition, padding)
        static = teacher_forced_cached_logits(model, video, condition, padding, decode_mode="static")
    assert float((static - eager).norm() / eager.norm()) <= 1e-5


def test_runner_is_kept_per_model_and_batch_and_reused_across_clips():
    """Static modes keep one runner (cache, buffers, compiled step) per (model, batch size, cache length):
    two clips share it, another batch size gets its own, and moved or recast weights get a new one."""
    model = tiny_model()
    prompt = torch.randint(0, 500, (2, 32))
    greedy = SamplingConfig(temperature=0)
    first = generate_frame_prediction(model, prompt, greedy, decode_mode="static")
    runner = static_step_runner(model, 2, model.config.position_table_size, create=False)
    assert runner is not None and runner.captures == 0
    second = generate_frame_prediction(model, prompt, greedy, decode_mode="static")
    assert static_step_runner(model, 2, model.config.position_table_size) is runner
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.tokens, generate_frame_prediction(model, prompt, greedy, decode_mode="eager").tokens)
    generate_frame_prediction(model, prompt[:1], greedy, decode_mode="static")
    assert static_step_runner(model, 1, model.config.position_table_size, create=False) is not runner
    model.double()
    assert static_step_runner(model, 2, model.config.position_table_size, create=False) is None
    assert static_step_runner(model, 2, model.config.position_table_size).cache.keys.dtype == torch.float64
    assert clear_static_step_runners(model) == 2 and clear_static_step_runners(model) == 0
    assert static_step_runner(model, 2, model.config.position_table_size, create=False) is None


def test_a_decoder_whose_shared_cache_was_taken_refuses_to_go_on():
    """Two static-mode decoders of one model and batch size share the cache: the older one must not write
    into the newer one's clip. Eager decoders own their caches and may interleave."""
    model = tiny_model()
    block = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        old = BlockDecoder(model, 1, decode_mode="static")
        old.prefill(torch.zeros(1, 32, dtype=torch.long))
        new = BlockDecoder(model, 1, decode_mode="static")
        assert new.cache is old.cache
        with pytest.raises(RuntimeError, match="taken by a newer decoder"):
            old.step(block)
        new.prefill(torch.zeros(1, 32, dtype=torch.long))
        new.step(block)
        a, b = BlockDecoder(model, 1, decode_mode="eager"), BlockDecoder(model, 1, decode_mode="eager")
        a.prefill(torch.zeros(1, 32, dtype=torch.long))
        b.prefill(torch.zeros(1, 32, dtype=torch.long))
        assert torch.equal(a.step(block), b.step(block))


def test_static_steps_past_the_cache_are_refused():
    model = tiny_model()
    with torch.no_grad():
        decoder = BlockDecoder(model, 1, decode_mode="static")
        decoder.prefill(torch.zeros(1, 72, dtype=torch.long))
        decoder.step(torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="no room for 4 more tokens: 76 of 76 positions used"):
            decoder.step(torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="does not fit the runner's cache"):
            decoder.runner.step(torch.zeros(1, 8, dtype=torch.long), 72, "static")

