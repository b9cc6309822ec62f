"""Static-shape KV-cache decode steps: run eagerly, compiled (torch.compile) or replayed as CUDA graphs.

A block step of KV-cache generation (megatron_nbp.inference.generate) feeds s tokens (s = L, or 1 for the
hybrid layout's first block) at cache positions ``start : start + s``. The eager step slices the cache with
Python ints, so its shapes grow with ``start``. The static step here is a pure function of fixed buffers:

* the tokens of the step: a [B, s] input buffer;
* ``start``: a 0-dim int64 device tensor; the cache positions are ``start + arange(s)`` and the step's
  learned positions / (t, h, w) RoPE coordinates are gathered on the device from a [S] / [3, S] table;
* the KV cache write: ``index_copy_`` at those positions (StaticKVCache.write);
* attention over the whole preallocated cache (key length = max_length) under the mask
  "key position < start + s and not padding", built on the device. Masked keys get zero weight, so the
  result equals the eager step's attention over the first ``start + s`` keys (up to summation order).

One such step serves every step of a clip and every clip with the same (batch size, s): a CUDA graph
captured once (torch.cuda.CUDAGraph) is replayed with new buffer contents, which removes the launch
overhead of the few hundred small kernels of a step. The prefill (a different length per prompt) stays
eager. Decode modes (:data:`DECODE_MODES`):

* ``"eager"``: today's path, Python-int slices (any device; the default on the CPU);
* ``"static"``: the static-shape step run eagerly (any device; the code the other two run);
* ``"compile"``: the static-shape step through ``torch.compile(fullgraph=True)`` (any device; one
  compilation per s). A full graph also shows, on the CPU, that the step has no data-dependent Python
  branch, which is what a CUDA graph capture needs;
* ``"cuda_graph"``: the static-shape step captured as a CUDA graph per (batch size, s) (CUDA only; the
  default on a GPU).

The static modes keep one :class:`StaticStepRunner` per (model, batch size, cache length): its KV cache,
buffers and graphs are reused by every generation of that model at that batch size, so only one such
generation may run at a time (a decoder whose cache was taken by a newer one refuses to go on).
"""

from __future__ import annotations

import torch

from megatron_nbp.inference.kv_cache import StaticKVCache

__all__ = ["DECODE_MODES", "StaticStepRunner", "clear_static_step_runners", "resolve_decode_mode",
           "static_step_runner"]

DECODE_MODES = ("eager", "static", "compile", "cuda_graph")
"""The decode modes of block steps, see the module docstring."""


def resolve_decode_mode(mode: str | None, device: torch.device | str) -> str:
    """The decode mode to use on ``device``: ``mode`` itself, or for None the default ("cuda_graph" on a
    CUDA device, "eager" elsewhere).

    Raises:
        ValueError: a mode not in :data:`DECODE_MODES`, or "cuda_graph" for a model not on a CUDA device.
    """
    device = torch.device(device)
    if mode is None:
        return "cuda_graph" if device.type == "cuda" else "eager"
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode {mode!r} is not one of {', '.join(DECODE_MODES)}")
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode_mode 'cuda_graph' needs a model on a CUDA device; this one is on {device} "
                         f"(use 'eager', 'static' or 'compile')")
    return mode


class StaticStepRunner:
    """The static-shape decode steps of one model at one batch size: a zero-filled KV cache, the step
    buffers, and per step length s a compiled function or a captured CUDA graph.

    Use: :meth:`claim` (a decoder takes the cache and sets the layout's positions and key padding), an eager
    prefill into :attr:`cache`, then :meth:`step` for every later pass.

    Args:
        model: the NBPDecoder (weights on their final device and dtype: a captured graph reads them in place).
        batch_size: B, sequences decoded together.
        max_length: positions of the cache (the layout's S).

    Attributes:
        cache: the StaticKVCache every decoder claiming this runner writes.
        captures: CUDA graphs captured so far (one per step length s).
        compiles: torch.compile'd step functions built so far (one per runner; torch recompiles it per s).
    """

    def __init__(self, model, batch_size: int, max_length: int) -> None:
        self.model = model
        self.batch_size, self.max_length = batch_size, max_length
        self.device = model.embedding.word_embeddings.weight.device
        with torch.inference_mode(False):   # normal tensors: written in place inside and outside inference mode
            self.cache: StaticKVCache = model.new_cache(batch_size, max_length)
            self.key_index = torch.arange(max_length, device=self.device)                 # int64 [S]
            self.key_valid = torch.ones(batch_size, max_length, dtype=torch.bool, device=self.device)
            self.start = torch.zeros((), dtype=torch.long, device=self.device)
        self.positions: torch.Tensor | None = None          # int64 [S] or [3, S], set by claim
        self.owner: object | None = None
        self.captures = 0
        self.compiles = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._compiled = None

    def claim(self, owner: object, positions: torch.Tensor, key_padding: torch.Tensor | None) -> None:
        """Hand the cache to ``owner`` (a decoder) for a new clip.

        Args:
            positions: int64 [S] learned positions or [3, S] (t, h, w) RoPE coordinates of every input position.
            key_padding: bool [B, S], True at positions never attended, or None.

        Raises:
            ValueError: positions or key padding of other shapes than the runner's.
        """
        if positions.shape[-1] != self.max_length:
            raise ValueError(f"positions {tuple(positions.shape)} do not cover the {self.max_length} cache positions")
        if key_padding is not None and tuple(key_padding.shape) != (self.batch_size, self.max_length):
            raise ValueError(f"key padding {tuple(key_padding.shape)} must be [{self.batch_size}, {self.max_length}]")
        with torch.inference_mode(False):
            if self.positions is None or self.positions.shape != positions.shape:
                self.positions = torch.empty_like(positions, dtype=torch.long, device=self.device)
                self._graphs.clear()                   # captured against the old buffer
            self.positions.copy_(positions)
            if key_padding is None:
                self.key_valid.fill_(True)
            else:
                self.key_valid.copy_(~key_padding.bool())
        self.owner = owner

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The static-shape step (what "static" runs, "compile" compiles and "cuda_graph" captures): tokens
        int64 [B, s] at cache positions ``start : start + s`` (``start`` read from the device scalar
        :attr:`start`). Returns logits [B, s, V_padded]."""
        s = tokens.shape[1]
        index = self.start + self.key_index[:s]                                  # [s] cache positions
        positions = self.positions.index_select(-1, index).unsqueeze(-2)         # [1, s] or [3, 1, s]
        allowed = (self.key_index < self.start + s) & self.key_valid             # [B, S]
        return self.model.decode_step(tokens, positions, allowed.unsqueeze(1), self.cache, index)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, start: int, mode: str) -> torch.Tensor:
        """Feed tokens int64 [B, s] (on the model's device) at cache positions ``start : start + s`` after
        the prefill; returns their logits [B, s, V_padded] (a tensor of its own, not a graph buffer).

        Raises:
            ValueError: a step past the cache, a batch other than the runner's, or an unknown mode.
        """
        b, s = tokens.shape
        if b != self.batch_size or start + s > self.max_length or start < 1:
            raise ValueError(f"a step of {tuple(tokens.shape)} tokens at {start} does not fit the runner's cache "
                             f"[{self.batch_size}, {self.max_length}] after a prefill")
        self.start.fill_(start)
        if mode == "static":
            return self.forward(tokens)
        if mode == "compile":
            if self._compiled is None:
                self._compiled = torch.compile(self.forward, dynamic=False, fullgraph=True)
                self.compiles += 1
            return self._compiled(tokens)
        if mode == "cuda_graph":
            entry = self._graphs.get(s)
            if entry is None:
                entry = self._graphs[s] = self._capture(tokens)
            graph, tokens_buffer, logits = entry
            tokens_buffer.copy_(tokens)
            with torch.cuda.device(self.device):  # replays on the current stream of the current device
                graph.replay()
            return logits.clone()
        raise ValueError(f"StaticStepRunner runs the decode modes 'static', 'compile' and 'cuda_graph', not {mode!r}")

    def _capture(self, tokens: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Capture :meth:`forward` for steps of ``tokens.shape[1]`` tokens as a CUDA graph.

        The warm-up runs (on a side stream, as torch.cuda.graphs asks, so that lazy library state exists
        before capture) are this very step: it writes the same keys and values at the same positions each
        time, so running it more than once changes nothing. Returns (graph, its token buffer, its logits).
        """
        with torch.inference_mode(False):
            tokens_buffer = tokens.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(tokens_buffer)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph captures on a stream of the CURRENT device: on a model on another GPU (cuda:1 while
        # cuda:0 is current) nothing would be captured and every replay would return the capture's logits
        with torch.cuda.device(self.device), torch.cuda.graph(graph):
            logits = self.forward(tokens_buffer)
        self.captures += 1
        return graph, tokens_buffer, logits


def _weights_signature(model) -> tuple:
    return tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())


def static_step_runner(model, batch_size: int, max_length: int, create: bool = True) -> StaticStepRunner | None:
    """The model's :class:`StaticStepRunner` for (batch size, cache length), made on first use and kept on
    the model (a new one once its weights have moved or changed dtype: captured graphs read them in place).
    With ``create=False``, the existing runner or None."""
    runners = model.__dict__.setdefault("_static_step_runners", {})
    key = (batch_size, max_length)
    runner, signature = runners.get(key, (None, None))
    current = _weights_signature(model)
    if runner is not None and signature == current:
        return runner
    if not create:
        return None
    runner = StaticStepRunner(model, batch_size, max_length)
    runners[key] = (runner, current)
    return runner


def clear_static_step_runners(model) -> int:
    """Drop the model's runners (their KV caches and graphs: memory back to the caching allocator once no
    decoder holds them). Returns how many were dropped."""
    runners = model.__dict__.pop("_static_step_runners", {})
    return len(runners)
