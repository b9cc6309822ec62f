"""Hybrid (class-conditional) layout and the official frame-prediction mask, against transcriptions."""

import pytest
import torch

from megatron_nbp.layouts import frame_prediction_block_ids, hybrid_batch, hybrid_block_ids
from megatron_nbp.masks import block_causal_allowed


def official_attn_mask(prefix_len: int, seq_len: int, step: int) -> torch.Tensor:
    """Transcription of Net2NetTransformer.get_attn_mask in the official NBP release (class condition):
    every token sees the condition; block [i, i+step) sees all video tokens up to its end."""
    attn_mask = torch.zeros(seq_len, seq_len)
    attn_mask[:, :prefix_len] = 1
    for i, j in zip(range(prefix_len, seq_len, step), range(prefix_len, seq_len, step)):
        attn_mask[i:i + step, prefix_len:j + step] = 1
    return attn_mask.bool()


@pytest.mark.parametrize("n,step", [(320, 8), (1280, 16), (64, 1)])
def test_frame_prediction_equals_official_mask(n, step):
    seq = n - step
    assert torch.equal(block_causal_allowed(frame_prediction_block_ids(seq, step)), official_attn_mask(0, seq, step))


def design_hybrid_allowed(P: int, N: int, L: int) -> torch.Tensor:
    """The hybrid rule of docs/design.md written per query: the condition block is bidirectional and seen by all;
    BOV, z_0 .. z_{L-2} are causal singletons; from [z_{L-1}, MBOS..] on, a query sees everything up to
    the end of its own block of L."""
    S = P + N
    allowed = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        allowed[q, :P] = True
        if q < P:
            continue
        if q < P + L:                    # BOV and the first block's tokens, one at a time
            allowed[q, P:q + 1] = True
        else:                            # blocks of L starting at P + L
            end = P + L + ((q - P - L) // L + 1) * L
            allowed[q, P:end] = True
    return allowed


@pytest.mark.parametrize("P,N,L", [(1, 1280, 16), (1, 320, 8), (3, 64, 4)])
def test_hybrid_mask_matches_design(P, N, L):
    assert torch.equal(block_causal_allowed(hybrid_block_ids(P, N, L)), design_hybrid_allowed(P, N, L))


def test_hybrid_generation_steps_are_95_for_the_paper_shape():
    ids = hybrid_block_ids(1, 1280, 16)
    steps = len(torch.unique(ids[1:]))  # distinct blocks after the condition = forward passes
    assert steps == 16 + 79 == 95


def test_hybrid_tokens_targets_position_by_position():
    P, N, L, C = 1, 16, 4, 3
    video = torch.arange(N).view(1, N) + 100
    b = hybrid_batch(video, torch.tensor([[2]]), L, C)
    off = L + C  # video ids shifted past the special tokens and the condition vocabulary
    z = [100 + i + off for i in range(N)]
    expected_tokens = [2 + L, 0, z[0], z[1], z[2], z[3], 1, 2, 3] + z[4:12]
    assert b.tokens[0].tolist() == expected_tokens
    assert b.labels[0, P:].tolist() == z           # targets are exactly the N video tokens, in order
    assert b.loss_mask[0].tolist() == [0.0] + [1.0] * N
    assert b.position_ids[0].tolist() == list(range(P + N))


def test_hybrid_refuses_bad_condition():
    with pytest.raises(ValueError, match="condition ids"):
        hybrid_batch(torch.zeros(1, 16, dtype=torch.long), torch.tensor([[5]]), 4, 3)


def test_pkeep_corrupts_only_input_video_tokens_at_the_expected_rate():
    from megatron_nbp.layouts import corrupt_video_tokens

    N, L, C = 1280, 16, 101
    b = hybrid_batch(torch.randint(0, 64000, (8, N)), torch.randint(0, C, (8, 1)), L, C)
    vocab, offset = L + C + 64000, L + C
    out = corrupt_video_tokens(b.tokens, 0.9, offset, vocab, torch.Generator().manual_seed(0))
    changed = out != b.tokens
    video = b.tokens >= offset
    assert not changed[~video].any()                      # condition and BOV/MBOS untouched
    rate = changed[video].float().mean().item()
    assert 0.08 < rate < 0.12, rate                        # ~1 - pkeep (a few collide with the same id)
    assert int(out.max()) < vocab
    again = corrupt_video_tokens(b.tokens, 0.9, offset, vocab, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert corrupt_video_tokens(b.tokens, 1.0, offset, vocab) is b.tokens


def test_hybrid_block_ids_are_the_documented_sequence():
    """layouts.py docstring: condition 0 ... 0, BOV 1, z_0 .. z_{L-2} 2 .. L, then L+1 for [z_{L-1}, MBOS..] and
    one more per block of L. P = 2, N = 12, L = 3."""
    assert hybrid_block_ids(2, 12, 3).tolist() == [0, 0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6]


def test_hybrid_layout_refuses_bad_inputs():
    video, cond = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    for v, c in ((video[0], cond), (video[:, None], cond), (video, cond[:, 0]), (video, cond[:, None]),
                 (video, cond[:1]), (video[:1], cond), (video[:, 0], cond)):
        with pytest.raises(ValueError, match=r"need video \[B, N\] and condition \[B, P\]"):
            hybrid_batch(v, c, 4, 3)
    for L in (0, 3, 16, 32):                                  # not dividing N = 16 at least twice
        with pytest.raises(ValueError, match="must divide the clip length 16 at least twice"):
            hybrid_batch(video, cond, L, 3)
    assert hybrid_batch(torch.zeros(1, 2, dtype=torch.long), cond[:1], 1, 3).tokens.shape == (1, 3)   # N = 2L
    text = torch.zeros(2, 3, dtype=torch.long)
    for pad in (torch.zeros(2, 1, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"condition_padding \(2, \d\) must match condition \(2, 3\)"):
            hybrid_batch(video, text, 4, 3, pad)
    for bad in (-1, 3):                                       # C = 3 condition ids: 0, 1, 2
        with pytest.raises(ValueError, match=r"condition ids must be in \[0, 3\)"):
            hybrid_batch(video, torch.tensor([[0], [bad]]), 4, 3)


def test_pkeep_draws_replacements_from_the_whole_vocabulary():
    """The release replaces with randint_like(z, vocab_size): any id in [0, vocab), and the first video id
    itself is a video token that may be replaced."""
    from megatron_nbp.layouts import corrupt_video_tokens

    offset, vocab = 5, 8
    tokens = torch.full((4, 4000), offset)                    # every input is the first video code
    out = corrupt_video_tokens(tokens, 0.5, offset, vocab, torch.Generator().manual_seed(0))
    assert 0.4 < (out != tokens).float().mean().item() < 0.5  # 1 - pkeep, less the draws of the same id
    assert sorted(out.unique().tolist()) == list(range(vocab))
