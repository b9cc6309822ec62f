"""NBP token layouts: turn clips of video tokens into model inputs, targets, loss mask, positions and
block ids (DESIGN.md, "Token sequences"; official NBP release).

Frame prediction (K600), no prefix, block size L::

    tokens    = video[:, :-L]           position i holds video token i
    labels    = video[:, L:]            position i predicts token i + L (the same slot one block later)
    block_ids = i // L                  attention: block_id[key] <= block_id[query]
    loss_mask = 1 everywhere            (every target is a video token)

With L = 1 this is next-token prediction (the NTP baseline) through the same code.

Class-conditional hybrid (UCF-101), P condition tokens, ids as in the official release (special ids
0..L-1 with BOV = 0 and MBOS_i = i, then the condition vocabulary, then the video codes)::

    sequence  = [c_1..c_P, BOV, z_0 .. z_{L-2}, z_{L-1}, MBOS_1..MBOS_{L-1}, z_L, ..., z_{N-L-1}]
    block ids =  0 ... 0,   1,   2 ..    L,     L+1 ...                L+1,  L+2 (one per block) ...
    labels    = (cut)     z_0, z_1 .. z_{L-1},  z_L ..          z_{2L-1}, ...  z_{N-1}

The condition block is bidirectional and seen by everything after it; BOV and the first block's
tokens are causal singletons (the first block is generated token by token); the block
``[z_{L-1}, MBOS_1..]`` predicts block 1; from then on block r predicts block r + 1. Loss only on
the N video targets. Generation: L + (N/L - 1) forward passes (16 + 79 = 95 for 5x16x16, L = 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayoutBatch:
    """One micro-batch in model form (all tensors [B, S], S = N - L for frame prediction).

    Attributes:
        tokens: int64 input ids.
        labels: int64 target ids (the token each position predicts).
        loss_mask: float32, 1.0 where the target counts in the loss.
        position_ids: int64 learned absolute position of each input token.
        block_ids: int64 block id of each input token (see megatron_nbp.masks).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    block_ids: torch.Tensor


def frame_prediction_block_ids(seq_length: int, block_size: int) -> torch.Tensor:
    """Block id of each of ``seq_length`` positions: int64 [S], ``i // block_size``."""
    return torch.arange(seq_length) // block_size


def frame_prediction_batch(video_tokens: torch.Tensor, block_size: int) -> LayoutBatch:
    """Frame-prediction layout of a batch of clips.

    Args:
        video_tokens: int [B, N] video token ids of whole clips, flattened (t, h, w).
        block_size: L, tokens per block; must divide N.

    Returns:
        LayoutBatch with S = N - L.

    Raises:
        ValueError: if the input is not 2-D or L does not divide N.
    """
    if video_tokens.dim() != 2:
        raise ValueError(f"video_tokens must be [B, N], got shape {tuple(video_tokens.shape)}")
    batch, n = video_tokens.shape
    if block_size < 1 or n % block_size or n <= block_size:
        raise ValueError(f"block size {block_size} must divide the clip length {n} and be smaller")
    video_tokens = video_tokens.long()
    seq = n - block_size
    positions = torch.arange(seq).expand(batch, seq)
    return LayoutBatch(
        tokens=video_tokens[:, :-block_size].contiguous(),
        labels=video_tokens[:, block_size:].contiguous(),
        loss_mask=torch.ones(batch, seq, dtype=torch.float32),
        position_ids=positions.contiguous(),
        block_ids=frame_prediction_block_ids(seq, block_size).expand(batch, seq).contiguous(),
    )


def corrupt_video_tokens(tokens: torch.Tensor, pkeep: float, video_token_offset: int, vocab_size: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The official release's ``pkeep`` augmentation: each input *video* token is kept with probability
    ``pkeep`` and otherwise replaced by a random id drawn from the whole model vocabulary (as
    ``torch.randint_like(z_indices, vocab_size)`` there). Targets are not touched.

    Args:
        tokens: int64 [B, S] model input ids; video tokens are those >= ``video_token_offset``.
        pkeep: keep probability in (0, 1]; 1 returns ``tokens`` unchanged.
        vocab_size: model vocabulary (unpadded, special + condition + video ids).
        generator: RNG (default: torch's global one, which megatron seeds alike on TP partners).

    Returns:
        int64 [B, S] input ids.
    """
    if pkeep >= 1.0:
        return tokens
    video = tokens >= video_token_offset
    replace = (torch.rand(tokens.shape, generator=generator) >= pkeep) & video
    random_ids = torch.randint(0, vocab_size, tokens.shape, generator=generator)
    return torch.where(replace, random_ids, tokens)


def hybrid_block_ids(num_condition: int, num_video: int, block_size: int) -> torch.Tensor:
    """Block id of each of the P + N input positions of the hybrid layout: int64 [P + N]."""
    P, N, L = num_condition, num_video, block_size
    ids = torch.empty(P + N, dtype=torch.long)
    ids[:P] = 0
    ids[P:P + L] = torch.arange(1, L + 1)              # BOV, z_0 .. z_{L-2}: singletons
    rest = torch.arange(N - L) // L + (L + 1)           # [z_{L-1}, MBOS..] then one id per block
    ids[P + L:] = rest
    return ids


def hybrid_batch(video_tokens: torch.Tensor, condition: torch.Tensor, block_size: int,
                 condition_vocab_size: int) -> LayoutBatch:
    """Class-conditional hybrid layout of a batch (model ids, see the module docstring).

    Args:
        video_tokens: int [B, N] video codes (0 .. codebook-1), flattened (t, h, w).
        condition: int [B, P] condition ids (0 .. condition_vocab_size-1), e.g. [B, 1] class labels.
        block_size: L; must divide N, N >= 2L.
        condition_vocab_size: C, number of condition ids (video ids are shifted by L + C).

    Returns:
        LayoutBatch with S = P + N; loss_mask is 0 on the P condition positions.

    Raises:
        ValueError: shapes that do not fit, or a condition id outside [0, C).
    """
    if video_tokens.dim() != 2 or condition.dim() != 2 or video_tokens.shape[0] != condition.shape[0]:
        raise ValueError(f"need video [B, N] and condition [B, P], got {tuple(video_tokens.shape)} and "
                         f"{tuple(condition.shape)}")
    batch, n = video_tokens.shape
    p, L = condition.shape[1], block_size
    if L < 1 or n % L or n < 2 * L:
        raise ValueError(f"block size {L} must divide the clip length {n} at least twice")
    if condition.numel() and (condition.min() < 0 or condition.max() >= condition_vocab_size):
        raise ValueError(f"condition ids must be in [0, {condition_vocab_size}), got {condition.tolist()}")
    video = video_tokens.long() + L + condition_vocab_size
    specials = torch.arange(L).expand(batch, L)          # BOV = 0, MBOS_i = i
    tokens = torch.cat([
        condition.long() + L,                             # c_1 .. c_P
        specials[:, :1],                                  # BOV
        video[:, :L],                                     # z_0 .. z_{L-1}
        specials[:, 1:],                                  # MBOS_1 .. MBOS_{L-1}
        video[:, L:n - L],                                # z_L .. z_{N-L-1}
    ], dim=1)
    seq = p + n
    labels = torch.cat([torch.zeros(batch, p, dtype=torch.long), video], dim=1)
    loss_mask = torch.cat([torch.zeros(batch, p), torch.ones(batch, n)], dim=1)
    return LayoutBatch(
        tokens=tokens.contiguous(),
        labels=labels.contiguous(),
        loss_mask=loss_mask,
        position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
        block_ids=hybrid_block_ids(p, n, L).expand(batch, seq).contiguous(),
    )
