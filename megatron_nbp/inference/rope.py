"""3D rotary position embedding for the single-device decoder, numerically megatron-core's
``MultimodalRotaryEmbedding`` + ``apply_rotary_pos_emb`` (non-interleaved halves, Qwen2-VL M-RoPE):
the head dimension's frequency pairs are split into (t, h, w) sections, each rotated by that axis's
coordinate."""

from __future__ import annotations

import torch


def mrope_frequencies(grid_positions: torch.Tensor, head_dim: int, section: list[int],
                      base: float = 10000.0) -> torch.Tensor:
    """Rotation angles of every position.

    Args:
        grid_positions: int64 [3, B, S] (t, h, w) coordinates (megatron_nbp.layouts).
        head_dim: D, even; ``sum(section) == D // 2``.
        section: frequencies given to t, h and w (ModelConfig.mrope_section).
        base: RoPE base period.

    Returns:
        float32 [B, S, D] angles, laid out [first half | second half] as megatron's rotate-half form.

    Raises:
        ValueError: a section that does not cover half the head dimension.
    """
    if sum(section) * 2 != head_dim:
        raise ValueError(f"mrope section {section} must sum to head_dim / 2 = {head_dim // 2}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=grid_positions.device)
                               / head_dim))
    angles = grid_positions.float().unsqueeze(-1) * inv_freq         # [3, B, S, D/2]
    angles = torch.cat([angles, angles], dim=-1)                       # [3, B, S, D]
    chunks = angles.split(list(section) * 2, dim=-1)
    return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys.

    Args:
        x: [B, heads, S, D].
        angles: float32 [B, S, D] from :func:`mrope_frequencies`.

    Returns:
        [B, heads, S, D] in the dtype of ``x``.
    """
    cos = angles.cos().unsqueeze(1).to(x.dtype)
    sin = angles.sin().unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
