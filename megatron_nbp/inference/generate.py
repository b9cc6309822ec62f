"""Block-by-block NBP generation with a static KV cache, for every layout.

Frame prediction: the first ``c`` latent frames of a clip (c*H*W tokens) are prefilled under the
block-causal rule; the logits at the prompt's last block predict the next block (position i predicts
i + L). Each later step feeds the L tokens just sampled, which attend to the cache and to each other,
and predicts the following block. Forward passes: (N - cHW) / L, e.g. 48 for 5x16x16, L = 16, c = 2.

Class- or text-conditional hybrid: the condition and BOV are prefilled (BOV predicts z_0), the first
block is generated token by token (z_k predicts z_{k+1}), then ``[z_{L-1}, MBOS_1..MBOS_{L-1}]``
predicts block 1 and every block the next: L + N/L - 1 forward passes (16 + 79 = 95 for 5x16x16).
Classifier-free guidance runs the conditional and the null-condition sequences as one batch and
samples from ``uncond + scale * (cond - uncond)``.

NTP is the same code with L = 1 (1280 / 768 passes). Every append after the prefill is exactly one
block, which sees the whole cache and itself: that is the block-causal rule for the newest block.

The passes, their lengths, block ids and positions come from the model's token layout
(``TokenLayout.generation_plan``, megatron_nbp.layouts.plan); :func:`_run_plan` walks the plan.
Sampling (temperature, top-k / top-p, the guidance mix) lives in megatron_nbp.inference.sampling.

``decode_mode`` chooses how the passes after the prefill run (megatron_nbp.inference.static_decode):
"eager" (Python-int cache slices), "static" (the static-shape step, eagerly), "compile" (that step through
torch.compile) or "cuda_graph" (that step captured once per (batch size, step length) and replayed);
None = "cuda_graph" on a GPU, "eager" on the CPU. The prefill is eager in every mode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.inference.sampling import Generators, Sampler, SamplingConfig, row_generators, sample_tokens
from megatron_nbp.inference.sampling import guided_logits as _guided
from megatron_nbp.inference.static_decode import DECODE_MODES, resolve_decode_mode, static_step_runner
from megatron_nbp.layouts import DecodeStep, FramePredictionLayout, GenerationPlan, HybridLayout
from megatron_nbp.masks import block_causal_allowed

# SamplingConfig and sample_tokens are re-exported: `from megatron_nbp.inference.generate import SamplingConfig,
# sample_tokens` keeps working (their home is megatron_nbp.inference.sampling).
__all__ = ["SamplingConfig", "Sampler", "sample_tokens", "GenerationResult", "KVDecoder", "BlockDecoder",
           "HybridDecoder", "generate_hybrid", "generate_frame_prediction", "DECODE_MODES"]


@dataclass
class GenerationResult:
    """tokens: int64 [B, N] full clips (prompt + generated); steps: forward passes (the prefill included);
    seconds: wall time of the whole generation; prefill_seconds: of the prefill and its sampling (time to the
    first generated block or token; 0 when not measured). Both are taken after a CUDA synchronise on a GPU."""

    tokens: torch.Tensor
    steps: int
    seconds: float
    prefill_seconds: float = 0.0


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start`` (time.perf_counter) once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class KVDecoder:
    """Static-KV-cache decoding of one batch of sequences of a layout.

    Args:
        model: the converted NBP model.
        batch_size: sequences decoded together.
        positions: the layout's position ids of every input position: int64 [S] (learned tables) or
            [3, S] (rope3d (t, h, w) coordinates).
        block_ids: int64 [S] block ids of the layout.
        key_padding: bool [B, S], True at padded positions (never attended), or None.
        decode_mode: how the calls after the prefill run, one of DECODE_MODES (see the module docstring);
            None = "cuda_graph" on a GPU, "eager" on the CPU. The static modes share the model's cache for
            this batch size (megatron_nbp.inference.static_decode.static_step_runner): one decoder at a time.

    ``append(tokens)`` feeds the next s tokens: the first call (the prefill) under the block-causal
    rule, every later call as one block that sees the cache and itself. Returns their logits.

    Raises:
        ValueError: appending past the end of the layout; an unknown decode mode, or "cuda_graph" off CUDA.
        RuntimeError: appending after a newer decoder of the same model and batch size took the shared
            cache (static modes).
    """

    def __init__(self, model: NBPDecoder, batch_size: int, positions: torch.Tensor, block_ids: torch.Tensor,
                 key_padding: torch.Tensor | None = None, *, decode_mode: str | None = None) -> None:
        self.model = model
        self.device = model.embedding.word_embeddings.weight.device
        self.decode_mode = resolve_decode_mode(decode_mode, self.device)
        self.max_length = block_ids.shape[0]
        self.positions = positions.to(self.device)
        self.block_ids = block_ids.to(self.device)
        self.key_padding = None if key_padding is None else key_padding.to(self.device)
        if self.decode_mode == "eager":
            self.runner = None
            self.cache = model.new_cache(batch_size, self.max_length)
        else:
            self.runner = static_step_runner(model, batch_size, self.max_length)
            self.runner.claim(self, self.positions, self.key_padding)
            self.cache = self.runner.cache
        self.length = 0

    def append(self, tokens: torch.Tensor, num_logits: int | None = None) -> torch.Tensor:
        """tokens: int64 [B, s] model ids. Returns logits [B, s, V_padded], or of the last ``num_logits``."""
        start, end = self.length, self.length + tokens.shape[1]
        if end > self.max_length:
            raise ValueError(f"no room for {tokens.shape[1]} more tokens: {start} of {self.max_length} positions used")
        if self.runner is not None and self.runner.owner is not self:
            raise RuntimeError(f"this decoder's KV cache was taken by a newer decoder of the same model and batch "
                               f"size (decode_mode {self.decode_mode!r} shares one cache): run one at a time")
        if start and self.runner is not None:
            logits = self.runner.step(tokens.to(self.device), start, self.decode_mode)
            self.length = end
            return logits if num_logits is None else logits[:, logits.shape[1] - num_logits:]
        positions = self.positions[..., start:end].unsqueeze(-2)          # [1, s] or [3, 1, s]
        pad = None if self.key_padding is None else self.key_padding[:, :end]
        if start == 0:
            allowed = block_causal_allowed(self.block_ids[:end], key_padding=pad)
            allowed = allowed if allowed.dim() == 3 else allowed.unsqueeze(0)
        else:
            allowed = None if pad is None else (~pad).unsqueeze(1).expand(-1, end - start, -1)
        logits = self.model(tokens.to(self.device), positions, allowed, self.cache, start=start,
                            num_logits=num_logits)
        self.length = end
        return logits


class BlockDecoder(KVDecoder):
    """KV-cache decoding of one batch under the frame-prediction layout.

    Tokens are in the layout's block order (megatron_nbp.layouts.block_major_order; the (t, h, w)
    order for row blocks). ``prefill(prompt)`` runs the prompt (a multiple of L tokens) under the
    block-causal rule and returns the logits of its last block; ``step(block)`` appends L tokens and
    returns their logits. Logits at input position i predict video token i + L. The cache holds N - L
    positions.

    Raises:
        ValueError: a model of another layout, a prompt not a positive multiple of L below N, or a step
            past the end of the clip.
    """

    def __init__(self, model: NBPDecoder, batch_size: int, *, decode_mode: str | None = None) -> None:
        layout = model.config.token_layout
        if not isinstance(layout, FramePredictionLayout):
            raise ValueError(f"BlockDecoder implements the frame-prediction layout; the model's layout is "
                             f"{layout.name!r} (use HybridDecoder)")
        self.layout = layout
        self.block = layout.block_size
        super().__init__(model, batch_size, layout.positions(model.rope), layout.block_ids(),
                         decode_mode=decode_mode)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt: int64 [B, P]. Returns logits [B, L, V] of the prompt's last block.

        Raises:
            ValueError: the prompt length (TokenLayout.generation_plan), or a cache already in use.
        """
        if self.length:
            raise ValueError(f"the prompt must come first: {self.length} positions are already in the cache")
        step = self.layout.generation_plan(prompt.shape[1]).prefill
        return self.append(prompt, num_logits=step.num_logits)

    def step(self, block_tokens: torch.Tensor) -> torch.Tensor:
        """block_tokens: int64 [B, L] at the next L positions. Returns their logits [B, L, V]."""
        return self.append(block_tokens)


class HybridDecoder(KVDecoder):
    """KV-cache decoding under the class- or text-conditional hybrid layout (model ids throughout).

    ``prefill(condition)`` runs [condition (P), BOV] and returns BOV's logits [B, 1, V] (predicting
    z_0); ``append`` then takes z_0 .. z_{L-2} one at a time, then ``[z_{L-1}, MBOS_1..MBOS_{L-1}]``,
    then each block. Video tokens are in block order.

    Args:
        condition_padding: bool [B, P], True at padded text positions.
        decode_mode: as for :class:`KVDecoder`.
    """

    def __init__(self, model: NBPDecoder, batch_size: int, condition_padding: torch.Tensor | None = None, *,
                 decode_mode: str | None = None) -> None:
        layout = model.config.token_layout
        if not isinstance(layout, HybridLayout):
            raise ValueError(f"HybridDecoder implements the hybrid layout; the model's layout is {layout.name!r}")
        self.layout = layout
        self.P, self.L = layout.num_prefix_tokens, layout.block_size
        super().__init__(model, batch_size, layout.positions(model.rope), layout.block_ids(),
                         layout.sequence_padding(condition_padding), decode_mode=decode_mode)

    def prefill(self, condition: torch.Tensor) -> torch.Tensor:
        """condition: int64 [B, P] condition *model* ids. Returns BOV's logits [B, 1, V]."""
        step = self.layout.generation_plan().prefill
        return self.append(_step_input(step, condition, None), num_logits=step.num_logits)


def _step_input(step: DecodeStep, given: torch.Tensor | None, generated: torch.Tensor | None) -> torch.Tensor:
    """The model ids one pass feeds, int64 [B, step.length]: the caller's ``given`` [B, step.given] (the
    prefill's prompt or condition), the last ``step.fed`` of the previous pass's ``generated`` model ids
    [B, >= step.fed], then the step's special tokens."""
    parts = ([given] if step.given else []) + ([generated[:, generated.shape[1] - step.fed:]] if step.fed else [])
    if step.special_ids:
        rows, device = parts[0].shape[0], parts[0].device
        specials = torch.tensor(step.special_ids, dtype=torch.long, device=device)
        parts.append(specials.expand(rows, len(step.special_ids)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _run_plan(decoder: KVDecoder, plan: GenerationPlan, given: torch.Tensor,
              sample: Callable[[torch.Tensor], torch.Tensor], feed: Callable[[torch.Tensor], torch.Tensor],
              start_time: float, bar) -> tuple[list[torch.Tensor], float]:
    """Run every pass of ``plan`` on ``decoder`` (empty cache).

    Args:
        given: int64 [B, plan.prefill.given] model ids the prefill starts with (prompt or condition).
        sample: logits [B, s, V_padded] of a pass's last s positions -> int64 [B', s] video codes.
        feed: codes int64 [B', s] -> the model ids the next pass takes [B, s].
        start_time: time.perf_counter() at the start of generation; bar: tqdm bar, one update per pass.

    Returns:
        (the codes each pass generated, in order; seconds to the prefill's sampled tokens).

    Raises:
        ValueError: a plan that does not start where the cache is (see GenerationPlan).
    """
    pieces, prefill_seconds = [], 0.0
    for i, step in enumerate(plan.steps):
        if step.start != decoder.length:
            raise ValueError(f"decode step {step} starts at {step.start}, the cache holds {decoder.length}")
        tokens = _step_input(step, given, feed(pieces[-1]) if step.fed else None)
        logits = decoder.append(tokens, num_logits=step.num_logits if step.num_logits < step.length else None)
        pieces.append(sample(logits))
        bar.update(1)
        if i == 0:
            prefill_seconds = _elapsed(start_time, decoder.device)
    return pieces, prefill_seconds


def _batch_generators(generator: Generators, seeds: Sequence[int] | None, batch: int,
                      device: torch.device) -> Generators:
    """The sampler's ``generator`` of a batch of ``batch`` samples: ``generator`` as given (one, or a
    sequence of ``batch``), or one generator per seed on ``device``.

    Raises:
        ValueError: both given, or a sequence / ``seeds`` not of ``batch`` entries."""
    if seeds is not None:
        if generator is not None:
            raise ValueError("give either seeds or generator, not both")
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}: give one seed per sample")
        return row_generators(seeds, device)
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}: give one per sample, or one in all")
    return generator


@torch.no_grad()
def generate_hybrid(model: NBPDecoder, condition: torch.Tensor, condition_padding: torch.Tensor | None = None,
                    sampling: SamplingConfig = SamplingConfig(), generator: Generators = None,
                    progress: bool = False, *, sampler: Sampler = sample_tokens,
                    seeds: Sequence[int] | None = None, decode_mode: str | None = None) -> GenerationResult:
    """Class- or text-conditional generation of whole clips (hybrid layout), one block per forward pass
    after the first block's tokens.

    Args:
        model: converted NBP model in the hybrid layout.
        condition: int64 [B, P] condition ids (class ids [B, 1], or text ids padded to P).
        condition_padding: bool [B, P], True at padded text positions.
        sampling: temperature / top-k / top-p / classifier-free guidance scale.
        generator: one torch.Generator for the whole batch, or B of them (sample i draws only from
            generator i, its guided rows included, so it equals sample i generated alone with generator i).
        progress: tqdm bar over forward passes.
        sampler: called once per forward pass as ``sampler(logits, vocab_size, sampling, generator)`` with
            the (guided) logits of the video codes, float [B, s, V_padded - video_token_offset] (s = 1 for
            BOV and the first block's tokens, then L), and ``model.config.vocab_size``; returns int64
            [B, s] video codes in block order. Default :func:`sample_tokens`.
        seeds: one seed per sample instead of ``generator``: B generators on the model's device
            (:func:`megatron_nbp.inference.sampling.row_generators`).
        decode_mode: how the passes after the prefill run (module docstring; None = "cuda_graph" on a GPU,
            "eager" on the CPU). Graphs are captured per (batch, 1) and (batch, L) and reused by later clips.

    Returns:
        GenerationResult: tokens [B, N] video codes in (t, h, w) order; steps = L + N/L - 1.

    Raises:
        ValueError: wrong condition shape or ids, guidance without a null condition in the model,
            ``seeds`` / a generator list not of B entries, both ``seeds`` and ``generator``, or a bad decode mode.
    """
    cfg = model.config
    layout = cfg.token_layout
    if not isinstance(layout, HybridLayout):
        raise ValueError(f"generate_hybrid needs a model of the hybrid layout; the model's layout is {layout.name!r}")
    P, offset, null_id = layout.num_prefix_tokens, layout.video_token_offset, layout.null_condition_id
    real = layout.num_real_conditions
    if condition.dim() != 2 or condition.shape[1] != P:
        raise ValueError(f"condition must be [B, {P}] ids, got {tuple(condition.shape)}")
    batch = condition.shape[0]
    pad = torch.zeros_like(condition, dtype=torch.bool) if condition_padding is None else condition_padding.bool()
    if bool((condition[~pad] < 0).any() or (condition[~pad] >= real).any()):
        raise ValueError(f"condition ids must be in [0, {real}), got {condition.tolist()}")
    guided = sampling.cfg_scale != 1.0
    if guided:
        if null_id is None:
            raise ValueError("classifier-free guidance needs a model trained with a null condition "
                             "(model.null_condition, train.p_drop_cond)")
        condition = torch.cat([condition, torch.full_like(condition, null_id)])
        pad = torch.cat([pad, torch.zeros_like(pad)])
    decoder = HybridDecoder(model, condition.shape[0], pad, decode_mode=decode_mode)
    generator = _batch_generators(generator, seeds, batch, decoder.device)
    plan = layout.generation_plan()
    ids = layout.condition_token_ids(condition, pad)
    start_time = time.perf_counter()
    bar = tqdm(total=plan.num_passes, desc="generating", unit="step", disable=not progress)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sampler(_guided(logits, batch, sampling.cfg_scale)[..., offset:], cfg.vocab_size, sampling,
                       generator)

    def feed(codes: torch.Tensor) -> torch.Tensor:
        model_ids = codes + offset
        return torch.cat([model_ids, model_ids]) if guided else model_ids

    pieces, prefill_seconds = _run_plan(decoder, plan, ids.to(decoder.device), sample, feed, start_time, bar)
    bar.close()
    tokens = layout.to_raster_order(torch.cat(pieces, dim=1))
    return GenerationResult(tokens, plan.num_passes, _elapsed(start_time, decoder.device), prefill_seconds)


@torch.no_grad()
def generate_frame_prediction(model: NBPDecoder, prompt: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
                              generator: Generators = None, progress: bool = False, *,
                              sampler: Sampler = sample_tokens,
                              seeds: Sequence[int] | None = None, decode_mode: str | None = None) -> GenerationResult:
    """Complete clips from their first latent frames, one block per forward pass.

    Args:
        model: converted NBP model (frame-prediction layout).
        prompt: int64 [B, P] video tokens of the condition frames, (t, h, w)-major; P a positive
            multiple of L, < N (whole frames when the block spans several frames).
        sampling: temperature / top-k / top-p.
        generator: one torch.Generator for the whole batch, or B of them (clip i draws only from
            generator i, so it equals clip i generated alone with generator i).
        progress: show a tqdm bar over block steps.
        sampler: called once per forward pass as ``sampler(logits, vocab_size, sampling, generator)`` with
            the logits float [B, L, V_padded] of the next block and ``model.config.vocab_size``; returns
            int64 [B, L] video tokens in block order. Default :func:`sample_tokens`.
        seeds: one seed per clip instead of ``generator``: B generators on the model's device
            (:func:`megatron_nbp.inference.sampling.row_generators`).
        decode_mode: how the block steps run (module docstring; None = "cuda_graph" on a GPU, "eager" on the
            CPU). One graph per (batch, L), captured by the first clip and reused by the later ones.

    Returns:
        GenerationResult with tokens [B, N] ((t, h, w)-major) and steps = (N - P) / L forward passes.

    Raises:
        ValueError: prompt length not a multiple of the block size or not shorter than the clip, or
            ``seeds`` / a generator list not of B entries, both ``seeds`` and ``generator``, or a bad decode mode.
    """
    cfg = model.config
    decoder = BlockDecoder(model, prompt.shape[0], decode_mode=decode_mode)
    generator = _batch_generators(generator, seeds, prompt.shape[0], decoder.device)
    layout = decoder.layout
    prompt = layout.prompt_in_block_order(prompt)
    plan = layout.generation_plan(prompt.shape[1])
    start_time = time.perf_counter()
    bar = tqdm(total=plan.num_passes, desc="generating blocks", unit="block", disable=not progress)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sampler(logits, cfg.vocab_size, sampling, generator)

    prompt = prompt.to(decoder.device)       # video codes are the model ids (video_token_offset 0)
    pieces, prefill_seconds = _run_plan(decoder, plan, prompt, sample, lambda codes: codes, start_time, bar)
    bar.close()
    tokens = layout.to_raster_order(torch.cat([prompt, *pieces], dim=1))
    return GenerationResult(tokens, plan.num_passes, _elapsed(start_time, decoder.device), prefill_seconds)
