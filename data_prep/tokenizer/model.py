"""MAGVITv2-style causal 3D CNN video tokenizer with an FSQ bottleneck.

Follows Yu et al. 2023 ("Language Model Beats Diffusion - Tokenizer is Key to Visual Generation") as
reproduced by NBP (Ren et al. 2025): causal 3D convolutions, per-frame GroupNorm, Swish, residual
units, spatial stride 8 and causal temporal stride 4 that keeps the first frame alone, so a video of
T = 1 + 4n frames of H x W pixels becomes 1 + n latent frames of H/s x W/s FSQ tokens (s = the spatial stride, 8 by default)
(17x128x128 -> 5x16x16, 17x64x64 -> 5x8x8); an image is a 1-frame video.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TokenizerConfig
from .fsq import FSQ
from .layers import CausalConv3d, DepthToSpace3d, FrameGroupNorm, ResBlock3d, make_activation

__all__ = ["TokenizerConfig", "VideoTokenizer", "Encoder", "Decoder"]


def _silu_head(channels: int, groups: int, activation: str = "silu") -> list[nn.Module]:
    return [FrameGroupNorm(groups, channels), make_activation(activation, channels)]


def _run_layers(layers: nn.Sequential, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``layers(x)``; with ``recompute`` (and autograd recording) each :class:`ResBlock3d` keeps only its input
    for the backward pass and runs its forward again there (``torch.utils.checkpoint``, non-reentrant:
    autocast and the RNG state are replayed, so gradients equal the stored-activation run's)."""
    if not (recompute and torch.is_grad_enabled()):
        return layers(x)
    for layer in layers:
        if isinstance(layer, ResBlock3d):
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            x = layer(x)
    return x


class Encoder(nn.Module):
    """Causal encoder: float ``[B, C_in, 1+4n, H, W]`` -> unquantized latent ``[B, D, 1+n, H/s, W/s]`` (s = config.spatial_stride, 8 by default).

    D = len(config.levels). Latent frame t depends only on input frames 0..4t.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        chans, groups, pad = config.level_channels, config.norm_groups, config.pad_mode
        conv = dict(pad_mode=pad, spatial_pad_mode=config.spatial_pad_mode)
        res = dict(spatial_pad_mode=config.spatial_pad_mode, activation=config.activation)
        layers: list[nn.Module] = [CausalConv3d(config.in_channels, chans[0], 3, **conv)]
        current = chans[0]
        for level, channels in enumerate(chans):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock3d(current, channels, groups, pad, **res))
                current = channels
            if level < len(chans) - 1:
                time_stride = 2 if config.temporal_downsample[level] else 1
                space_stride = 2 if config.spatial_downsample[level] else 1
                layers.append(CausalConv3d(current, current, 3, stride=(time_stride, space_stride, space_stride),
                                           **conv))
        layers += [ResBlock3d(current, current, groups, pad, **res) for _ in range(config.num_mid_blocks)]
        layers += _silu_head(current, groups, config.activation)
        layers.append(nn.Conv3d(current, len(config.levels), 1))
        self.layers = nn.Sequential(*layers)
        self.recompute = False  # activation recomputation of the residual blocks (training memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_layers(self.layers, x, self.recompute)


class Decoder(nn.Module):
    """Causal decoder: codes ``[B, D, T', H', W']`` -> float ``[B, C_in, 1+4(T'-1), 8H', 8W']``.

    Mirrors :class:`Encoder`. Upsampling is a causal conv to ``factor_t * 4`` times the NEXT level's
    channels (MAGVITv2/NBP use the current level's channels: more compute at high resolution) followed
    by :class:`DepthToSpace3d`, so output frames 4t-3..4t (frame 0 for t = 0) depend only on latent
    frames 0..t.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        chans, groups, pad = config.level_channels, config.norm_groups, config.pad_mode
        conv = dict(pad_mode=pad, spatial_pad_mode=config.spatial_pad_mode)
        res = dict(spatial_pad_mode=config.spatial_pad_mode, activation=config.activation)
        current = chans[-1]
        layers: list[nn.Module] = [CausalConv3d(len(config.levels), current, 3, **conv)]
        layers += [ResBlock3d(current, current, groups, pad, **res) for _ in range(config.num_mid_blocks)]
        for level in reversed(range(len(chans))):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock3d(current, chans[level], groups, pad, **res))
                current = chans[level]
            if level > 0:
                # "next": the upsampling conv also moves to the next level's channel count;
                # "current" (official NBP): it keeps this level's width, the next ResBlock changes it.
                time_factor = 2 if config.temporal_downsample[level - 1] else 1
                space_factor = 2 if config.spatial_downsample[level - 1] else 1
                width = chans[level - 1] if config.decoder_upsample == "next" else current
                layers.append(CausalConv3d(current, width * time_factor * space_factor ** 2, 3, **conv))
                layers.append(DepthToSpace3d((time_factor, space_factor, space_factor)))
                current = width
        layers += _silu_head(current, groups, config.activation)
        layers.append(CausalConv3d(current, config.in_channels, 3, **conv))
        self.layers = nn.Sequential(*layers)
        self.recompute = False  # activation recomputation of the residual blocks (training memory)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _run_layers(self.layers, z, self.recompute)


class VideoTokenizer(nn.Module):
    """Causal 3D CNN tokenizer (MAGVITv2, Yu et al. 2023) with an FSQ quantizer (Mentzer et al. 2023).

    Args:
        config: a :class:`TokenizerConfig` (kept as ``self.config``).

    Videos are float32 ``[B, C_in, T, H, W]`` in [-1, 1] with T = 1 + 4n (n >= 0) and H, W multiples
    of the spatial stride s (8 by default); tokens are int64 ``[B, 1+n, H/s, W/s]`` in [0, codebook_size).
    Under bf16 autocast (:func:`data_prep.device.autocast`) the encoder's and decoder's convolutions run in bf16 while the
    FSQ quantizer stays fp32; the reconstruction then comes out in bf16 (cast it before a loss).
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if not isinstance(config, TokenizerConfig):
            raise TypeError(f"config must be a TokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = FSQ(config.levels)
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        """Number of distinct tokens, prod(config.levels) (64,000 for [8, 8, 8, 5, 5, 5])."""
        return self.quantizer.codebook_size

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid ``(T', H', W') = (1 + (T-1)/4, H/s, W/s)`` of a ``T x H x W`` video, s the config's
        spatial stride (8 by default): :meth:`TokenizerConfig.latent_shape`.

        Raises:
            ValueError: T is not 1 + 4n (n >= 0), or H / W is not a positive multiple of s.
        """
        return self.config.latent_shape(num_frames, height, width)

    def _check_video(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor) or not video.is_floating_point():
            raise TypeError(f"video must be a floating point tensor [B, C, T, H, W] in [-1, 1], got {video!r:.80}")
        if video.ndim != 5:
            raise ValueError(f"video must have shape [B, C, T, H, W], got {tuple(video.shape)}")
        if video.shape[1] != self.config.in_channels:
            raise ValueError(
                f"video must have {self.config.in_channels} channels in dim 1 ([B, C, T, H, W]), "
                f"got {video.shape[1]} (shape {tuple(video.shape)})"
            )
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])

    def encode_codes(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and quantize, keeping the straight-through codes (used for training).

        Args:
            video: float ``[B, C_in, 1+4n, H, W]`` in [-1, 1].

        Returns:
            ``(codes, indices)``: codes float ``[B, D, 1+n, H/s, W/s]`` (s = config.spatial_stride, 8 by default) in [-1, 1] (differentiable),
            indices int64 ``[B, 1+n, H/8, W/8]``.

        Raises:
            TypeError: non-float input. ValueError: wrong rank, channel count, T or H/W.
        """
        self._check_video(video)
        z = self.encoder(video)
        # FSQ always in fp32, also under bf16 autocast: tanh-bounding and rounding to a grid of up to 8 levels
        # per channel would move values across rounding boundaries in bf16 (8 mantissa bits) and change tokens.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.quantizer(z.float())

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Tokenize a video batch.

        Args:
            video: float ``[B, C_in, T, H, W]`` in [-1, 1], T = 1 + 4n, H and W multiples of 8.

        Returns:
            int64 ``[B, 1+n, H/8, W/8]`` FSQ indices in [0, codebook_size).

        Raises:
            TypeError: non-float input. ValueError: wrong rank, channel count, T or H/W.
        """
        return self.encode_codes(video)[1]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode float FSQ codes ``[B, D, T', H', W']`` to video float ``[B, C_in, 1+4(T'-1), 8H', 8W']``."""
        return self.decoder(codes)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruct videos from tokens.

        Args:
            indices: integer ``[B, T', H', W']`` in [0, codebook_size).

        Returns:
            float32 ``[B, C_in, 1+4(T'-1), 8H', 8W']``, approximately in [-1, 1] (not clamped).

        Raises:
            TypeError: non-integer indices. ValueError: wrong rank or out-of-range indices.
        """
        if not isinstance(indices, torch.Tensor) or indices.ndim != 4:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must have shape [B, T', H', W'], got {shape}")
        codes = self.quantizer.indices_to_codes(indices.to(self._device()))
        return self.decode_codes(codes.to(self._dtype()))

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: ``video`` float ``[B, C_in, T, H, W]`` -> ``(reconstruction same shape, indices)``.

        Gradients reach the encoder through FSQ's straight-through rounding.
        """
        codes, indices = self.encode_codes(video)
        return self.decode_codes(codes), indices

    def set_recompute(self, granularity: str | None) -> None:
        """Activation recomputation for training (Megatron-LM's ``--recompute-granularity``): ``"full"``
        stores only each residual block's input and recomputes the block in the backward pass (about a third
        more compute, a fraction of the activation memory: docs/benchmarks.md); ``None`` stores everything.
        Forward results and gradients are the same either way.

        Raises:
            ValueError: another granularity.
        """
        if granularity not in (None, "full"):
            raise ValueError(f"recompute granularity must be None or 'full', got {granularity!r}")
        self.encoder.recompute = self.decoder.recompute = granularity == "full"

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
