"""Encoding at a chosen precision (and memory format, and compiled or not), and how much bf16 encoding
changes the tokens.

bf16 autocast (:func:`data_prep.device.autocast`) runs the encoder's convolutions in bfloat16 while the
FSQ quantizer stays fp32 (:meth:`VideoTokenizer.encode_codes`). Rounding in the convolutions can still
move a latent across an FSQ rounding boundary, which changes that position's token id; the tokenization
job therefore encodes in fp32 unless asked, and :func:`bf16_token_agreement` measures the effect on
given clips (:func:`compare_token_ids` also says how far the changed ids moved on the FSQ grid).
:func:`make_token_encoder` adds the two speed settings of the tokenization job: channels-last
3D memory format (``torch.channels_last_3d``) for the encoder's weights and clips, and ``torch.compile`` of
the encoder (partial batches padded to one shape, so it compiles once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..device import autocast, to_device
from .fsq import FSQ
from .model import VideoTokenizer

__all__ = ["ENCODE_PRECISIONS", "encode_tokens", "make_token_encoder", "bf16_token_agreement", "token_agreement",
           "TokenAgreement", "compare_token_ids", "fp32_label"]

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


def fp32_label(device: torch.device | str) -> str:
    """What "fp32" encoding means on ``device``: ``"fp32"``, or ``"fp32 (TF32 convolutions)"`` on CUDA while
    ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default: cuDNN then rounds the convolutions' inputs
    to TF32's 10-bit mantissa), so reports say what the reference was."""
    if torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "fp32 (TF32 convolutions)"
    return "fp32"


def bf16_token_agreement(tokenizer: VideoTokenizer, clips: torch.Tensor, batch_size: int = 8) -> float:
    """Fraction of token positions whose id is the same when ``clips`` are encoded in bf16 and in fp32
    (:func:`token_agreement`'s ``equal_rate``).

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
    return token_agreement(tokenizer, clips, batch_size).equal_rate


def token_agreement(tokenizer: VideoTokenizer, clips: torch.Tensor, batch_size: int = 8) -> "TokenAgreement":
    """bf16 against fp32 token ids of ``clips``, position by position (:func:`compare_token_ids`).

    Args: as :func:`bf16_token_agreement`.

    Returns:
        :class:`TokenAgreement` over all ``N * T' * H' * W'`` positions.

    Raises:
        ValueError: no clips, ``batch_size`` < 1, or a badly shaped ``clips`` tensor.
    """
    if clips.ndim != 5 or clips.shape[0] < 1:
        raise ValueError(f"clips must be a non-empty [N, 3, T, H, W] tensor, got shape {tuple(clips.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    agreement = TokenAgreement()
    for i in range(0, clips.shape[0], batch_size):
        chunk = clips[i : i + batch_size]
        agreement += compare_token_ids(tokenizer.quantizer, encode_tokens(tokenizer, chunk, "fp32"),
                                       encode_tokens(tokenizer, chunk, "bf16"))
    return agreement


@dataclass(frozen=True)
class TokenAgreement:
    """Position-by-position comparison of two encodings of the same clips (counts; add them across batches).

    Attributes:
        positions: token positions compared.
        equal: positions with the same id.
        one_step: positions whose ids differ by one FSQ rounding step: level numbers
            (:meth:`FSQ.indices_to_digits`) equal in every channel but one, and 1 apart there.
    """

    positions: int = 0
    equal: int = 0
    one_step: int = 0

    def __add__(self, other: "TokenAgreement") -> "TokenAgreement":
        return TokenAgreement(self.positions + other.positions, self.equal + other.equal,
                              self.one_step + other.one_step)

    @property
    def equal_rate(self) -> float:
        """Share of positions with the same id (0.0 when nothing was compared)."""
        return self.equal / self.positions if self.positions else 0.0

    @property
    def within_one_step_rate(self) -> float:
        """Share of positions equal or one FSQ rounding step apart (0.0 when nothing was compared)."""
        return (self.equal + self.one_step) / self.positions if self.positions else 0.0

    def describe(self) -> str:
        """``"0.9794 equal, 0.9999 within one FSQ step, of 47360 ids"``."""
        return (f"{self.equal_rate:.4f} equal, {self.within_one_step_rate:.4f} within one FSQ step, "
                f"of {self.positions} ids")


def compare_token_ids(quantizer: FSQ, reference: torch.Tensor, other: torch.Tensor) -> TokenAgreement:
    """Compare two id tensors of the same clips (e.g. fp32 vs bf16 encoding) on the FSQ grid.

    A bf16 (or fused-kernel) encoding that changes an id usually moves one latent channel across one
    rounding boundary: the decoder then sees a code one level (2 / (L - 1) in [-1, 1]) away in one channel.
    ``one_step`` counts exactly those; anything else differs by more.

    Args:
        quantizer: the tokenizer's :class:`FSQ` (its levels give the digits).
        reference, other: integer ``[B, ...]`` ids of the same shape, any device (compared on the
            quantizer's).

    Returns:
        :class:`TokenAgreement` with the counts.

    Raises:
        ValueError: shapes differ, or an id lies outside the codebook. TypeError: non-integer ids.
    """
    if reference.shape != other.shape:
        raise ValueError(f"token id shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    if reference.numel() == 0:
        return TokenAgreement()
    device = next(quantizer.buffers()).device
    reference, other = reference.to(device), other.to(device)
    # |level difference| summed over channels is 1 exactly when one channel moved by one level.
    one_step = (quantizer.indices_to_digits(reference) - quantizer.indices_to_digits(other)).abs().sum(dim=1) == 1
    return TokenAgreement(positions=reference.numel(), equal=int((reference == other).sum()),
                          one_step=int(one_step.sum()))
