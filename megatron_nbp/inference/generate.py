"""Block-by-block NBP generation with a static KV cache (frame-prediction layout).

Given the first ``c`` latent frames of a clip (P = c*H*W tokens), the prompt is prefilled under the
block-causal rule; the logits at its last block predict the next block (position i predicts i + L).
Each later step feeds the L tokens just sampled, which attend to the cache and to each other, and
predicts the following block. Forward passes: (N - P) / L, e.g. 48 for 5x16x16 latents, L = 16, c = 2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.layouts import block_major_order, frame_prediction_block_ids, frame_prediction_grid_positions
from megatron_nbp.masks import block_causal_allowed


@dataclass
class SamplingConfig:
    """temperature 0 = greedy; top_k / top_p as in the NBP release (paper default k=16000, p=0.9)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def sample_tokens(logits: torch.Tensor, vocab_size: int, sampling: SamplingConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ids from logits [..., V_padded], never choosing padded ids >= vocab_size.

    Returns:
        int64 [...] sampled ids.
    """
    logits = logits[..., :vocab_size].float()
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < vocab_size:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) > sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


@dataclass
class GenerationResult:
    """tokens: int64 [B, N] full clips (prompt + generated); steps: forward passes; seconds: wall time."""

    tokens: torch.Tensor
    steps: int
    seconds: float


class BlockDecoder:
    """KV-cache decoding of one batch under the frame-prediction layout.

    Tokens are in the layout's block order (megatron_nbp.layouts.block_major_order; the (t, h, w)
    order for row blocks). ``prefill(prompt)`` runs the prompt (P tokens, P a multiple of L) under the
    block-causal rule and
    returns the logits of its last block; ``step(block)`` appends L tokens at the next positions
    (attending to the cache and to each other, no mask) and returns their logits. Logits at input
    position i predict video token i + L. The cache is preallocated for N - L positions.

    Raises:
        ValueError: prompt not a positive multiple of L below N, or a step past the end of the clip.
    """

    def __init__(self, model: NBPDecoder, batch_size: int) -> None:
        cfg = model.config
        if cfg.layout != "frame_prediction":
            raise ValueError(f"block decoding here implements the frame-prediction layout; the model's "
                             f"layout is {cfg.layout!r} (class-conditional sampling is not implemented yet)")
        self.model, self.block = model, cfg.block_size
        self.max_length = cfg.num_video_tokens - cfg.block_size
        self.device = model.embedding.word_embeddings.weight.device
        self.cache = model.new_cache(batch_size, self.max_length)
        self.length = 0
        self._grid = frame_prediction_grid_positions(tuple(cfg.latent_shape), tuple(cfg.block_shape)).to(self.device)

    def positions(self, start: int, length: int) -> torch.Tensor:
        """Position ids of inputs start .. start+length-1 in the model's form: int64 [1, length]
        (learned tables) or (t, h, w) coordinates [3, 1, length] (rope3d)."""
        if self.model.rope:
            return self._grid[:, None, start:start + length]
        return torch.arange(start, start + length, device=self.device).unsqueeze(0)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt: int64 [B, P]. Returns logits [B, L, V] of the prompt's last block."""
        plen = prompt.shape[1]
        if plen % self.block or not 0 < plen <= self.max_length:
            raise ValueError(f"prompt length {plen} must be a positive multiple of the block size "
                             f"{self.block}, at most {self.max_length}")
        positions = self.positions(0, plen)
        allowed = block_causal_allowed(frame_prediction_block_ids(plen, self.block).to(self.device)).unsqueeze(0)
        logits = self.model(prompt.to(self.device), positions, allowed, self.cache, start=0)
        self.length = plen
        return logits[:, -self.block:]

    def step(self, block_tokens: torch.Tensor) -> torch.Tensor:
        """block_tokens: int64 [B, L] at the next L positions. Returns their logits [B, L, V]."""
        if self.length + self.block > self.max_length:
            raise ValueError(f"no room for another block: {self.length} of {self.max_length} positions used")
        positions = self.positions(self.length, self.block)
        logits = self.model(block_tokens.to(self.device), positions, None, self.cache, start=self.length)
        self.length += self.block
        return logits


@torch.no_grad()
def generate_frame_prediction(model: NBPDecoder, prompt: torch.Tensor, sampling: SamplingConfig = SamplingConfig(),
                              generator: torch.Generator | None = None, progress: bool = False) -> GenerationResult:
    """Complete clips from their first latent frames, one block per forward pass.

    Args:
        model: converted NBP model (frame-prediction layout).
        prompt: int64 [B, P] video tokens of the condition frames, (t, h, w)-major; P a positive
            multiple of L, < N (whole frames when the block spans several frames).
        sampling: temperature / top-k / top-p.
        generator: torch.Generator for reproducible sampling.
        progress: show a tqdm bar over block steps.

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
    logits = decoder.prefill(prompt)
    pieces, steps = [prompt.to(decoder.device)], 1
    bar = tqdm(total=(total - prompt.shape[1]) // block, desc="generating blocks", unit="block",
               disable=not progress)
    while True:
        pieces.append(sample_tokens(logits, cfg.vocab_size, sampling, generator))
        bar.update(1)
        if decoder.length + block == total:
            break
        logits = decoder.step(pieces[-1])
        steps += 1
    bar.close()
    tokens = torch.cat(pieces, dim=1)
    tokens = torch.empty_like(tokens).index_copy_(1, order.to(tokens.device), tokens)  # back to (t, h, w) order
    return GenerationResult(tokens, steps, time.perf_counter() - start_time)
