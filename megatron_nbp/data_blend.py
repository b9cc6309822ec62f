"""Weighted blending of several token-shard folders (Megatron-LM's ``--data-path W1 P1 W2 P2``).

``data_path`` is either ``[DIR]`` (one folder, the same as ``--data DIR``) or ``[W1, DIR1, W2, DIR2, ...]``
with positive weights, normalised to sum to 1. Each folder gets its own per-rank
:class:`~megatron_nbp.data.TokenClipStream` (same seed, same rank split); the blend picks, for each of
this rank's sample positions ``i = 0, 1, ...``, the folder whose realised share lags its target most:
``argmax_d (w_d * (i + 1) - n_d)``, ``n_d`` the samples taken from folder ``d`` so far, ties to the
lower index (the rule of Megatron-LM's ``BlendedDataset`` index builder, without its RNG). The schedule
needs no RNG, so it is the same on every rank and after any resume; after ``i`` samples every folder's
count is within one sample of ``w_d * i``. Each folder's own order is seeded by ``train.seed`` as for
one folder. Resuming from ``consumed`` samples replays the schedule's counts (O(consumed x folders)
arithmetic, no data read) and resumes each folder's stream at its own count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data_prep.shards import Opener
from megatron_nbp.data import TokenClipStream
from megatron_nbp.data_path import parse_data_path

__all__ = ["BlendedStream", "blend_counts", "blend_schedule", "build_token_stream", "parse_data_path"]


def blend_counts(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples taken from each folder in the first ``num_samples`` positions of the blend schedule
    (module docstring); ``weights`` normalised. Used to resume."""
    counts = [0] * len(weights)
    for _ in blend_schedule(weights, counts, num_samples):
        pass
    return counts


def blend_schedule(weights: Sequence[float], counts: list[int], num_samples: int | None = None) -> Iterator[int]:
    """Folder index of each next position of the blend schedule, continuing from ``counts`` (samples
    taken per folder so far; updated in place); endless when ``num_samples`` is None."""
    position = sum(counts)
    stop = None if num_samples is None else position + num_samples
    while stop is None or position < stop:
        position += 1
        lag = [w * position - n for w, n in zip(weights, counts)]
        choice = lag.index(max(lag))
        counts[choice] += 1
        yield choice


class BlendedStream:
    """Endless per-DP-rank stream of clips drawn from several folders by weight (module docstring);
    yields what :class:`~megatron_nbp.data.TokenClipStream` yields: (int64 [N] tokens, condition).

    Args:
        streams: one TokenClipStream per folder, each built with ``consumed`` = that folder's count at
            this stream's ``consumed`` (:func:`blend_counts`; :func:`build_token_stream` does this).
        weights: normalised weights, one per stream.
        consumed: samples this rank has already consumed from the blend (resume position).

    Attributes:
        consumed: samples this rank has consumed so far (what ``micro_batches`` seeds condition dropping with).
        counts: samples taken from each folder so far.
    """

    def __init__(self, streams: Sequence[TokenClipStream], weights: Sequence[float], consumed: int = 0) -> None:
        if len(streams) != len(weights) or not streams:
            raise ValueError(f"{len(streams)} streams and {len(weights)} weights; need one weight per stream")
        self.streams, self.weights = list(streams), [float(w) for w in weights]
        self.consumed = consumed
        self.counts = blend_counts(self.weights, consumed)
        if any(s.consumed != c for s, c in zip(self.streams, self.counts)):
            raise ValueError(f"stream positions {[s.consumed for s in self.streams]} do not match the blend's "
                             f"counts {self.counts} at {consumed} consumed samples")

    def __iter__(self) -> Iterator[tuple[np.ndarray, object]]:
        iterators = [iter(s) for s in self.streams]
        for choice in blend_schedule(self.weights, self.counts):
            self.consumed += 1
            yield next(iterators[choice])


def build_token_stream(folders: Sequence[tuple[float, str | Path]], dp_rank: int, dp_size: int, seed: int,
                       latent_shape: tuple[int, int, int], vocab_size: int, shuffle_buffer: int = 256,
                       consumed: int = 0, condition_key: str = "label",
                       opener: Opener = open) -> TokenClipStream | BlendedStream:
    """This rank's training stream over ``folders`` (``[(weight, dir)]`` from :func:`parse_data_path`):
    a plain :class:`TokenClipStream` for one folder, else a :class:`BlendedStream`; ``consumed`` is this
    rank's resume position. Arguments as for TokenClipStream.

    Raises:
        DataError, FileNotFoundError, ShardFormatError: as TokenClipStream, for any folder.
    """
    if len(folders) == 1:
        return TokenClipStream(folders[0][1], dp_rank, dp_size, seed, latent_shape, vocab_size, shuffle_buffer,
                               consumed=consumed, condition_key=condition_key, opener=opener)
    weights = [w for w, _ in folders]
    counts = blend_counts(weights, consumed)
    streams = [TokenClipStream(folder, dp_rank, dp_size, seed, latent_shape, vocab_size, shuffle_buffer,
                               consumed=count, condition_key=condition_key, opener=opener)
               for (_, folder), count in zip(folders, counts)]
    return BlendedStream(streams, weights, consumed)
