"""Adversarial and perceptual parts of the tokenizer recipe (MAGVITv2, Yu et al. 2023; VQGAN, Esser et al.
2021; LeCam regularization, Tseng et al. 2021).

* :class:`PatchDiscriminator3d` - a 3D PatchGAN (pix2pix/VQGAN PatchGAN with 3D kernels) that scores
  overlapping space-time patches; it accepts videos and 1-frame images alike (joint image-video training).
* :func:`discriminator_loss` / :func:`generator_loss` - hinge or non-saturating GAN losses.
* :class:`LeCamEMA` - the LeCam regularizer with its exponential moving anchors.
* :func:`adaptive_generator_weight` - VQGAN's ratio of last-layer gradient norms.
* :class:`PerceptualLoss` - an optional feature-matching loss with a USER-SUPPLIED TorchScript feature
  network (nothing is downloaded; off unless a path is given).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchDiscriminator3d",
    "discriminator_loss",
    "generator_loss",
    "LeCamEMA",
    "adaptive_generator_weight",
    "PerceptualLoss",
    "GAN_LOSSES",
]

GAN_LOSSES = ("hinge", "non_saturating")


class PatchDiscriminator3d(nn.Module):
    """3D PatchGAN discriminator: float video ``[B, C, T, H, W]`` in [-1, 1] -> logits ``[B, 1, T, h, w]``.

    ``num_layers`` stride-2 (spatial) convolutions with kernel (3, 4, 4), LeakyReLU(0.2) and GroupNorm
    (not BatchNorm: batch statistics are ill-defined under DDP with tiny per-rank batches), then two
    stride-1 convolutions ending in one logit per space-time patch (VQGAN's NLayerDiscriminator, with
    3D kernels and time padding 1 so that T = 1 images and T = 17 clips share the same weights). For
    H = W = 64 and 3 layers the patch grid is 6 x 6 per frame.

    Args:
        in_channels: video channels. channels: width of the first layer (doubles per layer, at most 8x).
        num_layers: stride-2 layers (>= 1). norm_groups: GroupNorm groups (must divide every width).

    Raises:
        ValueError: ``num_layers < 1`` or a width not divisible by ``norm_groups``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm_groups: int = 8):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        kernel, pad = (3, 4, 4), (1, 1, 1)
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, kernel, (1, 2, 2), pad), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            if out % norm_groups:
                raise ValueError(f"discriminator width {out} is not divisible by norm_groups={norm_groups}")
            stride = (1, 2, 2) if i < num_layers else (1, 1, 1)
            layers += [nn.Conv3d(width, out, kernel, stride, pad, bias=False), nn.GroupNorm(norm_groups, out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv3d(width, 1, kernel, 1, pad))
        self.layers = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.layers(video)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss (scalar), to be minimized by D.

    hinge (Lim & Ye 2017, VQGAN): ``mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``;
    non_saturating (Goodfellow et al. 2014): ``mean(softplus(-D(x))) + mean(softplus(D(G(z))))``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "hinge":
        return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
    if kind == "non_saturating":
        return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator adversarial loss (scalar): hinge ``-mean(D(G(z)))``, non_saturating ``mean(softplus(-D(G(z))))``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


class LeCamEMA(nn.Module):
    """LeCam regularizer (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data").

    Keeps exponential moving averages ``alpha_R`` of mean D(real) and ``alpha_F`` of mean D(fake) (decay
    ``decay``; they start at 0) and returns
    ``R = mean(relu(D(real) - alpha_F)^2) + mean(relu(alpha_R - D(fake))^2)``, added to D's loss with a small
    weight (MAGVITv2 uses 0.001). The anchors are buffers, so they are checkpointed with ``state_dict``.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Move the anchors towards the batch means of D(real) and D(fake)."""
        self.ema_real.mul_(self.decay).add_((1 - self.decay) * logits_real.detach().double().mean())
        self.ema_fake.mul_(self.decay).add_((1 - self.decay) * logits_fake.detach().double().mean())

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The penalty (scalar, differentiable w.r.t. the logits) using the CURRENT anchors."""
        alpha_real = self.ema_real.to(logits_real.dtype)
        alpha_fake = self.ema_fake.to(logits_fake.dtype)
        return F.relu(logits_real - alpha_fake).pow(2).mean() + F.relu(alpha_real - logits_fake).pow(2).mean()


def adaptive_generator_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight ``lambda = ||grad_L(rec)|| / (||grad_L(gan)|| + 1e-4)`` (Esser et al. 2021, eq. 7).

    ``L`` is the decoder's last layer weight. The gradients are taken with ``torch.autograd.grad``
    (graphs retained for the following ``backward``); the result is detached and clamped to
    ``[0, max_weight]``.

    Returns:
        float scalar tensor (no grad).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:N`` it means here (the current device), other devices unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def fixed_devices(module: torch.jit.ScriptModule) -> set[torch.device]:
    """The devices written as constants into a TorchScript module's code (its inlined graph's ``Device``
    constants, e.g. where tracing recorded a tensor created in ``forward``); empty for a portable module."""
    devices = set()
    for node in module.inlined_graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "DeviceObjType":
            devices.add(torch.device(node.output().toIValue()))
    return devices


class PerceptualLoss(nn.Module):
    """Feature-matching loss with a user-supplied TorchScript feature network (e.g. an exported VGG/LPIPS trunk).

    The network is loaded with ``torch.jit.load`` from ``path`` (no download, no pickle), frozen, and
    applied to every frame: it takes float ``[N, 3, H, W]`` in [-1, 1] and returns a tensor or a
    list/tuple of tensors ``[N, C_k, H_k, W_k]``. The loss is the mean over feature maps of the mean
    squared difference of channel-normalized features (LPIPS without learned linear heads, Zhang et al. 2018).

    Shapes: ``forward(real, fake)`` with float ``[B, C, T, H, W]`` -> scalar.

    The archive's parameters and buffers are loaded straight onto ``device`` (default: the CPU). A tensor that
    a traced network creates in its forward (``torch.tensor(...)``, e.g. normalisation means) is recorded with
    the device it was traced on (``torch.to(CONSTANTS.c0, torch.device("cpu"))`` in its code), which neither
    ``map_location`` nor ``.to(device)`` changes; such a network is refused here rather than failing at the
    first training step (the check runs a batch of one 64x64 frame through a network whose code names another
    device; a 0-dim CPU tensor or a CPU index tensor works on any device and passes). Hold those tensors as
    buffers (``register_buffer``) before tracing to make it portable.

    Raises:
        FileNotFoundError: no file at ``path``. RuntimeError: not a TorchScript archive. ValueError: the
        network's code fixes a device other than ``device`` and a frame on ``device`` fails with a device mismatch.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str | None = None):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual feature network not found: {path} (supply a TorchScript file)")
        device = torch.device(device or "cpu")
        self.net = torch.jit.load(str(path), map_location=device).eval()
        others = sorted({str(d) for d in fixed_devices(self.net) if _indexed(d) != _indexed(device)})
        if others and not self._runs_on(device):
            raise ValueError(f"perceptual network {path} creates tensors on {', '.join(others)} in its traced code, "
                             f"not on the training device {device}: hold them as buffers (register_buffer) "
                             "and trace it again")
        for param in self.net.parameters():
            param.requires_grad_(False)

    def _runs_on(self, device: torch.device) -> bool:
        """Whether the network takes a small batch of frames on ``device`` without a device mismatch (a device
        constant can be harmless: a 0-dim CPU tensor is a scalar to a CUDA op, a CPU index tensor indexes it)."""
        try:
            with torch.no_grad():
                self.net(torch.zeros(1, 3, 64, 64, device=device))
        except RuntimeError as exc:  # TorchScript's message quotes the code (with its torch.device): read the errors
            reasons = [line for line in str(exc).splitlines() if "Error:" in line] or [str(exc)]
            return not any("device" in line for line in reasons)
        return True

    def train(self, mode: bool = True) -> "PerceptualLoss":  # the feature network stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def _features(self, video: torch.Tensor) -> list[torch.Tensor]:
        frames = video.transpose(1, 2).flatten(0, 1)
        feats = self.net(frames)
        feats = list(feats) if isinstance(feats, (list, tuple)) else [feats]
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in feats]

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_feats = self._features(real)
        fake_feats = self._features(fake)
        losses = [(r - f).pow(2).mean() for r, f in zip(real_feats, fake_feats)]
        return torch.stack(losses).mean()
