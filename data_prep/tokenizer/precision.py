"""Encoding at a chosen precision, and how much bf16 encoding changes the tokens.

bf16 autocast (:func:`data_prep.device.autocast`) runs the encoder's convolutions in bfloat16 while the
FSQ quantizer stays fp32 (:meth:`VideoTokenizer.encode_codes`). Rounding in the convolutions can still
move a latent across an FSQ rounding boundary, which changes that position's token id; the tokenization
job therefore encodes in fp32 unless asked, and :func:`bf16_token_agreement` measures the effect on
given clips.
"""

from __future__ import annotations

import torch

from ..device import autocast, to_device
from .model import VideoTokenizer

__all__ = ["ENCODE_PRECISIONS", "encode_tokens", "bf16_token_agreement"]

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
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"encoding precision must be one of {ENCODE_PRECISIONS}, got {precision!r}")
    device = next(tokenizer.parameters()).device
    video = to_device(video, device)
    with torch.inference_mode(), autocast(device, precision):
        return tokenizer.encode(video)


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
