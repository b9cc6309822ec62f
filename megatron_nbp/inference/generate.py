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

Sampling (temperature, top-k / top-p, the guidance mix) lives in megatron_nbp.inference.sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.inference.sampling import Sampler, SamplingConfig, sample_tokens
from megatron_nbp.inference.sampling import guided_logits as _guided
from megatron_nbp.layouts import (block_major_order, frame_prediction_block_ids, frame_prediction_grid_positions,
                                  hybrid_block_ids, hybrid_grid_positions)
from megatron_nbp.masks import block_causal_allowed

# SamplingConfig and sample_tokens are re-exported: `from megatron_nbp.inference.generate import SamplingConfig,
# sample_tokens` keeps working (their home is megatron_nbp.inference.sampling).
__all__ = ["SamplingConfig", "Sampler", "sample_tokens", "GenerationResult", "KVDecoder", "BlockDecoder",
           "HybridDecoder", "generate_hybrid", "generate_frame_prediction"]


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

    ``append(tokens)`` feeds the next s tokens: the first call (the prefill) under the block-causal
    rule, every later call as one block that sees the cache and itself. Returns their logits.

    Raises:
        ValueError: appending past the end of the layout.
    """

    def __init__(self, model: NBPDecoder, batch_size: int, positions: torch.Tensor, block_ids: torch.Tensor,
                 key_padding: torch.Tensor | None = None) -> None:
        self.model = model
        self.device = model.embedding.word_embeddings.weight.device
        self.max_length = block_ids.shape[0]
        self.cache = model.new_cache(batch_size, self.max_length)
        self.positions = positions.to(self.device)
        self.block_ids = block_ids.to(self.device)
        self.key_padding = None if key_padding is None else key_padding.to(self.device)
        self.length = 0

    def append(self, tokens: torch.Tensor, num_logits: int | None = None) -> torch.Tensor:
        """tokens: int64 [B, s] model ids. Returns logits [B, s, V_padded], or of the last ``num_logits``."""
        start, end = self.length, self.length + tokens.shape[1]
        if end > self.max_length:
            raise ValueError(f"no room for {tokens.shape[1]} more tokens: {start} of {self.max_length} positions used")
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

    def __init__(self, model: NBPDecoder, batch_size: int) -> None:
        cfg = model.config
        if cfg.layout != "frame_prediction":
            raise ValueError(f"BlockDecoder implements the frame-prediction layout; the model's layout is "
                             f"{cfg.layout!r} (use HybridDecoder)")
        self.block = cfg.block_size
        seq = cfg.num_video_tokens - cfg.block_size
        grid = frame_prediction_grid_positions(tuple(cfg.latent_shape), tuple(cfg.block_shape))
        super().__init__(model, batch_size, grid if model.rope else torch.arange(seq),
                         frame_prediction_block_ids(seq, self.block))

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt: int64 [B, P]. Returns logits [B, L, V] of the prompt's last block."""
        plen = prompt.shape[1]
        if plen % self.block or not 0 < plen <= self.max_length or self.length:
            raise ValueError(f"prompt length {plen} must be a positive multiple of the block size "
                             f"{self.block}, at most {self.max_length}, and come first")
        return self.append(prompt, num_logits=self.block)

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
    """

    def __init__(self, model: NBPDecoder, batch_size: int, condition_padding: torch.Tensor | None = None) -> None:
        cfg = model.config
        if cfg.layout != "hybrid":
            raise ValueError(f"HybridDecoder implements the hybrid layout; the model's layout is {cfg.layout!r}")
        P, N, L = cfg.num_condition_tokens, cfg.num_video_tokens, cfg.block_size
        self.P, self.L = P, L
        grid = hybrid_grid_positions(P, tuple(cfg.latent_shape), tuple(cfg.block_shape))
        padding = None
        if condition_padding is not None and bool(condition_padding.any()):
            padding = torch.cat([condition_padding.bool(), torch.zeros(batch_size, N, dtype=torch.bool)], dim=1)
        super().__init__(model, batch_size, grid if model.rope else torch.arange(P + N),
                         hybrid_block_ids(P, N, L), padding)

    def prefill(self, condition: torch.Tensor) -> torch.Tensor:
        """condition: int64 [B, P] condition *model* ids. Returns BOV's logits [B, 1, V]."""
        bov = torch.zeros(condition.shape[0], 1, dtype=torch.long, device=condition.device)  # BOV = 0
        return self.append(torch.cat([condition, bov], dim=1), num_logits=1)


@torch.no_grad()
def generate_hybrid(model: NBPDecoder, condition: torch.Tensor, condition_padding: torch.Tensor | None = None,
                    sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None,
                    progress: bool = False, *, sampler: Sampler = sample_tokens) -> GenerationResult:
    """Class- or text-conditional generation of whole clips (hybrid layout), one block per forward pass
    after the first block's tokens.

    Args:
        model: converted NBP model in the hybrid layout.
        condition: int64 [B, P] condition ids (class ids [B, 1], or text ids padded to P).
        condition_padding: bool [B, P], True at padded text positions.
        sampling: temperature / top-k / top-p / classifier-free guidance scale.
        generator: torch.Generator for reproducible sampling.
        progress: tqdm bar over forward passes.
        sampler: called once per forward pass as ``sampler(logits, vocab_size, sampling, generator)`` with
            the (guided) logits of the video codes, float [B, s, V_padded - video_token_offset] (s = 1 for
            BOV and the first block's tokens, then L), and ``model.config.vocab_size``; returns int64
            [B, s] video codes in block order. Default :func:`sample_tokens`.

    Returns:
        GenerationResult: tokens [B, N] video codes in (t, h, w) order; steps = L + N/L - 1.

    Raises:
        ValueError: wrong condition shape or ids, or guidance without a null condition in the model.
    """
    cfg = model.config
    P, N, L, offset = cfg.num_condition_tokens, cfg.num_video_tokens, cfg.block_size, cfg.video_token_offset
    real = offset - L - (1 if cfg.null_condition else 0)
    if condition.dim() != 2 or condition.shape[1] != P:
        raise ValueError(f"condition must be [B, {P}] ids, got {tuple(condition.shape)}")
    batch = condition.shape[0]
    pad = torch.zeros_like(condition, dtype=torch.bool) if condition_padding is None else condition_padding.bool()
    if bool((condition[~pad] < 0).any() or (condition[~pad] >= real).any()):
        raise ValueError(f"condition ids must be in [0, {real}), got {condition.tolist()}")
    ids = condition.masked_fill(pad, 0) + L
    guided = sampling.cfg_scale != 1.0
    if guided:
        if not cfg.null_condition:
            raise ValueError("classifier-free guidance needs a model trained with a null condition "
                             "(model.null_condition, train.p_drop_cond)")
        ids = torch.cat([ids, torch.full_like(ids, offset - 1)])
        pad = torch.cat([pad, torch.zeros_like(pad)])
    decoder = HybridDecoder(model, ids.shape[0], pad)
    start_time = time.perf_counter()
    bar = tqdm(total=L + N // L - 1, desc="generating", unit="step", disable=not progress)
    steps = 0

    def sample(logits: torch.Tensor) -> torch.Tensor:
        nonlocal steps
        steps += 1
        bar.update(1)
        return sampler(_guided(logits, batch, sampling.cfg_scale)[..., offset:], cfg.vocab_size, sampling,
                       generator)

    def feed(codes: torch.Tensor) -> torch.Tensor:
        model_ids = codes + offset
        return torch.cat([model_ids, model_ids]) if guided else model_ids

    pieces = [sample(decoder.prefill(ids.to(decoder.device)))]            # z_0
    prefill_seconds = _elapsed(start_time, decoder.device)
    for _ in range(L - 1):                                                   # z_1 .. z_{L-1}
        pieces.append(sample(decoder.append(feed(pieces[-1]))))
    mbos = torch.arange(1, L, device=decoder.device).expand(ids.shape[0], L - 1)
    first = torch.cat([feed(pieces[-1]), mbos], dim=1)                       # [z_{L-1}, MBOS_1..]
    block = sample(decoder.append(first))                                    # block 1
    pieces.append(block)
    while sum(p.shape[1] for p in pieces) < N:
        block = sample(decoder.append(feed(block)))
        pieces.append(block)
    bar.close()
    tokens = torch.cat(pieces, dim=1)
    order = block_major_order(tuple(cfg.latent_shape), tuple(cfg.block_shape)).to(tokens.device)
    tokens = torch.empty_like(tokens).index_copy_(1, order, tokens)
    return GenerationResult(tokens, steps, _elapsed(start_time, decoder.device), prefill_seconds)


@torch.no_grad()
def generate_frame_prediction(model: NBPDecoder, prompt: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
                              generator: torch.Generator | None = None, progress: bool = False, *,
                              sampler: Sampler = sample_tokens) -> GenerationResult:
    """Complete clips from their first latent frames, one block per forward pass.

    Args:
        model: converted NBP model (frame-prediction layout).
        prompt: int64 [B, P] video tokens of the condition frames, (t, h, w)-major; P a positive
            multiple of L, < N (whole frames when the block spans several frames).
        sampling: temperature / top-k / top-p.
        generator: torch.Generator for reproducible sampling.
        progress: show a tqdm bar over block steps.
        sampler: called once per forward pass as ``sampler(logits, vocab_size, sampling, generator)`` with
            the logits float [B, L, V_padded] of the next block and ``model.config.vocab_size``; returns
            int64 [B, L] video tokens in block order. Default :func:`sample_tokens`.

    Returns:
        GenerationResult with tokens [B, N] ((t, h, w)-major) and steps = (N - P) / L forward passes.

    Raises:
        ValueError: prompt length not a multiple of the block size or not shorter than the clip.
    """
    cfg = model.config
    block, total = cfg.block_size, cfg.num_video_tokens
    order = block_major_order(tuple(cfg.latent_shape), tuple(cfg.block_shape)).to(prompt.device)
    plen = prompt.shape[1]
    if plen < total and not bool((order[:plen] < plen).all()):
        raise ValueError(f"a prompt of {plen} tokens is not a whole number of blocks of shape {cfg.block_shape}")
    prompt = prompt[:, order[:plen]] if plen < total else prompt
    decoder = BlockDecoder(model, prompt.shape[0])
    start_time = time.perf_counter()
    bar = tqdm(total=(total - prompt.shape[1]) // block, desc="generating blocks", unit="block",
               disable=not progress)
    pieces = [prompt.to(decoder.device), sampler(decoder.prefill(prompt), cfg.vocab_size, sampling, generator)]
    prefill_seconds, steps = _elapsed(start_time, decoder.device), 1
    bar.update(1)
    while decoder.length + block < total:
        pieces.append(sampler(decoder.step(pieces[-1]), cfg.vocab_size, sampling, generator))
        steps += 1
        bar.update(1)
    bar.close()
    tokens = torch.cat(pieces, dim=1)
    tokens = torch.empty_like(tokens).index_copy_(1, order.to(tokens.device), tokens)  # back to (t, h, w) order
    return GenerationResult(tokens, steps, _elapsed(start_time, decoder.device), prefill_seconds)
