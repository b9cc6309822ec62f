"""Finite Scalar Quantization (FSQ), Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple".

Each of the D = len(levels) channels of a latent is bounded with a tanh, rounded to one of
``levels[d]`` integers (straight-through gradient) and rescaled to [-1, 1]. The implicit codebook is
the product grid, of size prod(levels) (64,000 for the NBP / MAGVITv2 levels [8, 8, 8, 5, 5, 5]).

Index order (mixed radix, first channel least significant)::

    index = sum_d digit_d * basis_d,   basis = [1, L_0, L_0*L_1, ...],   digit_d in [0, L_d)

where ``digit_d = code_d * (L_d // 2) + L_d // 2`` turns the normalized code back into an integer.
This matches the reference implementation of the FSQ paper (and the quantizer of the NBP release).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["FSQ"]


class FSQ(nn.Module):
    """FSQ quantizer over the channel axis (dim 1) of a ``[B, D, ...]`` tensor.

    Follows Mentzer et al. 2023 (Appendix A code): ``bound(z) = tanh(z + shift) * half_l - offset`` with
    ``half_l = (L - 1) * (1 - eps) / 2``, ``offset = 0.5`` for even L (0 for odd L) and
    ``shift = tan(offset / half_l)``; then round with a straight-through estimator and divide by
    ``L // 2``. Quantized values lie in [-1, 1] (even L: [-1, 1 - 2/L]).

    Args:
        levels: number of quantization levels per channel, each >= 2 (e.g. [8, 8, 8, 5, 5, 5]).
        eps: the bound's safety margin (paper: 1e-3).

    Raises:
        ValueError: empty ``levels`` or a level < 2, or a codebook too large for int64 indices.
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels}")
        size = 1
        for level in levels:
            size *= level
        if size >= 2**62:
            raise ValueError(f"FSQ codebook of {size} codes does not fit int64 indices")
        self.levels: list[int] = levels
        self.eps = float(eps)
        self._codebook_size = size
        basis = [1]
        for level in levels[:-1]:
            basis.append(basis[-1] * level)
        # Non-persistent: derived from the config, never stored in checkpoints.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float64), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    @property
    def dim(self) -> int:
        """Number of latent channels D = len(levels)."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """Number of codes, prod(levels) (64,000 for [8, 8, 8, 5, 5, 5])."""
        return self._codebook_size

    def _per_channel(self, values: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        """Reshape a ``[D]`` vector to ``[1, D, 1, ...]`` broadcasting against an ``ndim`` tensor."""
        return values.to(dtype).view(1, -1, *([1] * (ndim - 2)))

    def _check_codes_shape(self, z: torch.Tensor, name: str) -> None:
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape [B, D={self.dim}, ...] (one channel per FSQ level), "
                f"got {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {z.dtype}")

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` (float ``[B, D, ...]``) into (-L/2, L/2) per channel, before rounding (FSQ paper)."""
        levels = self._per_channel(self._levels, z.ndim, torch.float64)
        half_l = (levels - 1) * (1 - self.eps) / 2
        offset = torch.where(torch.remainder(levels, 2) == 0, 0.5, 0.0)
        shift = torch.tan(offset / half_l)
        return torch.tanh(z + shift.to(z.dtype)) * half_l.to(z.dtype) - offset.to(z.dtype)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Quantize float ``z`` ``[B, D, ...]`` to codes in [-1, 1], same shape/dtype, straight-through."""
        self._check_codes_shape(z, "z")
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        half_width = self._per_channel(self._levels, z.ndim, z.dtype).div(2).floor()
        return rounded / half_width

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a latent.

        Args:
            z: float ``[B, D, ...]`` unbounded encoder output (D = len(levels)).

        Returns:
            ``(z_q, indices)``: ``z_q`` float, same shape as ``z``, values on the FSQ grid in [-1, 1]
            with straight-through gradients; ``indices`` int64 ``[B, ...]`` in [0, codebook_size).

        Raises:
            ValueError: channel dimension is not len(levels). TypeError: ``z`` is not floating point.
        """
        z_q = self.quantize(z)
        return z_q, self.codes_to_indices(z_q)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Map grid codes (float ``[B, D, ...]`` in [-1, 1]) to int64 indices ``[B, ...]`` (mixed radix).

        Raises:
            ValueError: wrong channel count. TypeError: codes not floating point.
        """
        self._check_codes_shape(codes, "codes")
        half_width = self._per_channel(self._levels, codes.ndim, torch.float64).div(2).floor()
        digits = torch.round(codes.detach().to(torch.float64) * half_width + half_width).to(torch.int64)
        basis = self._basis.view(1, -1, *([1] * (codes.ndim - 2)))
        return (digits * basis).sum(dim=1)

    def indices_to_digits(self, indices: torch.Tensor) -> torch.Tensor:
        """Map int64 indices ``[B, ...]`` in [0, codebook_size) to their per-channel level numbers: int64
        ``[B, D, ...]``, channel d in [0, levels[d]) (the mixed-radix digits; two ids one rounding step apart
        differ by 1 in exactly one channel).

        Raises:
            TypeError: indices are not an integer tensor.
            ValueError: an index lies outside [0, codebook_size).
        """
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"FSQ indices must be an integer tensor, got {indices.dtype}")
        indices = indices.to(torch.int64)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"FSQ indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        basis = self._basis.view(1, -1, *([1] * (indices.ndim - 1)))
        levels = self._levels.to(torch.int64).view_as(basis)
        return torch.div(indices.unsqueeze(1), basis, rounding_mode="floor") % levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Map int64 indices ``[B, ...]`` in [0, codebook_size) to float32 codes ``[B, D, ...]`` in [-1, 1].

        Raises:
            TypeError: indices are not an integer tensor.
            ValueError: an index lies outside [0, codebook_size).
        """
        digits = self.indices_to_digits(indices)
        levels = self._levels.to(torch.int64).view(1, -1, *([1] * (digits.ndim - 2)))
        half_width = torch.div(levels, 2, rounding_mode="floor")
        return ((digits - half_width).to(torch.float32)) / half_width.to(torch.float32)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"
