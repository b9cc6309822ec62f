"""NBP token layouts: turn clips of video tokens into model inputs, targets, loss mask, positions and
block ids (DESIGN.md, "Token sequences"; official NBP release).

Frame prediction (K600), no prefix, block size L::

    tokens    = video[:, :-L]           position i holds video token i
    labels    = video[:, L:]            position i predicts token i + L (the same slot one block later)
    block_ids = i // L                  attention: block_id[key] <= block_id[query]
    loss_mask = 1 everywhere            (every target is a video token)

With L = 1 this is next-token prediction (the NTP baseline) through the same code.

Class- or text-conditional hybrid (UCF-101), P condition tokens, ids as in the official release (special ids
0..L-1 with BOV = 0 and MBOS_i = i, then the condition vocabulary, then the video codes)::

    sequence  = [c_1..c_P, BOV, z_0 .. z_{L-2}, z_{L-1}, MBOS_1..MBOS_{L-1}, z_L, ..., z_{N-L-1}]
    block ids =  0 ... 0,   1,   2 ..    L,     L+1 ...                L+1,  L+2 (one per block) ...
    labels    = (cut)     z_0, z_1 .. z_{L-1},  z_L ..          z_{2L-1}, ...  z_{N-1}

The condition block is bidirectional and seen by everything after it; BOV and the first block's
tokens are causal singletons (the first block is generated token by token); the block
``[z_{L-1}, MBOS_1..]`` predicts block 1; from then on block r predicts block r + 1. Loss only on
the N video targets. Generation: L + (N/L - 1) forward passes (16 + 79 = 95 for 5x16x16, L = 16).
Text conditions are padded to P; padded positions are masked as keys (``key_padding``).

Block order. Clips arrive flattened (t, h, w)-major. A block shape (bt, bh, bw) that is not a run of
that order (e.g. 1x4x4 or 2x1x8 on 16-wide latents, the paper's ablation) is made contiguous by
reordering the clip block-major (:func:`block_major_order`: blocks in (t, h, w) order over the block
grid, tokens (t, h, w)-major inside a block). For row blocks (1x1xW), whole-frame blocks and the
default this order is the identity. Everything below ("video token k") is in that order; generation
maps back with the inverse permutation.

Positions. ``position_ids`` count input positions 0 .. S-1; the model's learned tables split them
into the condition table (positions < P) and the video-stream table (position - P), the paper's
separate tables. ``grid_position_ids`` [3, B, S] are (t, h, w) coordinates for 3D RoPE (megatron's
multimodal rotary embedding, Qwen2-VL's convention for non-video tokens):

    condition token p          (p, p, p)
    BOV                        (P, P, P)
    video token z_k            (P' + t_k, P' + h_k, P' + w_k),  P' = P + 1 (hybrid) or 0 (frame prediction)
    MBOS_j                     the coordinates of z_j: the block [z_{L-1}, MBOS_1..] stands where block 0
                               stands in the steady state (block r at block r's coordinates predicts r+1)
"""

from __future__ import annotations

from dataclasses import dataclass

import math

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
        grid_position_ids: int64 [3, B, S] (t, h, w) coordinates for 3D RoPE (module docstring).
        key_padding: bool [B, S], True at padded condition positions; None when nothing is padded.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    block_ids: torch.Tensor
    grid_position_ids: torch.Tensor
    key_padding: torch.Tensor | None = None


def block_major_order(latent_shape: tuple[int, int, int], block_shape: tuple[int, int, int]) -> torch.Tensor:
    """Permutation putting every block's tokens next to each other.

    Args:
        latent_shape: (T', H', W').
        block_shape: (bt, bh, bw), each dividing the latent extent.

    Returns:
        int64 [N]: ``video_block_major = video_t_major[..., order]``; the inverse is ``argsort(order)``.

    Raises:
        ValueError: a block shape that does not tile the latent.
    """
    (t, h, w), (bt, bh, bw) = latent_shape, block_shape
    if min(bt, bh, bw) < 1 or t % bt or h % bh or w % bw:
        raise ValueError(f"block shape {tuple(block_shape)} does not tile latent shape {tuple(latent_shape)}")
    grid = torch.arange(t * h * w).view(t // bt, bt, h // bh, bh, w // bw, bw)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def _video_order(n: int, block_size: int, latent_shape, block_shape) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(block-major order or None for the identity, (t, h, w) coordinates [3, N] in that order)."""
    latent_shape = (1, 1, n) if latent_shape is None else tuple(int(x) for x in latent_shape)
    if len(latent_shape) != 3 or latent_shape[0] * latent_shape[1] * latent_shape[2] != n:
        raise ValueError(f"latent shape {latent_shape} does not hold the clip's {n} tokens")
    grid = video_grid_coordinates(latent_shape)
    if block_shape is None:
        return None, grid
    block_shape = tuple(int(x) for x in block_shape)
    if block_shape[0] * block_shape[1] * block_shape[2] != block_size:
        raise ValueError(f"block shape {block_shape} does not hold {block_size} tokens")
    order = block_major_order(latent_shape, block_shape)
    if torch.equal(order, torch.arange(n)):
        return None, grid
    return order, grid[:, order]


def video_grid_coordinates(latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """(t, h, w) of every video token in the (t, h, w)-major flattening: int64 [3, N]."""
    t, h, w = latent_shape
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    return grid.reshape(3, -1)


def frame_prediction_grid_positions(latent_shape: tuple[int, int, int], block_shape: tuple[int, int, int]) -> torch.Tensor:
    """3D RoPE coordinates of the S = N - L frame-prediction inputs (video tokens 0 .. N-L-1 in block
    order): int64 [3, S]."""
    n, L = math.prod(latent_shape), math.prod(block_shape)
    return _video_order(n, L, latent_shape, block_shape)[1][:, :-L]


def hybrid_grid_positions(num_condition: int, latent_shape: tuple[int, int, int],
                          block_shape: tuple[int, int, int]) -> torch.Tensor:
    """3D RoPE coordinates of the P + N hybrid inputs (module docstring): int64 [3, P + N]."""
    n, L = math.prod(latent_shape), math.prod(block_shape)
    return _hybrid_grid(num_condition, _video_order(n, L, latent_shape, block_shape)[1], L)


def _hybrid_grid(P: int, video_grid: torch.Tensor, L: int) -> torch.Tensor:
    video = video_grid + (P + 1)
    prefix = torch.arange(P + 1).expand(3, P + 1)                     # condition tokens and BOV
    return torch.cat([prefix, video[:, :L], video[:, 1:L], video[:, L:-L]], dim=1)


def frame_prediction_block_ids(seq_length: int, block_size: int) -> torch.Tensor:
    """Block id of each of ``seq_length`` positions: int64 [S], ``i // block_size``."""
    return torch.arange(seq_length) // block_size


def frame_prediction_batch(video_tokens: torch.Tensor, block_size: int,
                           latent_shape: tuple[int, int, int] | None = None,
                           block_shape: tuple[int, int, int] | None = None) -> LayoutBatch:
    """Frame-prediction layout of a batch of clips.

    Args:
        video_tokens: int [B, N] video token ids of whole clips, flattened (t, h, w).
        block_size: L, tokens per block; must divide N.
        latent_shape: (T', H', W') for the 3D RoPE coordinates (default: (1, 1, N), a 1-D sequence).
        block_shape: (bt, bh, bw) with product L: the clip is reordered block-major (module docstring);
            default: the input order.

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
    order, grid = _video_order(n, block_size, latent_shape, block_shape)
    video_tokens = video_tokens.long() if order is None else video_tokens.long()[:, order]
    seq = n - block_size
    positions = torch.arange(seq).expand(batch, seq)
    return LayoutBatch(
        tokens=video_tokens[:, :-block_size].contiguous(),
        labels=video_tokens[:, block_size:].contiguous(),
        loss_mask=torch.ones(batch, seq, dtype=torch.float32),
        position_ids=positions.contiguous(),
        block_ids=frame_prediction_block_ids(seq, block_size).expand(batch, seq).contiguous(),
        grid_position_ids=grid[:, None, :seq].expand(3, batch, seq).contiguous(),
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
                 condition_vocab_size: int, condition_padding: torch.Tensor | None = None,
                 latent_shape: tuple[int, int, int] | None = None,
                 block_shape: tuple[int, int, int] | None = None) -> LayoutBatch:
    """Class- or text-conditional hybrid layout of a batch (model ids, see the module docstring).

    Args:
        video_tokens: int [B, N] video codes (0 .. codebook-1), flattened (t, h, w).
        condition: int [B, P] condition ids (0 .. condition_vocab_size-1): [B, 1] class labels, or
            text ids padded to P (the ids at padded positions are ignored).
        block_size: L; must divide N, N >= 2L.
        condition_vocab_size: C, number of condition ids (video ids are shifted by L + C).
        condition_padding: bool [B, P], True at padded condition positions (masked as keys).
        latent_shape: (T', H', W') for the 3D RoPE coordinates (default (1, 1, N)).
        block_shape: (bt, bh, bw) with product L: block-major reordering (default: input order).

    Returns:
        LayoutBatch with S = P + N; loss_mask is 0 on the P condition positions; ``key_padding`` set
        when ``condition_padding`` has any True.

    Raises:
        ValueError: shapes that do not fit, or a (non-padded) condition id outside [0, C).
    """
    if video_tokens.dim() != 2 or condition.dim() != 2 or video_tokens.shape[0] != condition.shape[0]:
        raise ValueError(f"need video [B, N] and condition [B, P], got {tuple(video_tokens.shape)} and "
                         f"{tuple(condition.shape)}")
    batch, n = video_tokens.shape
    p, L = condition.shape[1], block_size
    if L < 1 or n % L or n < 2 * L:
        raise ValueError(f"block size {L} must divide the clip length {n} at least twice")
    order, grid = _video_order(n, L, latent_shape, block_shape)
    if order is not None:
        video_tokens = video_tokens[:, order]
    if condition_padding is not None:
        if condition_padding.shape != condition.shape:
            raise ValueError(f"condition_padding {tuple(condition_padding.shape)} must match condition "
                             f"{tuple(condition.shape)}")
        condition = condition.masked_fill(condition_padding, 0)
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
    key_padding = None
    if condition_padding is not None and bool(condition_padding.any()):
        key_padding = torch.cat([condition_padding.bool(), torch.zeros(batch, n, dtype=torch.bool)], dim=1)
    return LayoutBatch(
        tokens=tokens.contiguous(),
        labels=labels.contiguous(),
        loss_mask=loss_mask,
        position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
        block_ids=hybrid_block_ids(p, n, L).expand(batch, seq).contiguous(),
        grid_position_ids=_hybrid_grid(p, grid, L)[:, None].expand(3, batch, seq).contiguous(),
        key_padding=key_padding,
    )
