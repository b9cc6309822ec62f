"""Reconstruction metrics of the tokenizer: PSNR and SSIM (Wang et al. 2004) on videos in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of float ``[B, ...]`` signals in [-1, 1] (peak-to-peak 2): ``10 log10(4 / MSE)``.

    Returns float64 ``[B]`` (``inf`` where identical).

    Raises:
        ValueError: shapes differ.
    """
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
    mse = (original.double() - reconstruction.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(original: torch.Tensor, reconstruction: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-sample mean SSIM (Wang, Bovik, Sheikh & Simoncelli 2004) of videos float ``[B, C, T, H, W]`` in [-1, 1].

    As the paper's reference code: images mapped to [0, 1] (data range L = 1), Gaussian window
    ``window x window`` with ``sigma``, "valid" filtering (no padding), ``C1 = (0.01 L)^2``,
    ``C2 = (0.03 L)^2``; the SSIM map is averaged over every channel, frame and valid position.
    Computed in float64 on the inputs' device.

    Returns float64 ``[B]``.

    Raises:
        ValueError: shapes differ, not 5-D, or frames smaller than the window.
    """
    if original.shape != reconstruction.shape or original.ndim != 5:
        raise ValueError(f"expected two [B, C, T, H, W] tensors of equal shape, got {tuple(original.shape)} "
                         f"and {tuple(reconstruction.shape)}")
    b, c, t, h, w = original.shape
    if h < window or w < window:
        raise ValueError(f"frames {h}x{w} are smaller than the {window}x{window} SSIM window")
    x = ((original.double().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    y = ((reconstruction.double().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    kernel = _gaussian_window(window, sigma).to(x.device).view(1, 1, window, window)
    mu_x, mu_y = F.conv2d(x, kernel), F.conv2d(y, kernel)
    sxx = F.conv2d(x * x, kernel) - mu_x**2
    syy = F.conv2d(y * y, kernel) - mu_y**2
    sxy = F.conv2d(x * y, kernel) - mu_x * mu_y
    c1, c2 = (0.01) ** 2, (0.03) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return value.reshape(b, -1).mean(1)

