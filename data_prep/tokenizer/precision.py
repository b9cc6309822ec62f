"""Encoding at a chosen precision (and memory format, and compiled or not), and how much bf16 encoding
changes the tokens.

bf16 autocast (:func:`data_prep.device.autocast`) runs the encoder's convolutions in bfloat16 while the
FSQ quantizer stays fp32 (:meth:`VideoTokenizer.encode_codes`). Rounding in the convolutions can still
move a latent across an FSQ rounding boundary, which changes that position's token id; the tokenization
job therefore encodes in fp32 unless asked, and :func:`bf16_token_agreement` measures the effect on
given clips. :func:`make_token_encoder` adds the two speed settings of the tokenization job: channels-last
3D memory format (``torch.channels_last_3d``) for the encoder's weights and clips, and ``torch.compile`` of
the encoder (partial batches padded to one shape, so it compiles once).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..device import autocast, to_device
from .model import VideoTokenizer

__all__ = ["ENCODE_PRECISIONS", "encode_tokens", "make_token_encoder", "bf16_token_agreement"]

ENCODE_PRECISIONS = ("fp32", "bf16")


def encode_tokens(tokenizer: VideoTokenizer, video: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Token ids of a video batch at ``precision`` (inference mode, on the tokenizer's device).

    Args:
        tokenizer: the tokenizer (its parameters stay fp32).
        video: float32 ``[B, 3, T, H, W]`` in [-1, 1] (copied to the tokenizer's device if elsewhere).
        precision: "fp32", or "bf16" (autocast of the encoder's convolutions; FSQ in fp32).

    Returns:
        int64 ``[B, T', H', W']`` on the tokenizer's device.

    Raises:
        ValueError: ``precision`` not in :data:`ENCODE_PRECISIONS`, or a badly shaped video
            (:meth:`VideoTokenizer.encode`).
    """
    return make_token_encoder(tokenizer, precision)(video)


def make_token_encoder(tokenizer: VideoTokenizer, precision: str = "fp32", channels_last: bool = False,
                       compile: bool = False, batch_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tokenization job's encoding function: :func:`encode_tokens` with optional speed settings.

    Args:
        tokenizer: the tokenizer, on its device; with ``channels_last`` its encoder's parameters are
            converted to ``torch.channels_last_3d`` in place (the values are unchanged).
        precision: "fp32" or "bf16" (as :func:`encode_tokens`).
        channels_last: run the encoder's convolutions in channels-last 3D memory format (clips are
            converted on the device). Faster convolutions on oneDNN CPUs and tensor-core GPUs; other
            kernels round differently, so a rare token id can differ from the default layout's
            (docs/benchmarks.md gives measured agreements).
        compile: ``torch.compile`` the encoder (``dynamic=False``), compiled on the first batch;
            batches smaller than ``batch_size`` are padded with copies of their last clip to that size
            (and the padding's ids dropped), so one compiled graph serves every batch. Fused kernels
            round differently: a rare token id can differ from eager's.
        batch_size: the job's batch size (used with ``compile``; None: no padding).

    Returns:
        ``encode(video)``: float32 ``[B, 3, T, H, W]`` in [-1, 1] (any device; copied to the
        tokenizer's) -> int64 ``[B, T', H', W']`` on the tokenizer's device.

    Raises:
        ValueError: ``precision`` not in :data:`ENCODE_PRECISIONS`, ``batch_size`` < 1; ``encode`` raises
            as :meth:`VideoTokenizer.encode` for a badly shaped video, and for a batch larger than
            ``batch_size`` when compiling.
    """
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"encoding precision must be one of {ENCODE_PRECISIONS}, got {precision!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(tokenizer.parameters()).device
    if channels_last:
        tokenizer.encoder.to(memory_format=torch.channels_last_3d)
    encode = torch.compile(tokenizer.encode, dynamic=False) if compile else tokenizer.encode

    def run(video: torch.Tensor) -> torch.Tensor:
        video = to_device(video, device)
        n = video.shape[0]
        if compile and batch_size is not None:
            if n > batch_size:
                raise ValueError(f"a batch of {n} clips is larger than the compiled batch size {batch_size}")
            if n < batch_size:
                video = torch.cat([video, video[-1:].expand(batch_size - n, *video.shape[1:])])
        if channels_last and video.ndim == 5:
            video = video.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast(device, precision):
            return encode(video)[:n]

    return run


def bf16_token_agreement(tokenizer: VideoTokenizer, clips: torch.Tensor, batch_size: int = 8) -> float:
    """Fraction of token positions whose id is the same when ``clips`` are encoded in bf16 and in fp32.

    Args:
        tokenizer: the tokenizer, on the device to measure (CPU autocast runs bf16 as well).
        clips: float32 ``[N, 3, T, H, W]`` in [-1, 1], N >= 1 (e.g. clips of real videos: random noise
            sits far from natural images and says little about them).
        batch_size: clips per forward pass (the same batches for both precisions).

    Returns:
        The agreement rate in [0, 1] over all ``N * T' * H' * W'`` positions.

    Raises:
        ValueError: no clips, ``batch_size`` < 1, or a badly shaped ``clips`` tensor.
    """
    if clips.ndim != 5 or clips.shape[0] < 1:
        raise ValueError(f"clips must be a non-empty [N, 3, T, H, W] tensor, got shape {tuple(clips.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    equal, total = 0, 0
    for i in range(0, clips.shape[0], batch_size):
        chunk = clips[i : i + batch_size]
        reference = encode_tokens(tokenizer, chunk, "fp32")
        reduced = encode_tokens(tokenizer, chunk, "bf16")
        equal += int((reference == reduced).sum())
        total += reference.numel()
    return equal / total
