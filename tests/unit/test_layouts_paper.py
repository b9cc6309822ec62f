"""The paper's layouts against transcriptions of the official NBP release: hybrid masks with class and
padded text conditions, block shapes from the ablation (block-major order), 3D RoPE coordinates, and
the separate condition / video position tables."""

import pytest
import torch

from megatron_nbp.inference.generate import BlockDecoder, generate_frame_prediction
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.layouts import block_major_order, frame_prediction_batch, hybrid_batch
from megatron_nbp.masks import block_causal_allowed
from megatron_nbp.model.embeddings import ConditionVideoPositionEmbedding


def official_hybrid_attn_mask(pad: torch.Tensor, seq_len: int, step: int, text: bool) -> torch.Tensor:
    """Transcription of HybridNet2NetTransformer.get_attn_mask (official release): tril everywhere;
    condition columns: all of them (class), or the non-pad ones (text) visible to every query; from
    nbp_start = P + step on, a block of `step` sees every token from nbp_start to its own end."""
    bsz, prefix_len = pad.shape
    attn_mask = torch.tril(torch.ones(seq_len, seq_len)).repeat(bsz, 1, 1)
    if text:
        attn_mask_for_c = attn_mask[:, :, :prefix_len]
        attn_mask_for_c[(~pad).unsqueeze(1).expand(-1, seq_len, -1)] = 1
        attn_mask[:, :, :prefix_len] = attn_mask_for_c
    else:
        attn_mask[:, :, :prefix_len] = 1
    nbp_start = prefix_len + step
    for i, j in zip(range(nbp_start, seq_len, step), range(nbp_start, seq_len, step)):
        attn_mask[:, i:i + step, nbp_start:j + step] = 1
    return attn_mask.bool()


@pytest.mark.parametrize("N,L", [(1280, 16), (64, 4), (48, 1)])
def test_class_hybrid_mask_equals_official(N, L):
    b = hybrid_batch(torch.zeros(2, N, dtype=torch.long), torch.tensor([[0], [1]]), L, 2)
    ours = block_causal_allowed(b.block_ids)
    official = official_hybrid_attn_mask(torch.zeros(2, 1, dtype=torch.bool), 1 + N, L, text=False)
    assert torch.equal(ours, official)


def test_text_hybrid_mask_equals_official_with_padded_keys_masked():
    """Text condition of P = 5 with 3 and 5 real ids. On every non-padded key the mask is the
    official one. The official hybrid mask leaves padded keys under its causal tril (visible to every
    later token, so outputs would depend on the amount of padding); its non-hybrid mask and docs/design.md
    mask them: so do we (a padded query keeps only itself)."""
    P, N, L = 5, 64, 4
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    cond = torch.tensor([[3, 1, 4, 0, 0], [2, 7, 1, 8, 2]])
    b = hybrid_batch(torch.zeros(2, N, dtype=torch.long), cond, L, 10, pad)
    ours = block_causal_allowed(b.block_ids, key_padding=b.key_padding)
    official = official_hybrid_attn_mask(pad, P + N, L, text=True)
    key_pad = b.key_padding.unsqueeze(1).expand_as(ours)
    assert torch.equal(ours[~key_pad], official[~key_pad])
    eye = torch.eye(P + N, dtype=torch.bool).expand_as(ours)
    assert not ours[key_pad & ~eye].any()                       # padded keys: never, except themselves
    assert torch.equal(ours[1], official[1])                     # nothing padded: identical


def test_text_hybrid_inputs_targets_position_by_position():
    P, L, C = 3, 4, 10
    video = torch.arange(16).view(1, 16) + 100
    pad = torch.tensor([[False, False, True]])
    b = hybrid_batch(video, torch.tensor([[5, 9, 123]]), L, C, pad)  # the padded id is ignored
    z = [100 + i + L + C for i in range(16)]
    assert b.tokens[0].tolist() == [5 + L, 9 + L, 0 + L, 0, z[0], z[1], z[2], z[3], 1, 2, 3] + z[4:12]
    assert b.labels[0, P:].tolist() == z
    assert b.loss_mask[0].tolist() == [0.0] * P + [1.0] * 16
    assert b.key_padding[0].tolist() == [False, False, True] + [False] * 16
    assert b.position_ids[0].tolist() == list(range(P + 16))


def test_rope_coordinates_position_by_position():
    """Hybrid, P = 1, latent 2x2x2, L = 2: condition (0,0,0), BOV (1,1,1), video offset by P + 1 = 2,
    MBOS_1 at the coordinates of z_1."""
    b = hybrid_batch(torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0]]), 2, 1,
                     latent_shape=(2, 2, 2), block_shape=(1, 1, 2))
    # inputs: c, BOV, z0, z1, MBOS_1, z2, z3, z4, z5
    expected = [(0, 0, 0), (1, 1, 1), (2, 2, 2), (2, 2, 3), (2, 2, 3), (2, 3, 2), (2, 3, 3), (3, 2, 2), (3, 2, 3)]
    assert [tuple(x) for x in b.grid_position_ids[:, 0].T.tolist()] == expected
    f = frame_prediction_batch(torch.zeros(1, 8, dtype=torch.long), 2, (2, 2, 2), (1, 1, 2))
    assert [tuple(x) for x in f.grid_position_ids[:, 0].T.tolist()] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1)]


@pytest.mark.parametrize("latent,block", [((5, 16, 16), (1, 4, 4)), ((4, 16, 16), (2, 1, 8)),
                                          ((5, 16, 16), (1, 1, 8)), ((5, 16, 16), (1, 16, 16))])
def test_block_major_order_makes_every_paper_block_contiguous(latent, block):
    order = block_major_order(latent, block)
    L = block[0] * block[1] * block[2]
    assert torch.equal(order.sort().values, torch.arange(order.numel()))   # a permutation
    t, h, w = latent
    coords = torch.stack(torch.meshgrid(*(torch.arange(x) for x in latent), indexing="ij")).reshape(3, -1)[:, order]
    for j in range(0, order.numel(), L):                                    # each run of L is one box
        box = coords[:, j:j + L]
        cells = {tuple((box[:, k] // torch.tensor(block)).tolist()) for k in range(L)}
        assert len(cells) == 1
    if block[1:] == (1, latent[2]) or block[1:] == latent[1:]:
        assert torch.equal(order, torch.arange(order.numel()))              # rows / frames: identity


def test_non_contiguous_block_layout_predicts_the_next_spatial_block():
    """1x2x2 blocks on a 2x4x4 latent: input block j (a 2x2 square) predicts square j + 1."""
    latent, block, L = (2, 4, 4), (1, 2, 2), 4
    video = torch.arange(32).view(1, 32)          # token value = its (t, h, w)-major index
    f = frame_prediction_batch(video, L, latent, block)
    t, h, w = (f.tokens[0] // 16, (f.tokens[0] // 4) % 4, f.tokens[0] % 4)
    for j in range(0, 28, L):
        assert len(set(zip(t[j:j + L].tolist(), (h[j:j + L] // 2).tolist(), (w[j:j + L] // 2).tolist()))) == 1
    order = block_major_order(latent, block)
    assert torch.equal(f.labels[0], order[L:]) and torch.equal(f.tokens[0], order[:-L])


def tiny_decoder(**overrides):
    torch.manual_seed(0)
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=300,
               latent_shape=[2, 4, 4], block_shape=[1, 2, 2])
    cfg.update(overrides)
    cfg = ModelConfig(**cfg)
    assert cfg.padded_vocab_size == 384 and cfg.position_table_size == cfg.seq_length
    model = NBPDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_kv_cache_and_generation_with_a_non_contiguous_block():
    model = tiny_decoder()
    video = torch.randint(0, 300, (2, 32))
    f = frame_prediction_batch(video, 4, (2, 4, 4), (1, 2, 2))
    with torch.no_grad():
        full = model(f.tokens, f.position_ids, block_causal_allowed(f.block_ids))
        decoder = BlockDecoder(model, 2)
        bm = torch.cat([f.tokens, f.labels[:, -4:]], dim=1)     # whole clip in block order
        cached = [decoder.prefill(bm[:, :16])]
        for start in range(16, 28, 4):
            cached.append(decoder.step(bm[:, start:start + 4]))
    assert float((torch.cat(cached, 1) - full[:, 12:]).norm() / full.norm()) <= 1e-5
    out = generate_frame_prediction(model, video[:, :16])       # first latent frame, (t, h, w) order
    assert out.steps == 4 and torch.equal(out.tokens[:, :16], video[:, :16])


def test_padded_text_is_invisible_to_the_video():
    """Changing the ids at padded text positions leaves every video logit unchanged; changing a real
    text id changes them (the comparison is sensitive)."""
    P, N, L = 4, 16, 4
    model = tiny_decoder(layout="hybrid", condition_type="text", text_vocab_size=20, num_condition_tokens=P,
                         latent_shape=[1, 4, 4], block_shape=[1, 1, 4])
    assert model.config.position_table_size == P + N and model.config.video_token_offset == L + 20
    video = torch.randint(0, 300, (1, N))
    pad = torch.tensor([[False, False, True, True]])

    def video_logits(cond):
        b = hybrid_batch(video, cond, L, 20, pad)
        with torch.no_grad():
            return model(b.tokens, b.position_ids, block_causal_allowed(b.block_ids, key_padding=b.key_padding))[:, P:]

    base = video_logits(torch.tensor([[3, 5, 0, 0]]))
    assert torch.equal(base, video_logits(torch.tensor([[3, 5, 17, 11]])))
    assert not torch.allclose(base, video_logits(torch.tensor([[3, 6, 0, 0]])), atol=1e-4)


def test_video_position_table_does_not_depend_on_the_condition_length():
    emb = ConditionVideoPositionEmbedding(3, 10, 8)
    frame = ConditionVideoPositionEmbedding(0, 10, 8)
    frame.video.weight.data.copy_(emb.video.weight.data)
    with torch.no_grad():
        hybrid_out = emb(torch.arange(13))
        frame_out = frame(torch.arange(10))
    assert torch.equal(hybrid_out[3:], frame_out)                   # video position j: same row, any P
    assert torch.equal(hybrid_out[:3], emb.condition.weight)
    with pytest.raises(IndexError):
        frame(torch.tensor([10]))


@pytest.mark.parametrize("latent,block", [((4, 4, 8), (2, 1, 8)), ((3, 2, 12), (1, 2, 4)), ((4, 4, 4), (2, 2, 2)),
                                          ((2, 4, 8), (1, 1, 8)), ((2, 4, 8), (2, 4, 8))])
def test_block_major_order_equals_the_written_out_order(latent, block):
    from tests.unit.test_generation_e2e import reference_block_major_order

    assert torch.equal(block_major_order(latent, block), reference_block_major_order(latent, block))


@pytest.mark.parametrize("block", [(0, 1, 8), (1, 0, 8), (1, 1, 0), (3, 1, 8), (1, 3, 8), (1, 4, 3), (1, 3, 3)])
def test_block_shapes_that_do_not_tile_are_refused(block):
    with pytest.raises(ValueError, match="does not tile latent shape"):
        block_major_order((2, 4, 8), block)
