"""From a real clip to a generated video: tokenizer encode -> NBP block generation -> decode -> mp4/PNG.

The glue between the video tokenizer (data_prep.tokenizer), the converted NBP model and video I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_nbp.inference.generate import GenerationResult, generate_frame_prediction, generate_hybrid
from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.inference.sampling import SamplingConfig


@dataclass
class ClipGeometry:
    """Pixel clip that the model's latent shape corresponds to (T = 1 + 4(T'-1), H = 8H', W = 8W')."""

    num_frames: int
    height: int
    width: int


def clip_geometry(model: NBPDecoder, tokenizer) -> ClipGeometry:
    """Pixel geometry implied by the model's latent shape, checked against the tokenizer.

    Raises:
        ValueError: the tokenizer maps that geometry to another latent shape, or its codebook is
            larger than the model's vocabulary.
    """
    t, h, w = model.config.latent_shape
    geometry = ClipGeometry(1 + 4 * (t - 1), 8 * h, 8 * w)
    latent = tuple(tokenizer.latent_shape(geometry.num_frames, geometry.height, geometry.width))
    if latent != (t, h, w):
        raise ValueError(f"tokenizer gives latent {latent} for {geometry}, the model was trained on {(t, h, w)}")
    if tokenizer.codebook_size > model.config.vocab_size:
        raise ValueError(f"tokenizer codebook {tokenizer.codebook_size} > model vocab {model.config.vocab_size}")
    return geometry


@torch.no_grad()
def predict_frames(model: NBPDecoder, tokenizer, clip: np.ndarray, num_samples: int = 1,
                   condition_frames: int | None = None, sampling: SamplingConfig = SamplingConfig(),
                   seed: int = 0, progress: bool = True) -> tuple[np.ndarray, list[np.ndarray], GenerationResult]:
    """Frame prediction from a real clip.

    Args:
        clip: uint8 [T, H, W, 3] real frames at the model's geometry (:func:`clip_geometry`).
        num_samples: videos to generate from the same condition.
        condition_frames: latent frames given (default: the model's ``condition_frames``).

    Returns:
        (reconstruction uint8 [T, H, W, 3] of the real clip through the tokenizer,
         generated videos: list of uint8 [T, H, W, 3], the GenerationResult).
    """
    from data_prep.video_io import frames_to_tensor, tensor_to_frames

    t, h, w = model.config.latent_shape
    c = condition_frames or model.config.condition_frames
    device = next(tokenizer.parameters()).device
    tokens = tokenizer.encode(frames_to_tensor(clip).unsqueeze(0).to(device))  # [1, T', H', W']
    recon = tensor_to_frames(tokenizer.decode(tokens)[0].cpu())
    flat = tokens.reshape(1, -1).repeat(num_samples, 1)
    generator = torch.Generator(device=model.embedding.word_embeddings.weight.device).manual_seed(seed)
    result = generate_frame_prediction(model, flat[:, : c * h * w], sampling, generator, progress=progress)
    decoded = tokenizer.decode(result.tokens.view(num_samples, t, h, w).to(device)).cpu()
    return recon, [tensor_to_frames(v) for v in decoded], result


@torch.no_grad()
def generate_conditional_videos(model: NBPDecoder, tokenizer, condition: torch.Tensor,
                                condition_padding: torch.Tensor | None = None,
                                sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                                progress: bool = True) -> tuple[list[np.ndarray], GenerationResult]:
    """Class- or text-conditional generation (hybrid layout) decoded to frames.

    Args:
        condition: int64 [B, P] condition ids (one row per video to generate).
        condition_padding: bool [B, P] for padded text ids.

    Returns:
        (generated videos: list of uint8 [T, H, W, 3], the GenerationResult).
    """
    from data_prep.video_io import tensor_to_frames

    t, h, w = model.config.latent_shape
    generator = torch.Generator(device=model.embedding.word_embeddings.weight.device).manual_seed(seed)
    result = generate_hybrid(model, condition, condition_padding, sampling, generator, progress=progress)
    decoded = tokenizer.decode(result.tokens.view(-1, t, h, w).to(next(tokenizer.parameters()).device)).cpu()
    return [tensor_to_frames(v) for v in decoded], result


def condition_pixel_frames(condition_latent_frames: int) -> int:
    """Pixel frames covered by the first c latent frames (1 + 4(c-1))."""
    return 1 + 4 * (condition_latent_frames - 1)


def sample_paths(output: Path, num_samples: int) -> list[Path]:
    """out.mp4 for one sample; out_0.mp4, out_1.mp4, ... for several."""
    if num_samples == 1:
        return [output]
    width = len(str(num_samples - 1))
    return [output.with_name(f"{output.stem}_{i:0{width}d}{output.suffix}") for i in range(num_samples)]
