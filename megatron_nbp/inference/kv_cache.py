"""Static, preallocated key/value cache for block-by-block decoding (no torch.cat per step)."""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of every layer in fixed buffers [L, B, heads, max_length, head_dim].

    ``update(layer, start, k, v)`` writes the new keys/values at positions ``start : start + s`` in
    place and returns views of positions ``0 : start + s`` for attention.

    Raises:
        ValueError: writing past ``max_length`` or with a mismatched batch/head shape.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        # Uninitialised: ``update`` hands out positions 0 : end only, all written before they are read.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.max_length = max_length

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, heads, s, head_dim]. Returns cached keys/values [B, heads, start + s, head_dim]."""
        end = start + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; write up to {end} requested")
        if k.shape[:2] != self.keys.shape[1:3]:
            raise ValueError(f"cache is for batch/heads {tuple(self.keys.shape[1:3])}, got {tuple(k.shape[:2])}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
