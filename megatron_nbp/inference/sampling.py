"""Sampling the next tokens from logits, as the NBP release does: temperature, top-k, top-p (nucleus),
and the classifier-free guidance mix of conditional and unconditional logits.

:class:`SamplingConfig` holds the settings (the paper's defaults: k = 16000, p = 0.9);
:func:`sample_tokens` draws ids from logits of any leading shape, on the logits' device without a host
synchronisation, from one generator or one per batch row (:func:`row_generators`, so that a sample drawn in
a batch equals the sample drawn alone with its seed); :func:`guided_logits` mixes the two halves of a guided
batch. megatron_nbp.inference.generate calls them once per forward pass (or a caller-supplied function of
the :data:`Sampler` signature instead of :func:`sample_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator

from nbp_common.config import TypedConfig, add_config_arguments, config_overrides

__all__ = [
    "Generators",
    "Sampler",
    "SamplingConfig",
    "add_sampling_args",
    "guided_logits",
    "row_generators",
    "sample_tokens",
    "sampling_from_args",
]


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


Generators = torch.Generator | Sequence[torch.Generator] | None
"""What :func:`sample_tokens` draws its randomness from: one torch.Generator for the whole batch, a sequence of
B generators (row i of a [B, ...] batch draws only from generator i), or None (torch's default generator)."""


def row_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch.Generator per batch row, seeded ``seeds[i]``, on ``device`` (the logits' device): the
    ``generator`` of :func:`sample_tokens` under which row i of a batch samples as it would alone with
    ``torch.Generator(device).manual_seed(seeds[i])``.

    Raises:
        ValueError: no seeds."""
    if len(seeds) == 0:
        raise ValueError("seeds is empty: give one seed per batch row")
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def sample_tokens(logits: torch.Tensor, vocab_size: int, sampling: SamplingConfig,
                  generator: Generators = None) -> torch.Tensor:
    """Sample ids from logits [..., V_padded], never choosing padded ids >= vocab_size, without a host
    synchronisation (no value of a device tensor is read on the host, no shape depends on the data), so
    the call can be captured in a CUDA graph and queued ahead of the GPU.

    The distribution is the NBP release's ``top_k_top_p_filtering``: top-k keeps the logits >= the k-th
    largest (every tie at the k-th value); top-p then keeps, by decreasing probability (renormalised over
    the top-k survivors), each token whose predecessors' mass is <= p, i.e. the smallest prefix reaching
    p. Ties at the nucleus edge are all kept (every member of a tie sees the mass strictly ahead of it;
    the release keeps those its unstable sort happens to put first). Nothing is sorted:

    1. the pool (``_top_k_pool``): an unsorted top-k, with every logit equal to the k-th largest (inside
       or outside the k) folded into one "tie bucket" entry of weight n_ties x exp(k-th), so ties are kept
       exactly whatever their number;
    2. the nucleus threshold (``_nucleus_threshold``): the smallest pool value whose mass strictly ahead
       is <= p, found exactly by a 4-pass radix select over the fp32 bit patterns (256-bin histograms of
       the probability mass);
    3. one inverse-CDF draw (fp64) over the pool masked to values >= the threshold; a draw of the tie
       bucket picks one of its n ties uniformly (a second uniform, the j-th tie of the row).

    Cost per call (R rows, V vocabulary, k): one top-k over [R, V]; three elementwise passes over
    [R, V] (tie mask, its int32 cumsum, a search in it); four radix passes and one cumsum over [R, k + 1];
    two fp64 uniforms per row. No pass depends on the data, so the cost is the same for every batch.

    Args:
        logits: float [B, ...rest, V_padded] (any dtype; computed in fp32).
        vocab_size: ids >= this are never sampled.
        sampling: temperature, top-k, top-p (cfg_scale is applied by the caller, :func:`guided_logits`).
        generator: one torch.Generator on the logits' device for the whole batch, or a sequence of B
            generators, one per leading row: row i's ids then depend only on its logits and generator i,
            so a row drawn in a batch equals the row drawn alone with its generator (bitwise, given equal
            logits). None: torch's default generator.

    Returns:
        int64 [B, ...rest] sampled ids.

    Raises:
        ValueError: a generator sequence whose length is not the batch size (logits.shape[0]).
    """
    logits = logits[..., :vocab_size].float()
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    k = sampling.top_k if sampling.top_k is not None and sampling.top_k < vocab_size else None
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1.0 else None
    u = _uniforms(generator, shape, 1 if k is None else 2, flat.device)          # fp64 [R, 1 or 2]
    if k is None:
        values, weights = flat, flat
    else:
        pool = _top_k_pool(flat, k)
        values, weights = pool.values, pool.weights
    probs = weights.softmax(-1)
    if top_p is not None:
        keys = _order_keys(values)
        probs = probs.masked_fill(keys < _nucleus_threshold(keys, probs, top_p), 0.0)
    cdf = probs.double().cumsum(-1)
    position = torch.searchsorted(cdf, u[:, :1] * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    if k is None:
        return position.view(shape)
    return pool.ids_at(position, u[:, 1:]).view(shape)


def _uniforms(generator: Generators, shape: torch.Size, count: int, device: torch.device) -> torch.Tensor:
    """fp64 uniforms [R, count] in [0, 1) for the R = prod(shape) rows of a [B, ...] batch: one draw of
    [R, count] from ``generator``, or with a sequence of B generators one draw of [R / B, count] from each
    (row block i from generator i), so the draws of a row do not depend on the other rows.

    Raises:
        ValueError: a sequence whose length is not B = shape[0]."""
    rows = shape.numel()
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, count, generator=generator, dtype=torch.float64, device=device)
    generators = list(generator)
    if not shape or len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0] if shape else 0} rows "
                         f"(logits of shape {tuple(shape)} + [V]): give one per row")
    per_row = rows // shape[0]
    return torch.cat([torch.rand(per_row, count, generator=g, dtype=torch.float64, device=device)
                      for g in generators])


@dataclass
class _Pool:
    """The top-k survivors of R rows as k + 1 entries each (unsorted): the k largest logits, minus those
    equal to the k-th largest, and a last "tie bucket" entry standing for every logit of the row equal to
    the k-th largest (n_ties of them, n_ties >= 1).

    values: fp32 [R, k + 1], the logit of each entry (-inf for the ties moved to the bucket; the k-th
        largest for the bucket): what the nucleus rule compares.
    weights: fp32 [R, k + 1], the log of each entry's unnormalised probability (the bucket's is
        k-th + log n_ties): what is sampled.
    ids: int64 [R, k], the vocabulary ids of the first k entries.
    ties: int32 [R, V], the running count of logits equal to the k-th largest (ties[:, -1] = n_ties).
    """

    values: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    ties: torch.Tensor

    def ids_at(self, position: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids int64 [R] of pool positions int64 [R, 1]; position k (the tie bucket) gives the
        j-th tie of the row, j = floor(u x n_ties), u fp64 [R, 1] in [0, 1)."""
        k = self.ids.shape[1]
        n_ties = self.ties[:, -1:]
        j = (u * n_ties).long().clamp(max=n_ties.long() - 1) + 1                      # 1 .. n_ties
        tie_id = torch.searchsorted(self.ties, j.to(self.ties.dtype))                 # first count reaching j
        return torch.where(position == k, tie_id, self.ids.gather(1, position.clamp(max=k - 1)))[:, 0]


def _top_k_pool(logits: torch.Tensor, k: int) -> _Pool:
    """The release's top-k survivors of logits fp32 [R, V] (every logit >= the k-th largest, ties
    included: usual with bf16 logits, tens of ties at k = 16000 of 64K) as a :class:`_Pool`, without a
    host read: an unsorted top-k; the k-th largest is its minimum; every logit equal to it, wherever it
    lies in the row, goes to the tie bucket (the pool's distribution is exactly the release's, for any
    number of ties)."""
    values, ids = torch.topk(logits, k, dim=-1, sorted=False)
    kth = -(-values).amax(-1, keepdim=True)              # the minimum (amax: a faster CPU kernel than amin)
    ties = (logits == kth).cumsum(-1, dtype=torch.int32)
    above = values.masked_fill(values <= kth, float("-inf"))
    bucket_weight = kth + ties[:, -1:].float().log()
    return _Pool(torch.cat([above, kth], 1), torch.cat([above, bucket_weight], 1), ids, ties)


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys of fp32 values, in the values' order as signed integers (equal values, -0.0 and +0.0
    included, get equal keys): the sign-magnitude bit pattern made two's-complement."""
    bits = (values + 0.0).view(torch.int32)                               # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


_RADIX_BITS = 8


def _nucleus_threshold(keys: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The order key of the smallest value whose mass strictly ahead is <= top_p, per row: int32 [R, 1].
    keys: int32 [R, W], :func:`_order_keys` of the values; probs: fp32 or fp64 [R, W], each row summing
    to 1.

    The nucleus is every entry with a key >= the result (the release's top-p rule, with all members of
    a tie kept). Radix select over the 32-bit keys, 8 bits a pass (the top byte with its sign bit
    flipped, so that the bytes order as the keys do), without sorting: each pass histograms the mass
    (fp64) of the entries whose key starts with the prefix found so far into 256 bins of the next byte,
    and keeps the lowest bin holding mass whose mass ahead (the mass above the prefix plus that of the
    higher bins) is <= top_p: the largest entry of that bin is then in the nucleus, and no entry of a
    lower bin is. Entries of zero probability are never kept alone (they cannot be drawn)."""
    probs = probs.double()
    rows, device = keys.shape[0], keys.device
    bins = 1 << _RADIX_BITS
    prefix = torch.zeros(rows, 1, dtype=torch.long, device=device)       # the key >> (shift + 8) sought
    ahead = torch.zeros(rows, 1, dtype=torch.float64, device=device)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        digit = (keys >> shift) & (bins - 1)
        if shift == 32 - _RADIX_BITS:
            digit, mass_in = digit ^ (bins >> 1), probs                   # sign bit flipped: bytes in key order
        else:
            mass_in = probs.masked_fill((keys >> (shift + _RADIX_BITS)) != prefix, 0.0)
        mass = torch.zeros(rows, bins, dtype=torch.float64, device=device).scatter_add_(1, digit.long(), mass_in)
        higher = mass.flip(-1).cumsum(-1).flip(-1)[:, 1:]                # mass of the bins above b, b < 255
        ahead_of_bin = ahead + torch.cat([higher, torch.zeros_like(ahead)], 1)
        kept = (mass > 0) & (ahead_of_bin <= top_p)
        chosen = kept.to(torch.uint8).argmax(-1, keepdim=True)          # the lowest such bin
        ahead = ahead_of_bin.gather(1, chosen)
        if shift == 32 - _RADIX_BITS:
            chosen = chosen - (bins >> 1)                                 # back to the signed top byte
        prefix = prefix * bins + chosen
    return prefix.to(torch.int32)


Sampler = Callable[[torch.Tensor, int, SamplingConfig, Generators], torch.Tensor]
"""The signature of :func:`sample_tokens`: (logits float [B, ..., V], vocab_size, sampling, generator: one
torch.Generator, B of them (one per row) or None) -> int64 [B, ...]."""


def guided_logits(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a [2B, ...] batch (conditional rows first, then the null-condition
    rows): ``uncond + scale * (cond - uncond)`` [B, ...], in the logits' dtype; the conditional rows
    alone when ``scale == 1`` (no guidance; the batch may then be just [B, ...])."""
    if scale == 1.0:
        return logits[:batch]
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)
