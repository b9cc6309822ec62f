"""Hybrid (class / text) and NTP generation with the static KV cache against a full forward pass,
step counts of the paper, seeded reproducibility and classifier-free guidance."""

import pytest
import torch

from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.generate import HybridDecoder, generate_hybrid
from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.inference.sampling import SamplingConfig
from megatron_nbp.layouts import hybrid_batch
from megatron_nbp.masks import block_causal_allowed


def hybrid_model(P=1, C=3, latent=(2, 4, 4), block=(1, 1, 4), position="learned_absolute", null=False,
                 condition_type="class", vocab=300, layers=2, hidden=32):
    torch.manual_seed(0)
    L = block[0] * block[1] * block[2]
    n = latent[0] * latent[1] * latent[2]
    C_total = C + (1 if null else 0)
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=2 * hidden,
                      vocab_size=vocab, make_vocab_size_divisible_by=L + C_total + vocab + 7,  # 7 padded ids
                      latent_shape=latent, block_shape=block, layout="hybrid",
                      condition_type=condition_type, num_condition_tokens=P,
                      position_embedding_type=position, null_condition=null,
                      condition_labels=[str(i) for i in range(C)] if condition_type == "class" else None,
                      text_vocab_size=C if condition_type == "text" else None)
    assert (cfg.padded_vocab_size, cfg.position_table_size, cfg.video_token_offset) == (L + C_total + vocab + 7,
                                                                                        P + n, L + C_total)
    assert position != "rope3d" or cfg.mrope_section == [4, 2, 2]
    model = NBPDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def teacher_forced_cached_logits(model, video, condition, padding, decode_mode="eager"):
    """Feed the true clip through HybridDecoder (in ``decode_mode``) exactly as generate_hybrid feeds sampled
    tokens; returns the logits [B, N, V] predicting video tokens 0 .. N-1 (block order)."""
    cfg = model.config
    L, off = cfg.block_size, cfg.video_token_offset
    z = video + off
    dec = HybridDecoder(model, video.shape[0], padding, decode_mode=decode_mode)
    out = [dec.prefill(condition.masked_fill(padding, 0) + L if padding is not None else condition + L)]
    for k in range(L - 1):
        out.append(dec.append(z[:, k:k + 1]))
    mbos = torch.arange(1, L).expand(video.shape[0], L - 1)
    out.append(dec.append(torch.cat([z[:, L - 1:L], mbos], 1)))
    for start in range(L, video.shape[1] - L, L):
        out.append(dec.append(z[:, start:start + L]))
    return torch.cat(out, dim=1)


CASES = {
    "class": dict(),
    "text_padded_rope3d": dict(P=4, C=20, condition_type="text", position="rope3d"),
    "ntp": dict(block=(1, 1, 1), latent=(1, 4, 4)),
    "square_blocks": dict(block=(1, 2, 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_hybrid_decoding_equals_full_forward(case):
    kw = CASES[case]
    model = hybrid_model(**kw)
    cfg = model.config
    P, N, L = cfg.num_condition_tokens, cfg.num_video_tokens, cfg.block_size
    video = torch.randint(0, cfg.vocab_size, (2, N))
    if cfg.condition_type == "text":
        condition = torch.randint(0, 20, (2, P))
        padding = torch.tensor([[False, False, True, True], [False] * 4])
    else:
        condition, padding = torch.tensor([[0], [2]]), None
    b = hybrid_batch(video, condition, L, cfg.video_token_offset - L, padding, tuple(cfg.latent_shape),
                     tuple(cfg.block_shape))
    positions = b.grid_position_ids if cfg.position_embedding_type == "rope3d" else b.position_ids
    with torch.no_grad():
        full = model(b.tokens, positions, block_causal_allowed(b.block_ids, key_padding=b.key_padding))[:, P:]
        video_block_order = b.labels[:, P:] - cfg.video_token_offset
        cached = teacher_forced_cached_logits(model, video_block_order, condition, padding)
    assert cached.shape == full.shape
    assert float((cached - full).norm() / full.norm()) <= 1e-5


def test_hybrid_generation_takes_95_steps_at_the_paper_shape():
    model = hybrid_model(latent=(5, 16, 16), block=(1, 1, 16), C=101, vocab=64000, layers=1, hidden=16)
    out = generate_hybrid(model, torch.tensor([[7]]), sampling=SamplingConfig(temperature=0))
    assert out.steps == 16 + 79 == 95 and out.tokens.shape == (1, 1280)
    assert int(out.tokens.max()) < 64000 and int(out.tokens.min()) >= 0


def test_ntp_hybrid_generation_takes_one_step_per_token():
    model = hybrid_model(block=(1, 1, 1), latent=(1, 4, 4))
    assert generate_hybrid(model, torch.tensor([[1]]), sampling=SamplingConfig(top_k=None)).steps == 16


def test_same_seed_same_video_and_other_seed_other_video():
    model = hybrid_model()
    cond = torch.tensor([[0], [1]])
    a = generate_hybrid(model, cond, generator=torch.Generator().manual_seed(5), sampling=SamplingConfig(top_k=50))
    b = generate_hybrid(model, cond, generator=torch.Generator().manual_seed(5), sampling=SamplingConfig(top_k=50))
    c = generate_hybrid(model, cond, generator=torch.Generator().manual_seed(6), sampling=SamplingConfig(top_k=50))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_classifier_free_guidance():
    """The first greedy token under guidance scale s is argmax(u + s (c - u)) of the null (u) and
    conditional (c) BOV logits computed separately; a model without a null condition refuses guidance."""
    model = hybrid_model(null=True)
    cfg = model.config
    L, off = cfg.block_size, cfg.video_token_offset
    null_id = off - L - 1
    with torch.no_grad():
        u = HybridDecoder(model, 1).prefill(torch.tensor([[null_id + L]]))[0, 0, off:off + cfg.vocab_size]
        c = HybridDecoder(model, 1).prefill(torch.tensor([[1 + L]]))[0, 0, off:off + cfg.vocab_size]
    assert not torch.equal(u.argmax(), c.argmax()) or not torch.allclose(u, c)
    for scale in (0.0, 1.0, 3.0):
        out = generate_hybrid(model, torch.tensor([[1]]), sampling=SamplingConfig(temperature=0, cfg_scale=scale))
        assert int(out.tokens[0, 0]) == int((u + scale * (c - u)).argmax()), scale
    with pytest.raises(ValueError, match="null condition"):
        generate_hybrid(hybrid_model(null=False), torch.tensor([[1]]), sampling=SamplingConfig(cfg_scale=2.0))


def test_null_condition_id_is_not_a_condition():
    """With model.null_condition the last condition id is the learned null embedding; asking for it (or
    beyond) is refused, the real ids are accepted."""
    greedy = SamplingConfig(temperature=0)
    for null in (True, False):                                 # without one, id 3 would be the first video code
        model = hybrid_model(null=null)                        # C = 3 real classes (+ id 3 = null)
        for bad in (3, 4, -1):
            with pytest.raises(ValueError, match=r"condition ids must be in \[0, 3\)"):
                generate_hybrid(model, torch.tensor([[bad]]), sampling=greedy)
        assert generate_hybrid(model, torch.tensor([[2]]), sampling=greedy).tokens.shape == (1, 32)


def test_condition_shape_is_checked():
    model = hybrid_model(P=4, C=20, condition_type="text")
    for shape in ((4,), (1, 5), (1, 3), (1, 1, 4), (1, 4, 1)):
        with pytest.raises(ValueError, match=r"condition must be \[B, 4\] ids"):
            generate_hybrid(model, torch.zeros(shape, dtype=torch.long))


def test_progress_bar_counts_every_forward_pass_and_is_off_by_default(capsys):
    model = hybrid_model()                                     # 2x4x4, L = 4: 4 + 8 - 1 = 11 passes
    out = generate_hybrid(model, torch.tensor([[1]]), sampling=SamplingConfig(temperature=0), progress=True)
    assert out.steps == 11 and "11/11" in capsys.readouterr().err.split("\r")[-1]
    generate_hybrid(model, torch.tensor([[1]]), sampling=SamplingConfig(temperature=0))
    assert capsys.readouterr().err == ""


def test_decoders_refuse_the_other_layout():
    from megatron_nbp.inference.generate import BlockDecoder
    from tests.unit.test_kv_cache import tiny_model

    with pytest.raises(ValueError, match="frame-prediction layout"):
        BlockDecoder(hybrid_model(), 1)
    with pytest.raises(ValueError, match="hybrid layout"):
        HybridDecoder(tiny_model(), 1)


def test_prefill_time_is_zero_when_not_measured():
    from megatron_nbp.inference.generate import GenerationResult

    assert GenerationResult(torch.zeros(1, 4, dtype=torch.long), 1, 0.5).prefill_seconds == 0.0


def test_sampling_defaults_are_the_papers():
    """The NBP paper samples with top-k 16000, top-p 0.9, temperature 1; no guidance unless asked."""
    s = SamplingConfig()
    assert (s.temperature, s.top_k, s.top_p, s.cfg_scale) == (1.0, 16000, 0.9, 1.0)


def test_generate_re_exports_the_sampling_module_and_uses_its_guidance_mix():
    """``from megatron_nbp.inference.generate import SamplingConfig, sample_tokens`` names the objects of
    megatron_nbp.inference.sampling (one implementation), and the generation loops mix guided batches with
    its ``uncond + scale * (cond - uncond)`` (conditional rows first)."""
    import megatron_nbp.inference.generate as generate
    import megatron_nbp.inference.sampling as sampling_module

    assert generate.SamplingConfig is sampling_module.SamplingConfig
    assert generate.sample_tokens is sampling_module.sample_tokens
    assert generate._guided is sampling_module.guided_logits
    logits = torch.tensor([[1.0, 4.0], [3.0, 2.0], [0.5, 1.0], [1.0, 1.0]])  # 2 conditional rows, 2 null rows
    assert torch.equal(sampling_module.guided_logits(logits, 2, 1.0), logits[:2])
    assert torch.equal(sampling_module.guided_logits(logits, 2, 3.0), torch.tensor([[2.0, 10.0], [7.0, 4.0]]))


def test_condition_dropout_is_seeded_and_uses_the_null_id():
    from megatron_nbp.data import drop_conditions

    ids = torch.tensor([[3, 4, 0], [5, 6, 7]])
    pad = torch.tensor([[False, False, True], [False, False, False]])
    new_ids, new_pad = drop_conditions(ids, pad, torch.tensor([True, False]), 9)
    assert new_ids.tolist() == [[9, 9, 9], [5, 6, 7]] and new_pad.tolist() == [[False] * 3, [False] * 3]
    with pytest.raises(ValueError, match="null_condition"):
        drop_conditions(ids, pad, torch.tensor([True, False]), None)


def official_top_k_top_p(logits, top_k=0, top_p=1.0):
    """Transcription of top_k_top_p_filtering in the official NBP release (nbp/modules/gpt.py)."""
    logits = logits.clone()
    if top_k > 0:
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = -float("Inf")
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative_probs > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[remove.scatter(1, sorted_indices, remove)] = -float("Inf")
    return logits.softmax(-1)


DISTINCT = [2.0, 1.5, 1.2, 0.3, 0.2, -0.5, -1.0, 0.9, 0.0, -2.0]
TIES = [2.0, 1.0, 1.0, 1.0, 0.5, -1.0, 1.0, 0.0, 0.0, -2.0]    # four logits tie at the 2nd..5th largest


@pytest.mark.parametrize("values,k,p", [
    (DISTINCT, 5, 0.9), (DISTINCT, None, 0.7), (DISTINCT, 4, None), (DISTINCT, None, None), (DISTINCT, 8, 0.3),
    (TIES, 2, None), (TIES, 3, 0.95), (TIES, None, 0.85)])
def test_sampling_distribution_equals_the_official_filter(values, k, p):
    """TIES at the k-th value: the release keeps every logit >= the k-th largest, so more than k survive."""
    from megatron_nbp.inference.sampling import sample_tokens

    logits = torch.tensor([values])
    want = official_top_k_top_p(logits, k or 0, p or 1.0)[0]
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.expand(40000, 10), 10, SamplingConfig(top_k=k, top_p=p), g)
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert torch.equal(freq > 0, want > 0)                      # exactly the official support
    assert float((freq - want).abs().max()) < 0.01


def top_k_pool_survivors(logits, k):
    """bool [R, V]: the ids the sampler's top-k pool keeps (its first k entries that stay finite, and every
    logit equal to the k-th largest, which its tie bucket stands for)."""
    from megatron_nbp.inference.sampling import _top_k_pool

    pool = _top_k_pool(logits, k)
    listed = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, pool.ids, pool.values[:, :k].isfinite())
    return listed | (logits == pool.values[:, k:])


def test_ties_at_the_kth_value_inside_and_outside_the_top_k():
    """TIES, k = 2: the k-th largest is 1.0, held four times, three of them outside an unsorted top-2. The
    pool keeps all four (through its tie bucket) and the draws give the release's distribution."""
    from megatron_nbp.inference.sampling import _top_k_pool, sample_tokens

    logits = torch.tensor([TIES])
    pool = _top_k_pool(logits, 2)
    assert int(pool.ties[0, -1]) == 4
    assert torch.equal(top_k_pool_survivors(logits, 2), official_top_k_top_p(logits, 2) > 0)
    want = official_top_k_top_p(logits, 2, 0.95)[0]
    draws = sample_tokens(logits.expand(40000, 10), 10, SamplingConfig(top_k=2, top_p=0.95),
                          torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert torch.equal(freq > 0, want > 0)
    assert float((freq - want).abs().max()) < 0.01


def test_top_k_keeps_every_bf16_tie_at_the_paper_setting():
    """bf16 logits, 16 x 64000, k = 16000: tens of logits per row tie at the k-th value. The pool keeps
    exactly the release's top-k survivors (every logit >= the k-th), with the logits of the listed ones."""
    from megatron_nbp.inference.sampling import _top_k_pool

    logits = (torch.randn(16, 64000, generator=torch.Generator().manual_seed(0)) * 3).bfloat16().float()
    k = 16000
    kth = torch.topk(logits, k).values[:, -1:]
    assert int(((logits >= kth).sum(-1) - k).max()) > 10                  # the case has ties
    assert torch.equal(top_k_pool_survivors(logits, k), official_top_k_top_p(logits, k) > 0)
    pool = _top_k_pool(logits, k)
    values, listed = pool.values[:, :k], pool.values[:, :k].isfinite()
    assert torch.equal(values[listed], logits.gather(1, pool.ids)[listed])
    assert torch.equal(pool.ties[:, -1], (logits == kth).sum(-1).int())   # the bucket holds every tie


def test_ties_at_the_nucleus_edge_are_all_kept():
    """TIES, k = 3, p = 0.8: top-k keeps 2.0 and the four 1.0s (probabilities 0.405, 4 x 0.149); the mass
    ahead of each 1.0 is 0.405 <= p, so all four stay, equally likely. (The release keeps three of them,
    whichever its unstable sort puts first.)"""
    from megatron_nbp.inference.sampling import sample_tokens

    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(torch.tensor([TIES]).expand(40000, 10), 10, SamplingConfig(top_k=3, top_p=0.8), g)
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert sorted(torch.nonzero(freq).flatten().tolist()) == [0, 1, 2, 3, 6]
    want = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]).softmax(0)
    assert float((freq[[0, 1, 2, 3, 6]] - want).abs().max()) < 0.01


def test_sampling_never_sorts(monkeypatch):
    """The nucleus comes from a radix select, not a sort, for every row (sample_tokens docstring): a sort or a
    multinomial draw anywhere in the call fails the test, and the draws still give the release's distribution."""
    from megatron_nbp.inference.sampling import sample_tokens

    def no_sort(*args, **kwargs):
        raise AssertionError("sample_tokens sorted or called multinomial")

    with monkeypatch.context() as patch:
        for name in ("sort", "argsort", "multinomial"):
            patch.setattr(torch, name, no_sort)
            patch.setattr(torch.Tensor, name, no_sort)
        draws = sample_tokens(torch.tensor([DISTINCT]).expand(40000, 10), 10, SamplingConfig(top_k=5, top_p=0.9),
                              torch.Generator().manual_seed(0))
    want = official_top_k_top_p(torch.tensor([DISTINCT]), 5, 0.9)[0]
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert float((freq - want).abs().max()) < 0.01


def test_top_k_pool_of_a_row_does_not_depend_on_the_other_rows():
    """Two rows far apart in scale (the second is the first + 100): each row's pool keeps exactly the
    release's top-k survivors of that row, and each row's pool alone equals its row of the batch's."""
    from megatron_nbp.inference.sampling import _top_k_pool

    row = torch.randn(1, 2000, generator=torch.Generator().manual_seed(0))
    logits = torch.cat([row, row + 100.0])
    assert torch.equal(top_k_pool_survivors(logits, 100), official_top_k_top_p(logits, 100) > 0)
    both = _top_k_pool(logits, 100)
    for i in range(2):
        alone = _top_k_pool(logits[i:i + 1], 100)
        assert torch.equal(alone.values, both.values[i:i + 1]) and torch.equal(alone.ids, both.ids[i:i + 1])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits_before_the_filters(temperature):
    """The release samples from top_k_top_p_filtering(logits / temperature)."""
    from megatron_nbp.inference.sampling import sample_tokens

    logits = torch.tensor([DISTINCT])
    want = official_top_k_top_p(logits / temperature, 5, 0.9)[0]
    assert float((want - official_top_k_top_p(logits, 5, 0.9)[0]).abs().max()) > 0.05    # the case is sensitive
    draws = sample_tokens(logits.expand(40000, 10), 10, SamplingConfig(temperature=temperature, top_k=5, top_p=0.9),
                          torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert torch.equal(freq > 0, want > 0)
    assert float((freq - want).abs().max()) < 0.01


def test_non_positive_temperature_is_greedy_within_the_vocabulary():
    from megatron_nbp.inference.sampling import sample_tokens

    logits = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    logits[:, 10:] = 100.0                                     # padded ids, never chosen
    for temperature in (0.0, -1.0):
        got = sample_tokens(logits, 10, SamplingConfig(temperature=temperature))
        assert torch.equal(got, logits[:, :10].argmax(-1))


def test_a_token_whose_mass_ahead_equals_p_is_kept():
    """Two tokens and p = the probability of the first: the mass ahead of the second is exactly p, not more,
    so the release's filter keeps both (it removes a token when the mass before it exceeds p)."""
    from megatron_nbp.inference.sampling import sample_tokens

    logits = torch.tensor([[1.0, 0.0]])
    p = float(logits.softmax(-1)[0, 0])
    want = official_top_k_top_p(logits, 0, p)[0]
    assert bool((want > 0).all())
    draws = sample_tokens(logits.expand(40000, 2), 2, SamplingConfig(top_k=None, top_p=p),
                          torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=2).float() / draws.numel()
    assert float((freq - want).abs().max()) < 0.01


def test_a_nucleus_of_one_token_always_gives_it():
    """p below the top token's probability: the release keeps only that token (the mass ahead of the second
    already exceeds p), so every draw is the argmax."""
    from megatron_nbp.inference.sampling import sample_tokens

    logits = torch.tensor([DISTINCT]).expand(1000, 10)
    assert int((official_top_k_top_p(logits[:1], 0, 0.05)[0] > 0).sum()) == 1
    draws = sample_tokens(logits, 10, SamplingConfig(top_k=None, top_p=0.05), torch.Generator().manual_seed(0))
    assert bool((draws == 0).all())
