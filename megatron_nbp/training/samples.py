"""Samples during training (``--sample-interval``): every N iterations one short clip is generated with
the current weights and logged (TensorBoard, and W&B when enabled), so a run shows what it learns.

The weights are gathered in memory into one single-device model on the logging rank (the last one,
which holds the TensorBoard writer): :meth:`~megatron_nbp.training.backend.TrainingBackend.gather_weights`
all-gathers the tensor-parallel shards and collects the pipeline stages
(megatron_nbp.training.gather_weights), and :class:`megatron_nbp.inference.model.NBPDecoder` loads them,
so no checkpoint is written. The prompt is held out: the first clip of ``--valid-data``'s stream (the
first sample every evaluation reads, megatron_nbp.training.validation); for frame prediction its first
``condition_frames`` latent frames, for the hybrid layouts its condition (class label or text ids).
Sampling is the paper's (top-k 16000, top-p 0.9, temperature 1), seeded with the run's seed.

With ``--sample-tokenizer`` (the tokenizer file the shards were made with) the tokens are decoded and
logged as a video (``samples/video``): TensorBoard's ``add_video`` when moviepy is installed, otherwise
the same kind of record (an animated GIF image summary, shown in TensorBoard's Images tab) encoded with
Pillow. Without a tokenizer the generated latent ids are logged as an image (``samples/latent-ids``: the
T' latent frames side by side, ids scaled to grey levels, each id an 8 x 8 pixel square).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_nbp.config import NBPConfig
from megatron_nbp.training.backend import TrainingBackend

__all__ = ["TrainingSamples", "generate_sample", "latent_ids_image"]

#: pixels per latent id in the latent-ids image
LATENT_PIXELS = 8


def latent_ids_image(tokens: torch.Tensor, latent_shape: tuple[int, int, int], vocab_size: int) -> np.ndarray:
    """int [N] video tokens ((t, h, w)-major) -> uint8 [H' * 8, T' * W' * 8, 3] image: the latent frames
    side by side, each id a grey level ``255 * id / (vocab_size - 1)``."""
    t, h, w = latent_shape
    ids = tokens.reshape(t, h, w).cpu().double()
    grey = (255.0 * ids / max(vocab_size - 1, 1)).round().clamp(0, 255).to(torch.uint8)
    row = torch.cat(list(grey), dim=1)  # [H', T' * W']
    big = row.repeat_interleave(LATENT_PIXELS, 0).repeat_interleave(LATENT_PIXELS, 1)
    return big[..., None].expand(-1, -1, 3).contiguous().numpy()


def generate_sample(model, cfg: NBPConfig, clip: np.ndarray, condition) -> torch.Tensor:
    """One clip from a held-out sample's prompt (module doc) with ``model`` (an NBPDecoder).

    Args:
        clip: int64 [N] the held-out clip's video tokens.
        condition: its condition as the shards store it (label, text ids) or None.

    Returns:
        int64 [N] generated video tokens, (t, h, w)-major, on the CPU.
    """
    from megatron_nbp.inference.generate import generate_frame_prediction, generate_hybrid
    from megatron_nbp.inference.sampling import SamplingConfig

    m = cfg.model
    layout = m.token_layout
    seeds = [cfg.train.seed]
    device = next(model.parameters()).device
    batch = layout.condition_batch([layout.sample_condition(condition)])
    if batch is None:  # frame prediction: the condition frames of the clip
        t, h, w = m.latent_shape
        prompt = torch.as_tensor(clip).reshape(1, -1)[:, :m.condition_frames * h * w].to(device)
        out = generate_frame_prediction(model, prompt, SamplingConfig(), seeds=seeds)
    else:
        ids, padding = batch
        out = generate_hybrid(model, ids.to(device), padding.to(device), SamplingConfig(), seeds=seeds)
    return out.tokens[0].cpu()


class TrainingSamples:
    """The ``--sample-interval`` samples of a training run (module doc).

    Args:
        cfg: the run's config (``valid_data``, ``sample_tokenizer``, ``train.sample_interval``).
    """

    def __init__(self, cfg: NBPConfig) -> None:
        self.cfg = cfg
        self._prompt = None
        self._tokenizer = None

    @classmethod
    def from_config(cls, cfg: NBPConfig) -> "TrainingSamples | None":
        """The run's samples, or None without ``--sample-interval``."""
        return cls(cfg) if cfg.train.sample_interval else None

    def due(self, iteration: int) -> bool:
        """True after every ``sample_interval``-th iteration."""
        return iteration % self.cfg.train.sample_interval == 0

    def prompt(self):
        """(int64 [N] tokens, condition) of the first clip of the validation stream (read once)."""
        if self._prompt is None:
            from megatron_nbp.training.validation import validation_stream

            self._prompt = next(iter(validation_stream(self.cfg)))
        return self._prompt

    def tokenizer(self, device: torch.device):
        """The ``--sample-tokenizer`` on ``device`` (loaded once), or None."""
        if self._tokenizer is None and self.cfg.sample_tokenizer:
            from data_prep.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.sample_tokenizer, device=device)
        return self._tokenizer

    def run(self, backend: TrainingBackend, iteration: int, logger) -> torch.Tensor | None:
        """Gather the weights to the logging rank, generate there and log (collective: every rank calls it).

        Returns:
            the generated int64 [N] tokens on the logging rank, None elsewhere.
        """
        dst = dist.get_world_size() - 1 if dist.is_initialized() else 0
        state = backend.gather_weights(dst)
        if state is None:
            return None
        from megatron_nbp.inference.model import NBPDecoder
        from megatron_nbp.inference.pipeline import NBPPipeline

        device = backend.plan.device if backend.plan is not None else torch.device("cpu")
        m = self.cfg.model
        # The decoder's default initialisation draws from the global CPU generator, on this rank only: restore
        # it, or this rank's later draws (e.g. the input-token corruption its tensor-parallel partners must
        # draw identically) would differ from its partners'. The weights are overwritten anyway.
        with torch.random.fork_rng(devices=[]):
            model = NBPDecoder(m)
        model.load_state_dict(state, strict=True)
        model = model.to(device).eval()
        with torch.no_grad():
            tokens = generate_sample(model, self.cfg, *self.prompt())
            tokenizer = self.tokenizer(device)
            if tokenizer is not None:
                frames = NBPPipeline(model, tokenizer).decode(tokens[None])[0]  # uint8 [T, H, W, 3]
                logger.log_video("samples/video", frames, iteration)
            else:
                logger.log_image("samples/latent-ids", latent_ids_image(tokens, m.latent_shape, m.vocab_size),
                                 iteration)
        del model
        return tokens
