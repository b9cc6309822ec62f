"""Frechet Video Distance (Unterthiner et al., 2018, "Towards Accurate Generative Models of Video: A New
Metric & Challenges", arXiv:1812.01717).

Protocol (as in the reference TF implementation and the StyleGAN-V / NBP evaluation code):

* each clip: uint8 RGB ``[T, H, W, 3]`` (16 frames in the NBP protocol: the first 16 of a 17-frame
  clip) -> shorter side resized to 224 (bilinear, ``align_corners=False``) and center-cropped to
  224x224 (for square clips this is the plain 224x224 resize of the TF code) -> scaled to ``[-1, 1]``;
* feature: the 400-d pre-softmax logits of the Kinetics-400 I3D (:mod:`megatron_nbp.eval.i3d`);
* distance between the Gaussians fitted to the two feature sets (mean, unbiased covariance):
  ``d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})``.

The matrix square roots are computed in float64 with ``torch.linalg.eigh`` (no scipy): ``S_1^{1/2}``
from the eigendecomposition of the symmetric PSD ``S_1`` (eigenvalues below ``D * eps * max`` -- round-off,
including negative ones -- set to 0),
then the trace term as ``sum(sqrt(eigvalsh(S_1^{1/2} S_2 S_1^{1/2})))``, which is symmetric PSD, so no
complex parts appear (``tr sqrt(S_1 S_2)`` equals it since ``S_1 S_2`` is similar to that matrix).
This is the TF-GAN ``trace_sqrt_product`` formulation with an eigendecomposition instead of an SVD.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

FVD_RESOLUTION = 224
FVD_NUM_FRAMES = 16  # NBP / StyleGAN-V: the first 16 frames of each 17-frame clip


def preprocess_clips(clips: np.ndarray | torch.Tensor, resolution: int = FVD_RESOLUTION) -> torch.Tensor:
    """uint8 clips -> I3D input.

    Args:
        clips: uint8 ``[B, T, H, W, 3]`` (numpy or torch) RGB.
        resolution: output side (224 for I3D).
    Returns:
        float32 ``[B, 3, T, resolution, resolution]`` in ``[-1, 1]``.
    Raises:
        ValueError: not a uint8 ``[B, T, H, W, 3]`` array.
    """
    x = torch.as_tensor(clips)
    if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 [B, T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    b, t, h, w, _ = x.shape
    frames = x.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), resolution)
    if size != (h, w):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    frames = frames[:, :, top:top + resolution, left:left + resolution]
    frames = frames / 127.5 - 1.0
    return frames.reshape(b, t, 3, resolution, resolution).permute(0, 2, 1, 3, 4).contiguous()


def resize_clips(clips: np.ndarray, resolution: int) -> np.ndarray:
    """Down/up-sample uint8 ``[B, T, H, W, 3]`` clips to ``resolution`` x ``resolution`` (shorter side +
    center crop, bilinear, rounded back to uint8): the K600 protocol's 64x64 evaluation resolution,
    applied to real and generated clips alike before :func:`preprocess_clips` brings them to 224.
    """
    x = torch.as_tensor(clips)
    b, t, h, w, _ = x.shape
    frames = x.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), resolution)
    if size != (h, w):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    frames = frames[:, :, top:top + resolution, left:left + resolution].round().clamp(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).reshape(b, t, resolution, resolution, 3).numpy()


@torch.no_grad()
def i3d_features(model: torch.nn.Module, clips: np.ndarray | torch.Tensor | Iterable[np.ndarray],
                 batch_size: int = 8, device: str | torch.device | None = None) -> torch.Tensor:
    """FVD features (I3D logits) of a set of clips.

    Args:
        model: :class:`~megatron_nbp.eval.i3d.InceptionI3d` (e.g. from ``weights.load_i3d``).
        clips: uint8 ``[N, T, H, W, 3]`` or an iterable of uint8 ``[T, H, W, 3]`` clips (T >= 9).
        batch_size: clips per I3D forward pass.
        device: where to run (default: the model's device).
    Returns:
        float64 ``[N, 400]`` on the CPU. On a GPU the convolutions run in full fp32 (cuDNN's TF32 default off
        inside this call), so features and FVD match a CPU run to fp32 rounding.
    """
    device = device or next(model.parameters()).device
    feats: list[torch.Tensor] = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for batch in _batches(clips, batch_size):
            feats.append(model(preprocess_clips(batch).to(device)).double().cpu())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if not feats:
        raise ValueError("no clips given")
    return torch.cat(feats)


def _batches(clips, batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(clips, (np.ndarray, torch.Tensor)) and np.ndim(clips) == 5:
        for i in range(0, len(clips), batch_size):
            yield clips[i:i + batch_size]
        return
    buf: list[np.ndarray] = []
    for clip in clips:
        buf.append(np.asarray(clip))
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean float64 ``[D]`` and unbiased covariance float64 ``[D, D]`` of features ``[N, D]``.

    Raises:
        ValueError: fewer than 2 samples or not 2-D.
    """
    x = torch.as_tensor(features).double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_eigvals(vals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: values below ``D * eps * max|lambda|``
    (negative ones included) are set to 0, so a rank-deficient covariance (N <= D samples) contributes
    no ``sqrt(noise)`` terms and FVD(x, x) is 0 to ~1e-10 instead of ~1e-5."""
    tol = vals.shape[-1] * torch.finfo(vals.dtype).eps * vals.abs().max().clamp_min(1e-300)
    return torch.where(vals > tol, vals, torch.zeros_like(vals))


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigh (round-off eigenvalues set to 0)."""
    vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (vecs * _psd_eigvals(vals).sqrt()) @ vecs.T


def frechet_distance_from_stats(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                                sigma2: torch.Tensor) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: ``[D]`` means; sigma1, sigma2: ``[D, D]`` symmetric PSD covariances (any float dtype;
            computed in float64).
    Returns:
        ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})``
        as a Python float (>= 0 up to round-off).
    Raises:
        ValueError: shapes do not match.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(a).double() for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = _psd_eigvals(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    dist = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt
    return float(dist)


def frechet_distance(features1: torch.Tensor | np.ndarray, features2: torch.Tensor | np.ndarray) -> float:
    """FVD between two feature sets ``[N1, D]`` and ``[N2, D]`` (e.g. from :func:`i3d_features`)."""
    return frechet_distance_from_stats(*gaussian_stats(features1), *gaussian_stats(features2))


def fvd_folds(fake: torch.Tensor, real: torch.Tensor, num_folds: int = 1) -> list[float]:
    """FVD of ``num_folds`` disjoint, equal slices of the generated features against the real ones.

    The fake set is split into ``num_folds`` contiguous folds of ``len(fake) // num_folds`` samples
    (the remainder is dropped); each fold is compared with the full real set, as in protocols that
    report mean +- std over several runs of a fixed sample count.

    Raises:
        ValueError: ``num_folds`` < 1 or folds of fewer than 2 samples.
    """
    if num_folds < 1 or len(fake) // num_folds < 2:
        raise ValueError(f"cannot split {len(fake)} samples into {num_folds} folds of >= 2")
    size = len(fake) // num_folds
    real_stats = gaussian_stats(real)
    return [frechet_distance_from_stats(*gaussian_stats(fake[i * size:(i + 1) * size]), *real_stats)
            for i in range(num_folds)]
