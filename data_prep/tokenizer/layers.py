"""Temporally causal building blocks of the MAGVITv2 tokenizer (Yu et al. 2023, "Language Model Beats
Diffusion - Tokenizer is Key to Visual Generation"), as reproduced by NBP (Ren et al. 2025).

All modules take and return float tensors ``[B, C, T, H, W]``. Every output frame t depends only on input
frames <= t (after the documented stride), which is what lets NBP generate latent frames causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalConv3d", "FrameGroupNorm", "ResBlock3d", "DepthToSpace3d", "PAD_MODES"]

PAD_MODES = ("replicate", "zeros")


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected an int or a (t, h, w) triple, got {value}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """3D convolution that is causal in time (MAGVITv2 "causal 3D CNN").

    The time axis gets ``kernel_t - 1`` frames of padding in front only (copies of the first frame for
    ``pad_mode="replicate"``, zeros for ``"zeros"``) and none at the back; the spatial axes get symmetric
    zero padding ``k // 2``. With time stride s, output frame j sees input frames ``s*j - (kernel_t-1)``
    .. ``s*j``, so an input of T frames gives ``(T - 1) // s + 1`` frames (17 -> 9 -> 5 for s = 2).

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: int or (t, h, w); spatial sizes must be odd.
        stride: int or (t, h, w).
        pad_mode: "replicate" (MAGVITv2/NBP default) or "zeros".

    Shapes: ``[B, Cin, T, H, W] float -> [B, Cout, (T-1)//st + 1, ceil(H/sh), ceil(W/sw)]``.

    Raises:
        ValueError: even spatial kernel or an unknown ``pad_mode``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        pad_mode: str = "replicate",
    ):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d needs odd spatial kernel sizes, got {(kt, kh, kw)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.time_pad = kt - 1
        self.pad_mode = pad_mode
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), stride=_triple(stride), padding=(0, kh // 2, kw // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the causal convolution to ``x`` float ``[B, Cin, T, H, W]``."""
        if self.time_pad > 0:
            if self.pad_mode == "replicate":
                front = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            else:
                front = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, x.shape[3], x.shape[4])
            x = torch.cat([front, x], dim=2)
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm computed separately for every frame (statistics over C/G x H x W, never over time).

    Normalizing over the time axis would leak future frames into the past; per-frame statistics keep
    the network causal (as NBP's GroupNorm3D on ``[(B T), C, H, W]``).

    Shapes: ``[B, C, T, H, W] float -> same``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return out.reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock3d(nn.Module):
    """MAGVITv2 residual unit: (GroupNorm, Swish, CausalConv3d 3x3x3) x 2 plus a skip connection.

    The skip is the identity, or a 1x1x1 convolution when the channel count changes. The second
    convolution is zero-initialized, so a fresh unit computes its skip path only.

    Shapes: ``[B, Cin, T, H, W] float -> [B, Cout, T, H, W]``.

    Raises:
        ValueError: a channel count not divisible by ``norm_groups``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, pad_mode: str = "replicate"):
        super().__init__()
        for channels in (in_channels, out_channels):
            if channels % norm_groups:
                raise ValueError(f"{channels} channels are not divisible by norm_groups={norm_groups}")
        self.norm1 = FrameGroupNorm(norm_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, pad_mode=pad_mode)
        self.norm2 = FrameGroupNorm(norm_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, pad_mode=pad_mode)
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        )
        # Each unit starts as its skip path (zero residual): faster, more stable early training.
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update of ``x`` float ``[B, Cin, T, H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DepthToSpace3d(nn.Module):
    """Causal depth-to-space upsampling (MAGVITv2 decoder), inverse of a strided causal conv.

    Channels ``C * st * sh * sw`` are rearranged into a ``st x sh x sw`` block per voxel; for st > 1 the
    first ``st - 1`` output frames are dropped, so T latent frames become ``1 + st * (T - 1)`` frames and
    the first frame stays alone (output frame k comes from input frame ceil(k / st): causal).

    Shapes: ``[B, C*st*sh*sw, T, H, W] float -> [B, C, 1 + st*(T-1), H*sh, W*sw]``.

    Raises:
        ValueError: channel count not divisible by ``st * sh * sw``.
    """

    def __init__(self, factors: tuple[int, int, int]):
        super().__init__()
        self.factors = tuple(int(f) for f in factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, sh, sw = self.factors
        b, c, t, h, w = x.shape
        if c % (st * sh * sw):
            raise ValueError(f"DepthToSpace3d: {c} channels not divisible by {st}*{sh}*{sw}")
        c_out = c // (st * sh * sw)
        x = x.reshape(b, c_out, st, sh, sw, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c_out, t * st, h * sh, w * sw)
        return x[:, :, st - 1 :]

    def extra_repr(self) -> str:
        return f"factors={self.factors}"
