"""Sampling the next tokens from logits, as the NBP release does: temperature, top-k, top-p (nucleus),
and the classifier-free guidance mix of conditional and unconditional logits.

:class:`SamplingConfig` holds the settings (the paper's defaults: k = 16000, p = 0.9);
:func:`sample_tokens` draws ids from logits of any leading shape; :func:`guided_logits` mixes the two
halves of a guided batch. megatron_nbp.inference.generate calls them once per forward pass (or a
caller-supplied function of the :data:`Sampler` signature instead of :func:`sample_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field, field_validator

from nbp_common.config import TypedConfig, add_config_arguments, config_overrides

__all__ = ["SamplingConfig", "Sampler", "sample_tokens", "guided_logits", "add_sampling_args", "sampling_from_args"]


class SamplingConfig(TypedConfig):
    """How generation picks tokens from logits, as the NBP release does (the paper's defaults: top-k
    16000, top-p 0.9, temperature 1). One meaning of "off" wherever a config comes from: ``top_k`` None
    or 0 and ``top_p`` None or >= 1 turn the filter off (stored as None). The flags of ``nbp-generate``
    and ``nbp-evaluate`` are derived from these fields (:func:`add_sampling_args`).

    Raises:
        ConfigError (a ValueError): a negative top_k, a top_p <= 0, a cfg_scale < 0, or a wrong type,
            naming the field.
    """

    temperature: float = Field(1.0, description="softmax temperature; 0 = greedy (argmax)")
    top_k: int | None = Field(16000, description="keep the ids whose logits are >= the k-th largest; 0 = off "
                                                 "(paper: 16000)")
    top_p: float | None = Field(0.9, description="nucleus: keep the most probable ids up to this mass; 1 = off "
                                                 "(paper: 0.9)")
    cfg_scale: float = Field(1.0, description="classifier-free guidance scale: uncond + scale x (cond - uncond); "
                                              "1 = none (needs a model trained with a null condition)")

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"top_k={value} must be >= 0 (0 turns top-k off)")
        return value or None

    @field_validator("top_p")
    @classmethod
    def _top_p_off(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"top_p={value} must be in (0, 1] (1 turns top-p off)")
        return value if value is not None and value < 1.0 else None

    @field_validator("cfg_scale")
    @classmethod
    def _cfg_scale_positive(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"cfg_scale={value} must be >= 0 (1 = no guidance)")
        return value


SAMPLING_LAUNCHER_FLAGS = {"--seed": "the sampling seed (not a SamplingConfig field: one per run, not per model)"}


def add_sampling_args(parser) -> None:
    """The sampling flags every generating command shares (nbp-generate, nbp-evaluate): one per
    :class:`SamplingConfig` field (nbp_common.config.add_config_arguments, defaults shown) and ``--seed``.
    Read them back with :func:`sampling_from_args`."""
    add_config_arguments(parser, SamplingConfig, show_defaults=True)
    parser.add_argument("--seed", type=int, default=0, help=SAMPLING_LAUNCHER_FLAGS["--seed"] + " (default: 0)")


def sampling_from_args(args) -> SamplingConfig:
    """The :class:`SamplingConfig` of the flags added by :func:`add_sampling_args` (fields not given keep
    their defaults).

    Raises:
        ConfigError: a bad value, naming the field."""
    return SamplingConfig.from_dict({}, config_overrides(args, SamplingConfig))


def sample_tokens(logits: torch.Tensor, vocab_size: int, sampling: SamplingConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ids from logits [..., V_padded], never choosing padded ids >= vocab_size.

    The distribution is the NBP release's ``top_k_top_p_filtering``: top-k keeps the logits >= the k-th
    largest; top-p then keeps, by decreasing probability (renormalised over the k), each token whose
    predecessors' mass is <= p (so the smallest prefix reaching p). It is sampled without sorting the
    vocabulary (the cost that dominated a block step): an unsorted top-k gives the k survivors (with any
    ties at the k-th value, see ``_top_k_candidates``), a candidate is drawn from their distribution by
    inverse CDF (fp64), and it is accepted if the mass of the tokens more probable than it is <= p, else
    redrawn (rejection sampling from a superset gives exactly the renormalised nucleus; acceptance >= p per
    draw). Rows still rejected after ``_REJECTION_ROUNDS`` fall back to the sorted filter. Ties at the
    nucleus edge are all kept (the release keeps those its unstable sort happens to put first).

    Args:
        logits: float [..., V_padded] (any dtype; computed in fp32).
        vocab_size: ids >= this are never sampled.
        generator: torch.Generator on the logits' device (seeded for reproducibility).

    Returns:
        int64 [...] sampled ids.
    """
    logits = logits[..., :vocab_size].float()
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    k = sampling.top_k if sampling.top_k is not None and sampling.top_k < vocab_size else None
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1.0 else None
    candidates, candidate_ids = _top_k_candidates(logits, k)
    probs = candidates.softmax(-1)
    cdf = probs.double().cumsum(-1)
    num_rows, width = candidates.shape
    out = torch.full((num_rows,), vocab_size, dtype=torch.long, device=logits.device)   # not drawn yet: never an id
    rows = torch.arange(num_rows, device=logits.device)
    for _ in range(_REJECTION_ROUNDS):
        every = rows.numel() == num_rows          # first round: no row copies
        c, pr, cd = (candidates, probs, cdf) if every else (candidates[rows], probs[rows], cdf[rows])
        u = torch.rand(rows.numel(), 1, generator=generator, dtype=torch.float64, device=logits.device)
        cand = torch.searchsorted(cd, u * cd[:, -1:], right=True).clamp(max=width - 1)
        if top_p is None:
            ok = torch.ones(rows.numel(), dtype=torch.bool, device=logits.device)
        else:
            ok = (pr * (c > c.gather(1, cand))).sum(-1) <= top_p   # mass strictly ahead of the candidate
        out[rows[ok]] = cand[ok, 0]
        rows = rows[~ok]
        if rows.numel() == 0:
            break
    else:
        out[rows] = _sorted_nucleus_sample(candidates[rows], top_p, generator)
    if candidate_ids is not None:
        out = candidate_ids.gather(1, out[:, None])[:, 0]
    return out.view(shape)


def _top_k_candidates(logits: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-k survivors of logits fp32 [R, V]: (their logits [R, W], their vocabulary ids int64 [R, W]),
    unsorted, W = k + a tie margin, with -inf where a logit is below the k-th largest.

    The release keeps every logit >= the k-th largest, which is more than k where values tie at the k-th
    (usual with bf16 logits: tens of ties at k = 16000 of 64K). An unsorted top-W with W = k + margin holds
    all of them whenever its smallest value is below the k-th; otherwise (or without top-k) the whole row is
    returned with the rest set to -inf and ``None`` for the ids.
    """
    if k is None:
        return logits, None
    vocab = logits.shape[-1]
    width = min(vocab, k + max(_TIE_MARGIN_MIN, k // 16))
    values, ids = torch.topk(logits, width, dim=-1, sorted=False)
    kth = torch.kthvalue(values, width - k + 1, dim=-1, keepdim=True).values       # the k-th largest logit
    if width < vocab and bool((values.amin(-1, keepdim=True) >= kth).any()):   # ties may go on outside the W
        return logits.masked_fill(logits < kth, float("-inf")), None
    return values.masked_fill(values < kth, float("-inf")), ids


_TIE_MARGIN_MIN = 256      # top-k takes k + max(this, k / 16) values, so that ties at the k-th value fit
_REJECTION_ROUNDS = 8


def _sorted_nucleus_sample(logits: torch.Tensor, top_p: float | None,
                           generator: torch.Generator | None) -> torch.Tensor:
    """The release's sorted top-p filter and a multinomial draw: logits fp32 [R, C] (top-k already
    applied) -> int64 [R] positions in C. The mass ahead of a token is that of the tokens strictly more
    probable (every member of a tie sees the mass before the tie), as in the rejection path."""
    values, ids = torch.sort(logits, descending=True, dim=-1)
    if top_p is not None:
        probs = values.softmax(-1)
        first_of_tie = torch.searchsorted(-values, -values)      # first position holding the same value
        ahead = (probs.cumsum(-1) - probs).gather(1, first_of_tie)
        values = values.masked_fill(ahead > top_p, float("-inf"))
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
    return ids.gather(1, choice)[:, 0]


Sampler = Callable[[torch.Tensor, int, SamplingConfig, torch.Generator | None], torch.Tensor]
"""The signature of :func:`sample_tokens`: (logits float [..., V], vocab_size, sampling, generator) -> int64 [...]."""


def guided_logits(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a [2B, ...] batch (conditional rows first, then the null-condition
    rows): ``uncond + scale * (cond - uncond)`` [B, ...], in the logits' dtype; the conditional rows
    alone when ``scale == 1`` (no guidance; the batch may then be just [B, ...])."""
    if scale == 1.0:
        return logits[:batch]
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)
