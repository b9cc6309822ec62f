"""Block-causal mask and frame-prediction layout against brute-force transcriptions of the rule in docs/design.md."""

import pytest
import torch

from megatron_nbp.layouts import frame_prediction_batch, frame_prediction_block_ids
from megatron_nbp.masks import block_causal_allowed, block_causal_attention_mask


def brute_force_frame_prediction_mask(seq_len: int, block: int) -> torch.Tensor:
    """The attention rule (docs/design.md), written out: query i may see key j iff j's block (j // L) is not after i's block."""
    allowed = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(seq_len):
            allowed[i, j] = (j // block) <= (i // block)
    return allowed


@pytest.mark.parametrize("seq_len,block", [(312, 8), (24, 4), (1264, 16), (10, 1)])
def test_block_causal_mask_matches_brute_force(seq_len, block):
    if seq_len > 400:  # keep the O(S^2) python loop cheap: check a window of rows
        ids = frame_prediction_block_ids(seq_len, block)
        allowed = block_causal_allowed(ids)
        rows = list(range(0, 48)) + list(range(seq_len - 48, seq_len))
        for i in rows:
            expected = torch.tensor([(j // block) <= (i // block) for j in range(seq_len)])
            assert torch.equal(allowed[i], expected)
        return
    ids = frame_prediction_block_ids(seq_len, block)
    assert torch.equal(block_causal_allowed(ids), brute_force_frame_prediction_mask(seq_len, block))


def test_block_size_one_is_plain_causal():
    ids = frame_prediction_block_ids(50, 1)
    assert torch.equal(block_causal_allowed(ids), torch.ones(50, 50, dtype=torch.bool).tril())


def test_megatron_mask_convention_and_padding():
    ids = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pad = torch.tensor([[False, False, False, True, False, False]])
    mask = block_causal_attention_mask(ids, pad)  # True = masked
    assert mask.shape == (1, 1, 6, 6)
    expected_allowed = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # key 3 is padding
        [1, 1, 1, 1, 0, 0],  # ... except for itself as a query (never an empty softmax row)
        [1, 1, 1, 0, 1, 1],
        [1, 1, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(~mask[0, 0], expected_allowed)


def test_frame_prediction_targets_position_by_position():
    L, N = 4, 20
    video = torch.arange(100, 100 + 2 * N).view(2, N)
    b = frame_prediction_batch(video, L)
    assert b.tokens.shape == b.labels.shape == b.position_ids.shape == b.block_ids.shape == (2, N - L)
    for s in range(2):
        for i in range(N - L):
            assert b.tokens[s, i] == video[s, i]
            assert b.labels[s, i] == video[s, i + L]  # position i predicts token i + L
            assert b.position_ids[s, i] == i
            assert b.block_ids[s, i] == i // L
    assert torch.all(b.loss_mask == 1.0)


def test_layout_refuses_block_not_dividing_clip():
    with pytest.raises(ValueError, match="must divide"):
        frame_prediction_batch(torch.zeros(1, 20, dtype=torch.long), 3)


def brute_force_allowed_with_padding(ids: list, pad: list) -> torch.Tensor:
    """The rule with padding (masks.py docstring), written out for one sequence: key k is visible to query q
    iff its block is not later and it is not padding; a padded query also sees itself."""
    S = len(ids)
    return torch.tensor([[(ids[k] <= ids[q] and not pad[k]) or (q == k and pad[q]) for k in range(S)]
                         for q in range(S)])


def test_padding_rule_with_two_leading_batch_dimensions():
    """block ids and padding [2, 3, S] (any leading dimensions are allowed): every [S, S] slice is the rule."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (2, 3, 7), generator=g).sort(-1).values
    pad = torch.rand(2, 3, 7, generator=g) < 0.3
    assert pad.any() and not pad.all()
    allowed = block_causal_allowed(ids, key_padding=pad)
    assert allowed.shape == (2, 3, 7, 7)
    for a in range(2):
        for b in range(3):
            assert torch.equal(allowed[a, b], brute_force_allowed_with_padding(ids[a, b].tolist(), pad[a, b].tolist()))


def test_frame_prediction_layout_refuses_bad_inputs():
    video = torch.zeros(1, 16, dtype=torch.long)
    for bad in (torch.zeros(1, 2, 8, dtype=torch.long), torch.zeros(16, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"must be \[B, N\]"):
            frame_prediction_batch(bad, 4)
    for n, L in ((4, 4), (0, 4), (16, 0), (2, 4)):          # one block (nothing to predict), empty, L = 0, L > N
        with pytest.raises(ValueError, match=f"block size {L} must divide the clip length {n} and be smaller"):
            frame_prediction_batch(torch.zeros(1, n, dtype=torch.long), L)
    for latent in ((2, 2, 2), (2, 4, 4), (2, 2, 4, 1), (16,)):                # 8 and 32 tokens, not 3-D
        with pytest.raises(ValueError, match="does not hold the clip's 16 tokens"):
            frame_prediction_batch(video, 4, latent)
    for block in ((1, 1, 2), (1, 1, 8)):                                      # 2 and 8 tokens, not L = 4
        with pytest.raises(ValueError, match="does not hold 4 tokens"):
            frame_prediction_batch(video, 4, (1, 4, 4), block)
