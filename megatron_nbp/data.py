"""Training data: a deterministic, resumable stream of tokenised clips for one data-parallel rank.

Reads the WebDataset token shards written by the offline tokenization job (format defined in
:mod:`data_prep.shards`). Each data-parallel rank reads only its share of the data:

1. epoch ``e``'s global order is the manifest's shards permuted with ``seed + e``, each shard's samples
   in stored order: ``num_samples`` positions;
2. rank ``r`` of ``D`` owns the positions ``[r * n, (r + 1) * n)`` of that order, ``n = num_samples // D``
   (the same ``n`` on every rank whatever the shard sizes; the last ``num_samples % D < D`` positions of
   the epoch are left out, different samples each epoch);
3. its pieces (whole shards, and at most two partial ones at the ends of its range) are read in a
   rank-and-epoch-seeded order, through a seeded shuffle buffer; a partial shard is read by seeking to
   the sidecar's byte offset of its first sample (:func:`data_prep.shards.iter_shard_readable`), so a
   rank reads about ``1 / D`` of the dataset's bytes per epoch (plus the sidecars of the shards it touches).

Tensor- and pipeline-parallel partners share a data-parallel rank and so read identical samples
(webdataset 1.0.2's ``split_by_node`` splits by *global* rank under torchrun, which would give TP / PP
partners different samples). The ranks of an epoch are disjoint and together cover it. Resuming skips
the samples already consumed (stored in the checkpoint), so a resumed run sees exactly the samples an
uninterrupted run would have.

Start-up reads the manifest and, for each listed shard, only its size (``stat``); no shard's bytes.

Damaged shards never stop a run, never cost good data, and never change the per-rank sample count:

* at start-up, a missing shard, and a truncated one (smaller than the manifest's ``bytes``; its
  complete leading samples, known from the sidecar's offsets, are kept) are REPORTED: one ``logging``
  warning per shard, the same text on every rank, naming the shard, its usable vs listed sample count
  and the problem; the epoch length counts only their usable samples, so nothing is repeated for them;
* damage only reading shows (a corrupt sample or tar header, samples with the wrong latent shape or
  ids outside the codebook, a shard damaged after start-up) is REPORTED by the rank that meets it, in
  the epoch it meets it (once per shard); the readable samples are used, the lost ones are replaced by
  repeating that rank's readable samples of the epoch from its start, so every rank still yields
  exactly ``samples_per_rank`` per epoch and resume stays exact. The records are in
  ``TokenClipStream.damaged_shards``.
* a rank whose whole share of an epoch is unreadable fills it from the whole epoch's order (the same
  on every rank); no readable sample in the whole epoch is a DataError.

No usable sample at all at start-up is a DataError.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from data_prep.shards import (Opener, ShardFormatError, complete_samples, iter_shard_readable,
                              read_manifest, read_sidecar)
from megatron_nbp.config import ModelConfig
from megatron_nbp.layouts import LayoutBatch
from megatron_nbp.layouts.hybrid import pad_text_ids as _pad_text_ids

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The token data does not match the model (latent shape, vocabulary) or is empty."""


def check_manifest(data_dir: str | Path, model: ModelConfig, tokenizer_sha256: str | None = None) -> dict:
    """Refuse token shards that the model cannot train on; called before the model is built.

    Checks what ``data_dir/manifest.json`` declares against the model config: the latent shape
    ``(T', H', W')`` (which fixes the clip geometry: frames and resolution; images are ``T' = 1``), the
    tokenizer codebook against ``model.vocab_size``, the tokenizer checkpoint's SHA-256 against
    ``tokenizer_sha256`` (config ``train.tokenizer_sha256``; ``None`` skips that check), and what the model's
    token layout requires of it (``TokenLayout.manifest_problems``: for the class-conditional hybrid layout,
    that every clip label the manifest lists is in ``model.condition_labels``).
    A listed shard that is missing is NOT refused here (the training stream reports and skips it, see
    :class:`TokenClipStream`); only a manifest none of whose shards with samples exists is.

    Args:
        data_dir: directory with ``manifest.json`` and the shards.
        model: the model config.
        tokenizer_sha256: expected hex SHA-256 of the tokenizer checkpoint file (64 hex digits; as
            printed by ``sha256sum TOKENIZER.safetensors`` and stored in the manifest's ``tokenizer.sha256``).
    Returns:
        The manifest (dict).
    Raises:
        FileNotFoundError: no manifest (tokenization job not finished).
        data_prep.shards.ShardFormatError: invalid manifest.
        DataError: any mismatch; the message names the manifest, the manifest's value and the model's;
            or every listed shard with samples is missing.
    """
    manifest = read_manifest(data_dir, require_shards=False)
    where = Path(data_dir) / "manifest.json"
    listed = [s["name"] for s in manifest["shards"] if int(s["num_samples"]) > 0]
    if listed and not any((Path(data_dir) / name).is_file() for name in listed):
        raise DataError(f"{where}: none of the {len(listed)} shards it lists exists in {data_dir} "
                        f"(e.g. {listed[0]}); was the data directory moved or only partly copied?")
    tok = manifest["tokenizer"]
    if tuple(tok["latent_shape"]) != tuple(model.latent_shape):
        clip = manifest.get("clip", {})
        raise DataError(
            f"{where}: shards have latent shape {tuple(tok['latent_shape'])} (clips of {clip.get('num_frames')} "
            f"frames at {clip.get('resolution')} px, media {manifest.get('media', 'video')!r}); the model expects "
            f"model.latent_shape {tuple(model.latent_shape)}"
        )
    if int(tok["codebook_size"]) > model.vocab_size:
        raise DataError(f"{where}: tokenizer codebook {tok['codebook_size']} (FSQ levels {tok.get('levels')}) "
                        f"exceeds model.vocab_size {model.vocab_size}")
    if tokenizer_sha256 is not None and str(tok["sha256"]).lower() != str(tokenizer_sha256).strip().lower():
        raise DataError(
            f"{where}: shards were made by tokenizer {tok.get('path')} with sha256 {tok['sha256']}, but "
            f"train.tokenizer_sha256 is {tokenizer_sha256}; retokenize with the right tokenizer or fix the config"
        )
    problems = model.token_layout.manifest_problems(manifest)
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))
    return manifest


class TokenClipStream:
    """Endless per-DP-rank stream of clips: (int64 [N] video tokens (N = T'*H'*W'), condition), where
    the condition is the clip metadata's ``condition_key`` entry (the class label string, or a list of
    text ids written by the user's text tokenizer) or None.

    Reads only this rank's share of each epoch (module docstring); start-up reads the manifest and the
    shards' sizes, not their bytes. Damaged data (module docstring, "Damaged shards"): a missing or
    truncated shard is reported at start-up and only its usable samples are counted; damage met while
    reading is reported then (a ``logging`` warning, once per shard, naming the shard, its readable vs
    listed sample count and the first error) and recorded in :attr:`damaged_shards`; the lost samples'
    places are filled by repeating this rank's readable samples of the epoch, so every rank yields the
    same count per epoch and resume stays exact.

    Args:
        data_dir: directory with ``manifest.json`` and the shards.
        dp_rank, dp_size: this rank's data-parallel position.
        seed: data order seed (the same on all ranks).
        latent_shape: expected (T', H', W') of every clip; a manifest mismatch is refused, a sample
            with another shape is damage (reported and skipped).
        vocab_size: ids must be below it (the manifest's codebook must fit; a sample with an id outside
            the codebook is damage, reported and skipped).
        shuffle_buffer: samples held by the shuffle buffer (1 = no shuffling within shards).
        consumed: samples this rank has already consumed (resume position).
        condition_key: metadata key read as the condition ("label" or "text_ids").
        opener: ``open``-like callable every shard and sidecar is read through (``bench/data_stream.py``
            counts bytes with it).

    Attributes:
        shards: the shards with usable samples (paths, manifest order).
        shard_samples: usable samples per shard (path -> int): the manifest's count, or for a shard
            found truncated at start-up its complete leading samples.
        num_samples: usable samples in all (one epoch of the global order).
        samples_per_rank: samples each rank gets per epoch (``num_samples // dp_size``).
        damaged_shards: one dict per damaged shard: ``{"shard": file name, "path": str, "readable": int,
            "expected": int (the samples of the shard, or of the part of it this rank read), "skipped": int,
            "error": str (the first problem), "errors": [str], "found": "at startup" | "in epoch E"}``.

    Raises:
        DataError: manifest latent shape or codebook not compatible with the model, no usable sample
            in any shard, or fewer usable samples than ``dp_size``.
        FileNotFoundError: no manifest. data_prep.shards.ShardFormatError: an invalid manifest.
    """

    def __init__(self, data_dir: str | Path, dp_rank: int, dp_size: int, seed: int,
                 latent_shape: tuple[int, int, int], vocab_size: int, shuffle_buffer: int = 256,
                 consumed: int = 0, condition_key: str = "label", opener: Opener = open) -> None:
        self.data_dir = Path(data_dir)
        self.opener = opener
        self.manifest = read_manifest(self.data_dir, require_shards=False, opener=opener)  # missing: reported below
        tok = self.manifest["tokenizer"]
        if tuple(tok["latent_shape"]) != tuple(latent_shape):
            raise DataError(
                f"shards in {self.data_dir} have latent shape {tuple(tok['latent_shape'])}, "
                f"the model expects {tuple(latent_shape)}"
            )
        if int(tok["codebook_size"]) > vocab_size:
            raise DataError(f"tokenizer codebook {tok['codebook_size']} exceeds model vocab_size {vocab_size}")
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.latent_shape, self.vocab_size = tuple(latent_shape), vocab_size
        self.codebook_size = int(tok["codebook_size"])
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.consumed = consumed
        self.condition_key = condition_key
        self.damaged_shards: list[dict] = []
        self._reported: set[str] = set()
        self._refill_reported = False
        self._listed: dict[Path, int] = {}
        self.shard_samples: dict[Path, int] = {}
        for entry in self.manifest["shards"]:
            if int(entry["num_samples"]) <= 0:
                continue
            path = self.data_dir / entry["name"]
            self._listed[path] = int(entry["num_samples"])
            usable = self._startup_check(path, entry)
            if usable:
                self.shard_samples[path] = usable
        self.shards = list(self.shard_samples)
        self.num_samples = sum(self.shard_samples.values())
        if self.num_samples == 0:
            first = f"; first problem: {self.damaged_shards[0]['error']}" if self.damaged_shards else ""
            raise DataError(
                f"no readable token samples in {self.data_dir}: its manifest lists {self.manifest['num_samples']} "
                f"samples in {len(self._listed)} shards, and {len(self.damaged_shards)} of those shards are "
                f"missing or damaged beyond use{first}"
            )
        self.samples_per_rank = self.num_samples // dp_size
        if self.samples_per_rank == 0:
            raise DataError(
                f"{self.num_samples} readable samples in {self.data_dir} cannot feed {dp_size} data-parallel ranks"
            )

    def _startup_check(self, path: Path, entry: dict) -> int:
        """Usable samples of a listed shard from its size alone (the sidecar only if it is truncated):
        0 if missing, the complete leading samples if smaller than the manifest's ``bytes``, else the
        manifest's count. Missing and truncated shards are reported."""
        listed = self._listed[path]
        try:
            size = path.stat().st_size
        except OSError as exc:
            self._report(path, 0, [f"{path}: shard cannot be opened: {exc}"], "at startup", listed)
            return 0
        expected_size = entry.get("bytes")
        if expected_size is None or size >= expected_size:
            return listed  # damage that leaves the size alone is found when read
        problems: list[str] = []
        usable = 0
        try:
            side = read_sidecar(path, self.opener)
            offsets = side.get("offsets") if side else None
            usable = complete_samples(offsets, size) if offsets else listed
            if not offsets:
                problems.append(f"{path}: its sidecar has no sample offsets; the readable samples are found when read")
        except (ShardFormatError, OSError) as exc:
            problems.append(f"{path}: sidecar unreadable: {exc}")
        problems.insert(0, f"{path}: truncated or corrupt tar: {size} of the manifest's {expected_size} bytes, "
                           f"{usable} whole samples")
        self._report(path, usable, problems, "at startup", listed)
        return usable

    def _report(self, path: Path, readable: int, problems: list[str], found: str, expected: int) -> None:
        """Record a damaged shard in :attr:`damaged_shards` and log one warning for it."""
        error = problems[0] if problems else f"{readable} readable samples, {expected} expected"
        self.damaged_shards.append({
            "shard": path.name, "path": str(path), "readable": readable, "expected": expected,
            "skipped": max(expected - readable, 0), "error": error, "errors": list(problems), "found": found,
        })
        self._reported.add(path.name)
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        part = "" if expected == self._listed[path] else f" (its part read by data-parallel rank {self.dp_rank})"
        log.warning("damaged token shard %s (found %s): %d of the %d samples the manifest lists%s are readable "
                    "and used, the rest is skipped; %s%s", path, found, readable, expected, part, error, more)

    def _readable(self, path: Path, problems: list[str], start: int = 0,
                  stop: int | None = None) -> Iterator[tuple[str, np.ndarray, dict]]:
        """The usable samples at positions ``[start, stop)`` of a shard: ``(key, uint16 [T', H', W'],
        meta)``; damage goes to ``problems``."""
        for key, tokens, meta in iter_shard_readable(path, problems, start=start, stop=stop, opener=self.opener):
            if tokens.shape != self.latent_shape:
                problems.append(f"{path}: sample {key!r} has latent shape {tokens.shape}, expected "
                                f"{self.latent_shape}; skipped")
            elif tokens.size and int(tokens.max()) >= self.codebook_size:
                problems.append(f"{path}: sample {key!r} has token id {int(tokens.max())} outside the codebook "
                                f"({self.codebook_size}); skipped")
            else:
                yield key, tokens, meta

    def epoch_pieces(self, epoch: int, lo: int, hi: int) -> list[tuple[Path, int, int]]:
        """The shard pieces ``(shard, start, stop)`` holding positions ``[lo, hi)`` of epoch ``epoch``'s
        global order (the shards permuted with ``seed`` and ``epoch``, each in stored order)."""
        shards = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        pieces, position = [], 0
        for shard in shards:
            n = self.shard_samples[shard]
            start, stop = max(lo, position), min(hi, position + n)
            if start < stop:
                pieces.append((shard, start - position, stop - position))
            position += n
            if position >= hi:
                break
        return pieces

    def _epoch_stream(self, epoch: int, whole: bool = False) -> Iterator[tuple[np.ndarray, str | None]]:
        """This rank's share of one epoch (``whole``: the whole epoch, in the same order on every rank):
        (uint16 [T', H', W'], condition), each readable sample of it once."""
        rank = -1 if whole else self.dp_rank
        rng = random.Random((self.seed * 1_000_003 + epoch) * 65_537 + rank)
        n = self.samples_per_rank
        pieces = self.epoch_pieces(epoch, 0, n * self.dp_size) if whole else \
            self.epoch_pieces(epoch, self.dp_rank * n, (self.dp_rank + 1) * n)
        rng.shuffle(pieces)
        buffer: list[tuple[np.ndarray, str | None]] = []
        for shard, start, stop in pieces:
            problems: list[str] = []
            count = 0
            for _key, tokens, meta in self._readable(shard, problems, start, stop):
                count += 1
                buffer.append((tokens, meta.get(self.condition_key)))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            if (problems or count != stop - start) and shard.name not in self._reported:
                self._report(shard, count, problems, f"in epoch {epoch}", stop - start)
        rng.shuffle(buffer)
        yield from buffer

    def _filled_epoch(self, epoch: int, limit: int) -> Iterator[tuple[np.ndarray, str | None]]:
        """Exactly ``limit`` samples of this rank's share of epoch ``epoch``: its stream, repeated from its
        start where damage met while reading made it short; a share with no readable sample is filled
        from the whole epoch's stream instead.

        Raises:
            DataError: the whole epoch has no readable sample.
        """
        produced, whole = 0, False
        while produced < limit:
            length = 0
            for item in self._epoch_stream(epoch, whole):
                if produced >= limit:
                    return
                yield item
                produced += 1
                length += 1
            if length == 0:
                if whole:
                    raise DataError(f"no readable token samples left in {self.data_dir} in epoch {epoch} "
                                    f"(damaged since the stream was built: {self.damaged_shards[-1:]})")
                whole = True
                log.warning("token data in %s: data-parallel rank %d has no readable sample in its share of "
                            "epoch %d; it is filled from the whole epoch's samples", self.data_dir,
                            self.dp_rank, epoch)
            elif produced < limit and not self._refill_reported:
                self._refill_reported = True
                log.warning("token data in %s: data-parallel rank %d has %d readable samples in its share of "
                            "epoch %d, fewer than the %d counted at startup; the share is filled by repeating "
                            "its stream from the start", self.data_dir, self.dp_rank, length, epoch, limit)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str | None]]:
        while True:
            epoch, offset = divmod(self.consumed, self.samples_per_rank)
            for position, (tokens, label) in enumerate(self._filled_epoch(epoch, self.samples_per_rank)):
                if position < offset:
                    continue
                self.consumed += 1
                yield tokens.reshape(-1).astype(np.int64), label


def condition_key(model: ModelConfig) -> str:
    """Metadata key of the condition for ``model`` (``TokenLayout.condition_key``): "text_ids" for text
    conditioning, else "label" (read, and ignored, by a layout without a condition)."""
    return model.token_layout.condition_key or "label"


def pad_text_ids(texts: list[list[int]], length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or truncate, as the NBP release's tokenizer call does) text ids to ``length``.

    Returns:
        (int64 [B, length] ids (0 at padding), bool [B, length] True at padding).

    Raises:
        DataError: a text that is not a list of ints in [0, vocab_size).
    """
    try:
        return _pad_text_ids(texts, length, vocab_size)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def drop_conditions(ids: torch.Tensor, padding: torch.Tensor, drop: torch.Tensor,
                    null_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the conditions of the samples in ``drop`` (bool [B]) by the null condition: every one of
    their P positions becomes ``null_id``, none padded. ids int64 [B, P], padding bool [B, P].

    Raises:
        ValueError: dropping without a null condition id.
    """
    if null_id is None:
        raise ValueError("dropping conditions needs model.null_condition: true")
    ids = torch.where(drop[:, None], torch.full_like(ids, null_id), ids)
    padding = padding & ~drop[:, None]
    return ids, padding


class ClipStream(Protocol):
    """What :func:`micro_batches` reads: yields ``(int64 [N] tokens, condition)`` and counts ``consumed``
    samples (:class:`TokenClipStream`, :class:`megatron_nbp.data_blend.BlendedStream`)."""

    consumed: int

    def __iter__(self) -> Iterator[tuple[np.ndarray, object]]: ...


def micro_batches(stream: ClipStream, micro_batch_size: int, model: ModelConfig,
                  p_drop_cond: float = 0.0, seed: int = 0) -> Iterator[LayoutBatch]:
    """Group the stream into micro-batches in the model's layout (LayoutBatch, tensors [mbs, S]).

    With ``p_drop_cond`` > 0 (hybrid, ``model.null_condition``) each sample's condition becomes the null
    condition with that probability. The draw is seeded by (seed, samples consumed): identical on the
    tensor/pipeline partners of a data-parallel rank (their masks must agree) and after a resume.

    The conditions and the batch come from the model's token layout (``TokenLayout.sample_condition``,
    ``condition_batch`` and ``batch``).

    Raises:
        DataError: hybrid class layout and a clip whose label is not one of ``model.condition_labels``;
            hybrid text layout and a clip without valid ``text_ids``.
    """
    layout = model.token_layout
    clips, conditions = [], []
    for clip, condition in stream:
        try:
            condition = layout.sample_condition(condition)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        clips.append(clip)
        conditions.append(condition)
        if len(clips) == micro_batch_size:
            video = torch.from_numpy(np.stack(clips))
            try:
                condition_batch = layout.condition_batch(conditions)
            except ValueError as exc:
                raise DataError(str(exc)) from None
            if condition_batch is None:
                yield layout.batch(video)
            else:
                ids, padding = condition_batch
                if p_drop_cond > 0:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + stream.consumed)
                    drop = torch.rand(len(conditions), generator=g) < p_drop_cond
                    ids, padding = drop_conditions(ids, padding, drop, layout.null_condition_id)
                yield layout.batch(video, ids, padding)
            clips, conditions = [], []
