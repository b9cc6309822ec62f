"""Static, preallocated key/value cache for block-by-block decoding (no torch.cat per step)."""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of every layer in fixed buffers [L, B, heads, max_length, head_dim].

    Two ways to write a step's keys and values:

    * ``update(layer, start, k, v)`` (eager decoding): writes positions ``start : start + s`` with a Python
      slice and returns views of positions ``0 : start + s`` for attention;
    * ``write(layer, index, k, v)`` (static-shape decoding, megatron_nbp.inference.static_decode): writes the
      positions held in a device tensor ``index`` and returns the whole buffers, so that every step has the
      same shapes and no host value (a CUDA graph replays it at any position).

    The buffers start zero-filled: a static-shape step attends over every position and masks the unwritten
    ones out, which needs finite values there (a masked 0 x NaN is still NaN).

    Raises:
        ValueError: writing past ``max_length`` or with a mismatched batch/head shape.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length

    def _check(self, k: torch.Tensor) -> None:
        if k.shape[:2] != self.keys.shape[1:3]:
            raise ValueError(f"cache is for batch/heads {tuple(self.keys.shape[1:3])}, got {tuple(k.shape[:2])}")

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, heads, s, head_dim]. Returns cached keys/values [B, heads, start + s, head_dim]."""
        end = start + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; write up to {end} requested")
        self._check(k)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape write: k, v [B, heads, s, head_dim] go to the cache positions ``index`` (int64 [s], on
        the cache's device; ``index_copy_``, no host synchronisation). Returns the whole buffers of the layer,
        keys and values [B, heads, max_length, head_dim]; the caller masks the positions not written yet.

        The index is not range-checked here (that would read it on the host): an index outside
        [0, max_length) raises in ``index_copy_`` on the CPU and is a device-side assert on a GPU.
        """
        self._check(k)
        self.keys[layer].index_copy_(2, index, k)
        self.values[layer].index_copy_(2, index, v)
        return self.keys[layer], self.values[layer]
