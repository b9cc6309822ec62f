"""A Python API for generation: load a converted NBP model and a video tokenizer once, then make videos
from prompts in a few lines (the pattern of diffusers / transformers pipelines)::

    from megatron_nbp.inference.pipeline import NBPPipeline
    pipe = NBPPipeline.from_pretrained("runs/nbp_inference", tokenizer="runs/tokenizer.safetensors")
    out = pipe(prompt_videos=["bikes.mp4", "waves.mp4"], num_samples=2, top_k=16000, top_p=0.9, seeds=0)
    out.videos  # numpy uint8 [4, T, H, W, 3], prompt-major: bikes #0, bikes #1, waves #0, waves #1

Frame-prediction models take ``prompt_videos`` (files or uint8 [T, H, W, 3] clips at the model geometry:
the first ``condition_frames`` latent frames condition the rest); class-conditional hybrid models take
``class_names``, text-conditional ones ``text_ids`` (rows of text token ids, padded / truncated to the
model's P as the training data was) or, with a ``text_tokenizer`` file (data_prep.text_ids, the one the
tokenization job's ``--text-tokenizer`` used), ``class_names`` turned into text ids as the training data
was (``NBPPipeline.from_pretrained(..., text_tokenizer="tokenizer.model")``). All prompts run as one batch
(``num_samples`` rows each).

This module is also the pixel glue of the generating commands (nbp-generate, nbp-evaluate): the clip
geometry a model implies, encoding prompt clips, decoding tokens to frames. The token loops are
megatron_nbp.inference.generate's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_nbp.inference import generate as gen
from megatron_nbp.inference.sampling import SamplingConfig

__all__ = ["NBPPipeline", "PipelineOutput", "ClipGeometry", "class_text_ids", "clip_geometry", "condition_batch",
           "condition_pixel_frames", "row_seeds"]


@dataclass
class ClipGeometry:
    """Pixel clip that the model's latent shape corresponds to (T = 1 + 4(T'-1), H = sH', W = sW', s the
    tokenizer's spatial stride: 8 for MAGVITv2's layout, 4 for the CPU demo's)."""

    num_frames: int
    height: int
    width: int


def clip_geometry(model, tokenizer) -> ClipGeometry:
    """Pixel geometry implied by the model's latent shape and the tokenizer's spatial stride
    (``tokenizer.config.spatial_stride``), checked against the tokenizer.

    Raises:
        ValueError: the tokenizer maps that geometry to another latent shape, or its codebook is
            larger than the model's vocabulary.
    """
    t, h, w = model.config.latent_shape
    stride = tokenizer.config.spatial_stride
    geometry = ClipGeometry(1 + 4 * (t - 1), stride * h, stride * w)
    latent = tuple(tokenizer.latent_shape(geometry.num_frames, geometry.height, geometry.width))
    if latent != (t, h, w):
        raise ValueError(f"tokenizer gives latent {latent} for {geometry}, the model was trained on {(t, h, w)}")
    if tokenizer.codebook_size > model.config.vocab_size:
        raise ValueError(f"tokenizer codebook {tokenizer.codebook_size} > model vocab {model.config.vocab_size}")
    return geometry


def condition_pixel_frames(condition_latent_frames: int) -> int:
    """Pixel frames covered by the first c latent frames (1 + 4(c-1))."""
    return 1 + 4 * (condition_latent_frames - 1)


def condition_batch(cfg, class_names: Sequence[str] | None = None,
                    text_ids: Sequence[Sequence[int]] | None = None,
                    num_samples: int = 1, text_tokenizer=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Condition ids of a conditional (hybrid) model for a list of prompts, each repeated ``num_samples``
    times (prompt-major rows), through the model's token layout (the padding the training data got).

    Args:
        cfg: the model's ModelConfig.
        class_names: class-conditional models: names among ``cfg.condition_labels``.
        text_ids: text-conditional models: one list of text token ids per prompt (right-padded or
            truncated to ``num_condition_tokens``).
        text_tokenizer: text-conditional models given ``class_names``: a text tokenizer file or a loaded
            data_prep.text_ids.TextTokenizer; each name becomes the ids of its text
            (``TextTokenizer.class_name_ids``, as the tokenization job's ``--text-tokenizer`` wrote them).

    Returns:
        (int64 [len(prompts) * num_samples, P] condition ids, bool [same] padding or None when nothing is padded).

    Raises:
        ValueError: a frame-prediction model, the other kind of prompt (or none, or both), an unknown class
            name, text ids outside the text vocabulary, class names for a text model without a text
            tokenizer or with one of another vocabulary size, or ``num_samples`` < 1.
    """
    layout = cfg.token_layout
    if not layout.conditional:
        raise ValueError(f"the model's layout {layout.name!r} takes prompt videos, not class names or text ids")
    if layout.condition_key == "text_ids" and class_names and not text_ids:
        text_ids = class_text_ids(cfg, class_names, text_tokenizer)
        class_names = None
    wanted, other = ("text_ids", "class_names") if layout.condition_key == "text_ids" else ("class_names", "text_ids")
    given = {"class_names": class_names, "text_ids": text_ids}
    if given[other]:
        raise ValueError(f"a {layout.condition_type}-conditional model takes {wanted}, not {other}")
    prompts = list(given[wanted] or [])
    if not prompts:
        raise ValueError(f"a {layout.condition_type}-conditional model needs {wanted} (one or more prompts)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rows = [layout.sample_condition(list(p) if wanted == "text_ids" else p) for p in prompts]
    condition, padding = layout.condition_batch([r for r in rows for _ in range(num_samples)])
    return condition, (padding if bool(padding.any()) else None)


def class_text_ids(cfg, class_names: Sequence[str], text_tokenizer) -> list[list[int]]:
    """Text ids of class names for a text-conditional model (UCF-101 as in the NBP paper): the ids the
    tokenization job's ``--text-tokenizer`` wrote for those classes (data_prep.text_ids), unpadded.

    Raises:
        ValueError: no ``text_tokenizer``, or one whose vocabulary size is not ``cfg.text_vocab_size``.
        FileNotFoundError: a tokenizer file that does not exist.
    """
    if text_tokenizer is None:
        raise ValueError("a text-conditional model turns class names into text ids with the text tokenizer "
                         "the training data was made with: give text_tokenizer (nbp-generate --text-tokenizer)")
    from data_prep.text_ids import load_text_tokenizer

    text = load_text_tokenizer(text_tokenizer)
    text.check_vocab_size(cfg.text_vocab_size)
    return [text.class_name_ids(name) for name in class_names]


def row_seeds(seeds: int | Sequence[int] | None, num_rows: int) -> list[int]:
    """One seed per generated row: None -> 0, 1, ...; an int s -> s, s + 1, ...; a list of ``num_rows`` ints
    as given.

    Raises:
        ValueError: a list of another length.
    """
    if seeds is None:
        seeds = 0
    if isinstance(seeds, (int, np.integer)):
        return [int(seeds) + r for r in range(num_rows)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != num_rows:
        raise ValueError(f"seeds: {len(seeds)} given for {num_rows} rows (prompts x num_samples); give one int "
                         f"or one per row")
    return seeds


def _generation_kwargs(seeds: list[int], device: torch.device) -> dict[str, Any]:
    """The seeding keywords of generate_frame_prediction / generate_hybrid for rows seeded ``seeds``: one
    generator per row on the model's device (megatron_nbp.inference.sampling.row_generators), so a row's
    tokens equal its prompt generated alone with the same seed, whatever else is in the batch."""
    del device  # the generate functions put the row generators on the model's device
    return {"seeds": list(seeds)}


def _given(prompts) -> bool:
    """Whether a prompt list (a list, a tuple or an array of clips) holds any prompt."""
    return prompts is not None and len(prompts) > 0


def _device_of(module) -> torch.device:
    """The device of a module's first parameter."""
    return next(iter(module.parameters())).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PipelineOutput:
    """What one :class:`NBPPipeline` call produced. Rows are prompt-major: row ``p * num_samples + s`` is
    sample s of prompt p.

    Attributes:
        videos: numpy uint8 [N, T, H, W, 3] generated clips (N = prompts x num_samples).
        tokens: torch int64 [N, T', H', W'] (CPU) their video tokens, the prompt's included.
        prompt_index, sample_index: per row, which prompt and which of its samples.
        seeds: per row, the seed it was generated with (:func:`row_seeds`).
        steps: forward passes of the generation (the prefill included).
        encode_seconds: tokenizer encoding of the prompt clips (0 for conditional models).
        prefill_seconds: the prefill and its sampling; generate_seconds: the whole token generation
            (prefill included); decode_seconds: tokenizer decoding of all rows. Each after a CUDA synchronise.
        generated_tokens: tokens sampled by the model over all rows (the prompt frames excluded).
        prompt_clips: frame prediction: numpy uint8 [P, T, H, W, 3] the real prompt clips; else None.
        reconstructions: frame prediction with ``return_reconstructions=True``: numpy uint8 [P, T, H, W, 3]
            the prompt clips through the tokenizer (encode -> decode); else None.
    """

    videos: np.ndarray
    tokens: torch.Tensor
    prompt_index: list[int]
    sample_index: list[int]
    seeds: list[int]
    steps: int
    generate_seconds: float
    prefill_seconds: float
    decode_seconds: float
    generated_tokens: int
    encode_seconds: float = 0.0
    prompt_clips: np.ndarray | None = None
    reconstructions: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        """Samples per prompt."""
        return max(self.sample_index) + 1

    def videos_of(self, prompt: int) -> np.ndarray:
        """The samples of one prompt: numpy uint8 [num_samples, T, H, W, 3]."""
        return self.videos[[r for r, p in enumerate(self.prompt_index) if p == prompt]]


class NBPPipeline:
    """A converted NBP model and a video tokenizer, ready to generate (module doc).

    Args:
        model: the converted model (megatron_nbp.inference.model.NBPDecoder), in eval mode.
        tokenizer: a video tokenizer (data_prep.tokenizer.VideoTokenizer: ``encode`` of float
            [B, 3, T, H, W] in [-1, 1] -> int64 [B, T', H', W'], ``decode`` back), on any device.
        decode_batch_size: rows decoded by the tokenizer at a time (its activations dominate memory).
        text_tokenizer: text-conditional models: a text tokenizer file (SentencePiece .model or
            tokenizer.json) or a loaded data_prep.text_ids.TextTokenizer, to take ``class_names``
            (:func:`class_text_ids`).

    Use :meth:`from_pretrained` to load both from files.

    Raises:
        ValueError: ``decode_batch_size`` < 1; a text tokenizer the library cannot read.
        FileNotFoundError: a text tokenizer file that does not exist.
    """

    def __init__(self, model, tokenizer, decode_batch_size: int = 4, text_tokenizer=None) -> None:
        if decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.decode_batch_size = decode_batch_size
        if text_tokenizer is not None:
            from data_prep.text_ids import load_text_tokenizer

            text_tokenizer = load_text_tokenizer(text_tokenizer)
        self.text_tokenizer = text_tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, **kwargs) -> "NBPPipeline":
        """Load a converted checkpoint (nbp-convert's output directory) and a tokenizer.

        Args:
            path: the converted model's directory (config.json + model.safetensors or shards + index).
            tokenizer: a tokenizer checkpoint file (data_prep.tokenizer.save_tokenizer's .safetensors),
                or a loaded tokenizer (used as it is, on its own device).
            device: where the model (and a tokenizer loaded from a file) runs; default
                megatron_nbp.device.device_plan's: cuda:LOCAL_RANK when CUDA is available, else cpu.
            dtype: "bf16" | "fp16" | "fp32" (or the torch dtype) the model runs in; default bf16 on CUDA,
                fp32 on the CPU, whatever the stored dtype. The tokenizer keeps its own dtype (fp32);
                sampling always sees fp32 logits.
            kwargs: for the constructor (``decode_batch_size``, ``text_tokenizer``).

        Raises:
            FileNotFoundError: a missing file. ValueError: an unknown dtype or one that does not run on the
            device (megatron_nbp.inference.dtypes), or a tokenizer that does not fit the model
            (:func:`clip_geometry`).
        """
        from megatron_nbp.device import device_plan
        from megatron_nbp.inference.dtypes import resolve_dtype
        from megatron_nbp.inference.model import load_inference_model

        device = device_plan(device=device).device
        model = load_inference_model(path, device, resolve_dtype(dtype, device))
        if isinstance(tokenizer, (str, os.PathLike)):
            from data_prep.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer, device=device)
        pipe = cls(model, tokenizer, **kwargs)
        clip_geometry(model, tokenizer)  # the tokenizer must fit the model: refuse now, not at the first call
        return pipe

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        """The model's ModelConfig."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return _device_of(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype."""
        return next(iter(self.model.parameters())).dtype

    @cached_property
    def geometry(self) -> ClipGeometry:
        """The pixel clip the model generates (:func:`clip_geometry`, checked against the tokenizer)."""
        return clip_geometry(self.model, self.tokenizer)

    # ------------------------------------------------------------------ pixels <-> tokens
    def load_prompt_video(self, path: str | os.PathLike, start_frame: int = 0, frame_stride: int = 1) -> np.ndarray:
        """A clip of a video file at the model geometry: uint8 [T, H, W, 3] from ``start_frame``, every
        ``frame_stride``-th frame, resized and center-cropped (data_prep.video_io.load_clip)."""
        from data_prep.video_io import load_clip

        geo = self.geometry
        return load_clip(path, geo.num_frames, (geo.height, geo.width), start_frame, frame_stride)

    @torch.no_grad()
    def encode(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """Video tokens of clips, each encoded alone (so a clip's tokens do not depend on the others):
        uint8 [T, H, W, 3] each, at the model geometry -> int64 [len(clips), T', H', W'] on the tokenizer's
        device.

        Raises:
            ValueError: a clip that is not uint8 [T, H, W, 3] at the model geometry.
        """
        from data_prep.video_io import frames_to_tensor

        geo = self.geometry
        device = _device_of(self.tokenizer)
        tokens = []
        for i, clip in enumerate(clips):
            if not isinstance(clip, np.ndarray) or clip.shape != (geo.num_frames, geo.height, geo.width, 3):
                shape = getattr(clip, "shape", type(clip).__name__)
                raise ValueError(f"prompt clip {i}: expected uint8 [{geo.num_frames}, {geo.height}, {geo.width}, 3] "
                                 f"(the model geometry), got {shape}")
            tokens.append(self.tokenizer.encode(frames_to_tensor(clip).unsqueeze(0).to(device)))
        return torch.cat(tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """Frames of video tokens: int64 [B, N] ((t, h, w)-major) or [B, T', H', W'] -> numpy uint8
        [B, T, H, W, 3], decoded ``decode_batch_size`` rows at a time on the tokenizer's device."""
        from data_prep.video_io import tensor_to_frames

        t, h, w = self.config.latent_shape
        tokens = tokens.reshape(-1, t, h, w)
        device = _device_of(self.tokenizer)
        frames = []
        for chunk in tokens.split(self.decode_batch_size):
            frames += [tensor_to_frames(v) for v in self.tokenizer.decode(chunk.to(device)).cpu()]
        return np.stack(frames)

    # ------------------------------------------------------------------ tokens
    def generate_frame_prediction(self, prompt: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
                                  seeds: int | Sequence[int] | None = None,
                                  progress: bool = False) -> gen.GenerationResult:
        """Tokens of whole clips from prompt tokens (frame-prediction models):
        megatron_nbp.inference.generate.generate_frame_prediction seeded by :func:`row_seeds`.

        Args:
            prompt: int64 [B, c*H'*W'] the condition frames' tokens, (t, h, w)-major.
            seeds: as :func:`row_seeds` for the B rows.

        Returns:
            GenerationResult with tokens int64 [B, N] on the model's device.
        """
        kwargs = _generation_kwargs(row_seeds(seeds, prompt.shape[0]), self.device)
        return gen.generate_frame_prediction(self.model, prompt, sampling, progress=progress, **kwargs)

    def generate_conditional(self, condition: torch.Tensor, condition_padding: torch.Tensor | None = None,
                             sampling: SamplingConfig = SamplingConfig(), seeds: int | Sequence[int] | None = None,
                             progress: bool = False) -> gen.GenerationResult:
        """Tokens of whole clips from condition ids (class- or text-conditional hybrid models):
        megatron_nbp.inference.generate.generate_hybrid seeded by :func:`row_seeds`.

        Args:
            condition: int64 [B, P] condition ids (:func:`condition_batch`); condition_padding: bool [B, P].
            seeds: as :func:`row_seeds` for the B rows.

        Returns:
            GenerationResult with tokens int64 [B, N] on the model's device.
        """
        kwargs = _generation_kwargs(row_seeds(seeds, condition.shape[0]), self.device)
        return gen.generate_hybrid(self.model, condition, condition_padding, sampling, progress=progress, **kwargs)

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(self, prompt_videos: Sequence[str | os.PathLike | np.ndarray] | None = None,
                 class_names: Sequence[str] | None = None, text_ids: Sequence[Sequence[int]] | None = None, *,
                 num_samples: int = 1, seeds: int | Sequence[int] | None = None,
                 sampling: SamplingConfig | None = None, condition_frames: int | None = None,
                 return_reconstructions: bool = False, progress: bool = False, **sampling_fields) -> PipelineOutput:
        """Generate ``num_samples`` videos per prompt, all prompts in one batch.

        Args:
            prompt_videos: frame-prediction models: video files (the first frames taken,
                :meth:`load_prompt_video`) or uint8 [T, H, W, 3] clips at the model geometry.
            class_names: class-conditional models: names among the model's ``condition_labels``;
                text-conditional models with a ``text_tokenizer``: class names made text (:func:`class_text_ids`).
            text_ids: text-conditional models: a list of text token ids per prompt.
            num_samples: videos per prompt.
            seeds: one int (row r gets seed + r) or one per row (:func:`row_seeds`); default 0.
            sampling: a SamplingConfig (default the paper's); ``sampling_fields`` (temperature, top_k,
                top_p, cfg_scale) override its fields.
            condition_frames: frame prediction: latent frames given (default the model's ``condition_frames``).
            return_reconstructions: frame prediction: also decode the prompts' own tokens.
            progress: a tqdm bar over the forward passes.

        Returns:
            :class:`PipelineOutput` (videos as numpy uint8 [N, T, H, W, 3], prompt-major rows).

        Raises:
            TypeError: a keyword that is no SamplingConfig field.
            ValueError: prompts that do not fit the model's layout (or none), a bad seed list, a clip at
                another geometry, or a bad sampling value (ConfigError, naming the field).
        """
        sampling = self._sampling(sampling, sampling_fields)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self.config.token_layout.conditional:
            if _given(prompt_videos):
                raise ValueError(f"the model's layout {self.config.token_layout.name!r} takes class names or text "
                                 f"ids, not prompt videos")
            condition, padding = condition_batch(self.config, class_names, text_ids, num_samples,
                                                 self.text_tokenizer)
            seeds = row_seeds(seeds, condition.shape[0])
            result = self.generate_conditional(condition, padding, sampling, seeds, progress)
            num_prompts, generated = condition.shape[0] // num_samples, None
            encode_seconds, clips, recons = 0.0, None, None
        else:
            if _given(class_names) or _given(text_ids) or not _given(prompt_videos):
                raise ValueError(f"the model's layout {self.config.token_layout.name!r} takes prompt_videos "
                                 f"(one or more video files or clips), not class names or text ids")
            start = time.perf_counter()
            clip_list = [self.load_prompt_video(v) if isinstance(v, (str, os.PathLike)) else v for v in prompt_videos]
            prompt_tokens = self.encode(clip_list)                                 # [P, T', H', W']
            clips = np.stack(clip_list)
            _synchronize(_device_of(self.tokenizer))
            encode_seconds = time.perf_counter() - start
            recons = self.decode(prompt_tokens) if return_reconstructions else None
            num_prompts = len(clips)
            t, h, w = self.config.latent_shape
            c = condition_frames or self.config.condition_frames
            prompt = prompt_tokens.reshape(num_prompts, -1)[:, : c * h * w].repeat_interleave(num_samples, 0)
            seeds = row_seeds(seeds, prompt.shape[0])
            result = self.generate_frame_prediction(prompt.to(self.device), sampling, seeds, progress)
            generated = prompt.shape[0] * (t - c) * h * w
        start = time.perf_counter()
        videos = self.decode(result.tokens)
        _synchronize(_device_of(self.tokenizer))
        rows = range(num_prompts * num_samples)
        return PipelineOutput(
            videos=videos, tokens=result.tokens.reshape(-1, *self.config.latent_shape).cpu(),
            prompt_index=[r // num_samples for r in rows], sample_index=[r % num_samples for r in rows], seeds=seeds,
            steps=result.steps, generate_seconds=result.seconds, prefill_seconds=result.prefill_seconds,
            decode_seconds=time.perf_counter() - start,
            generated_tokens=result.tokens.numel() if generated is None else generated,
            encode_seconds=encode_seconds, prompt_clips=clips, reconstructions=recons)

    @staticmethod
    def _sampling(sampling: SamplingConfig | None, overrides: dict) -> SamplingConfig:
        """``sampling`` (default the paper's) with the keyword overrides applied and validated."""
        unknown = sorted(set(overrides) - set(SamplingConfig.model_fields))
        if unknown:
            raise TypeError(f"unknown keyword(s) {unknown}: the sampling settings are "
                            f"{sorted(SamplingConfig.model_fields)}")
        if not overrides:
            return sampling or SamplingConfig()
        return SamplingConfig(**{**(sampling or SamplingConfig()).model_dump(), **overrides})
