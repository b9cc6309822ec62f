"""Temporally causal building blocks of the MAGVITv2 tokenizer (Yu et al. 2023, "Language Model Beats
Diffusion - Tokenizer is Key to Visual Generation"), as reproduced by NBP (Ren et al. 2025).

All modules take and return float tensors ``[B, C, T, H, W]``. Every output frame t depends only on input
frames <= t (after the documented stride), which is what lets NBP generate latent frames causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalConv3d", "FrameGroupNorm", "ResBlock3d", "DepthToSpace3d", "Swish", "make_activation", "PAD_MODES",
           "ACTIVATIONS"]

PAD_MODES = ("replicate", "zeros")
ACTIVATIONS = ("silu", "swish_learned")


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
        spatial_pad_mode: "zeros" (this project's default: symmetric zero padding) or "replicate"
            (edge pixels copied, as the official NBP release's ``F.pad(..., mode="replicate")``).

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
        spatial_pad_mode: str = "zeros",
    ):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d needs odd spatial kernel sizes, got {(kt, kh, kw)}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if spatial_pad_mode not in PAD_MODES:
            raise ValueError(f"spatial_pad_mode must be one of {PAD_MODES}, got {spatial_pad_mode!r}")
        self.time_pad = kt - 1
        self.pad_mode = pad_mode
        self.spatial_pad_mode = spatial_pad_mode
        self.spatial_pad = (kw // 2, kw // 2, kh // 2, kh // 2, 0, 0)
        conv_padding = (0, kh // 2, kw // 2) if spatial_pad_mode == "zeros" else 0
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=_triple(stride), padding=conv_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the causal convolution to ``x`` float ``[B, Cin, T, H, W]``."""
        if self.time_pad > 0:
            if self.pad_mode == "replicate":
                front = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            else:
                front = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, x.shape[3], x.shape[4])
            if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
                # cat keeps channels-last only if every input has it (else the convolution converts back)
                front = front.contiguous(memory_format=torch.channels_last_3d)
            x = torch.cat([front, x], dim=2)
        if self.spatial_pad_mode == "replicate" and any(self.spatial_pad):
            x = F.pad(x, self.spatial_pad, mode="replicate")
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


class Swish(nn.Module):
    """Swish with a learned per-channel slope, ``x * sigmoid(beta_c * x)`` (beta initialized to 1).

    The official NBP MAGVITv2 uses this form (parameter ``beta`` of shape ``[1, C, 1, 1, 1]``); with
    beta = 1 it is SiLU. Shapes: ``[B, C, T, H, W] float -> same``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


def make_activation(kind: str, channels: int) -> nn.Module:
    """``"silu"`` -> parameter-free ``nn.SiLU``; ``"swish_learned"`` -> :class:`Swish` (official NBP layout).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "silu":
        return nn.SiLU()
    if kind == "swish_learned":
        return Swish(channels)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


class ResBlock3d(nn.Module):
    """MAGVITv2 residual unit: (GroupNorm, Swish, CausalConv3d 3x3x3) x 2 plus a skip connection.

    The skip is the identity, or a 1x1x1 convolution when the channel count changes. The second
    convolution is zero-initialized, so a fresh unit computes its skip path only.

    Shapes: ``[B, Cin, T, H, W] float -> [B, Cout, T, H, W]``.

    Raises:
        ValueError: a channel count not divisible by ``norm_groups``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_groups: int,
        pad_mode: str = "replicate",
        spatial_pad_mode: str = "zeros",
        activation: str = "silu",
    ):
        super().__init__()
        for channels in (in_channels, out_channels):
            if channels % norm_groups:
                raise ValueError(f"{channels} channels are not divisible by norm_groups={norm_groups}")
        self.norm1 = FrameGroupNorm(norm_groups, in_channels)
        self.act1 = make_activation(activation, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, pad_mode=pad_mode, spatial_pad_mode=spatial_pad_mode)
        self.norm2 = FrameGroupNorm(norm_groups, out_channels)
        self.act2 = make_activation(activation, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, pad_mode=pad_mode, spatial_pad_mode=spatial_pad_mode)
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        )
        # Each unit starts as its skip path (zero residual): faster, more stable early training.
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update of ``x`` float ``[B, Cin, T, H, W]``."""
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.act2(self.norm2(h)))
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
