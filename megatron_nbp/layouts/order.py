"""Block order and (t, h, w) coordinates of the video tokens of a clip, shared by every token layout.

Block order. Clips arrive flattened (t, h, w)-major. A block shape (bt, bh, bw) that is not a run of
that order (e.g. 1x4x4 or 2x1x8 on 16-wide latents, the paper's ablation) is made contiguous by
reordering the clip block-major (:func:`block_major_order`: blocks in (t, h, w) order over the block
grid, tokens (t, h, w)-major inside a block). For row blocks (1x1xW), whole-frame blocks and the
default this order is the identity. Every layout works on "video token k" in that order; generation
maps back with the inverse permutation.

Coordinates. :func:`video_grid_coordinates` gives the (t, h, w) of every token, which the layouts
shift into their 3D RoPE positions (megatron's multimodal rotary embedding, Qwen2-VL's convention).
"""

from __future__ import annotations

import torch


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


def video_grid_coordinates(latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """(t, h, w) of every video token in the (t, h, w)-major flattening: int64 [3, N]."""
    t, h, w = latent_shape
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    return grid.reshape(3, -1)


def video_order(n: int, block_size: int, latent_shape: tuple[int, int, int] | None,
                block_shape: tuple[int, int, int] | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The block order of a clip of ``n`` tokens and the coordinates of its tokens in that order.

    Args:
        n: N, tokens per clip.
        block_size: L, tokens per block.
        latent_shape: (T', H', W') with product N; None = (1, 1, N), a 1-D sequence.
        block_shape: (bt, bh, bw) with product L; None = the input order.

    Returns:
        (int64 [N] block-major order, or None where it is the identity; int64 [3, N] (t, h, w) coordinates
        of the tokens in that order).

    Raises:
        ValueError: a latent shape that does not hold N tokens, a block shape that does not hold L tokens
            or does not tile the latent.
    """
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
