"""Training data: a deterministic, resumable stream of tokenised clips for one data-parallel rank.

Reads the WebDataset token shards written by the offline tokenization job (format defined in
:mod:`data_prep.shards`). Order of one epoch, identical on every rank:

1. the manifest's shards, permuted with ``seed + epoch``;
2. their samples streamed in order through a seeded shuffle buffer;
3. position p of that global stream goes to data-parallel rank ``p % dp_size``; the epoch is cut to
   a multiple of ``dp_size`` so every rank sees the same number of samples.

Tensor- and pipeline-parallel partners share a data-parallel rank and so read identical samples
(webdataset's ``split_by_node`` would split by *global* rank under torchrun; FACTS.md). Every rank
reads every shard: token shards are small next to the compute they feed, and it keeps the split exact.
Resuming skips the samples already consumed (stored in the checkpoint), so a resumed run sees exactly
the samples an uninterrupted run would have.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_prep.shards import iter_shard, read_manifest
from megatron_nbp.config import ModelConfig
from megatron_nbp.layouts import LayoutBatch, frame_prediction_batch, hybrid_batch


class DataError(ValueError):
    """The token data does not match the model (latent shape, vocabulary) or is empty."""


def check_manifest(data_dir: str | Path, model: ModelConfig, tokenizer_sha256: str | None = None) -> dict:
    """Refuse token shards that the model cannot train on; called before the model is built.

    Checks what ``data_dir/manifest.json`` declares against the model config: the latent shape
    ``(T', H', W')`` (which fixes the clip geometry: frames and resolution; images are ``T' = 1``), the
    tokenizer codebook against ``model.vocab_size``, the tokenizer checkpoint's SHA-256 against
    ``tokenizer_sha256`` (config ``train.tokenizer_sha256``; ``None`` skips that check), and, for the
    class-conditional hybrid layout, that every clip label the manifest lists is in ``model.condition_labels``.

    Args:
        data_dir: directory with ``manifest.json`` and the shards.
        model: the model config.
        tokenizer_sha256: expected hex SHA-256 of the tokenizer checkpoint file (64 hex digits; as
            printed by ``sha256sum TOKENIZER.safetensors`` and stored in the manifest's ``tokenizer.sha256``).
    Returns:
        The manifest (dict).
    Raises:
        FileNotFoundError: no manifest (tokenization job not finished).
        data_prep.shards.ShardFormatError: invalid manifest or a listed shard missing.
        DataError: any mismatch; the message names the manifest, the manifest's value and the model's.
    """
    manifest = read_manifest(data_dir)
    where = Path(data_dir) / "manifest.json"
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
    if model.layout == "hybrid" and model.condition_type == "class" and manifest.get("labels"):
        unknown = sorted(set(manifest["labels"]) - set(model.condition_labels or []))
        if unknown:
            raise DataError(f"{where}: clip labels {unknown[:10]}{' ...' if len(unknown) > 10 else ''} are not in "
                            f"model.condition_labels ({len(model.condition_labels or [])} classes)")
    return manifest


class TokenClipStream:
    """Endless per-DP-rank stream of clips: (int64 [N] video tokens (N = T'*H'*W'), condition), where
    the condition is the clip metadata's ``condition_key`` entry (the class label string, or a list of
    text ids written by the user's text tokenizer) or None.

    Args:
        data_dir: directory with ``manifest.json`` and the shards.
        dp_rank, dp_size: this rank's data-parallel position.
        seed: data order seed (the same on all ranks).
        latent_shape: expected (T', H', W') of every clip; a mismatch is refused.
        vocab_size: ids must be below it.
        shuffle_buffer: samples held by the shuffle buffer (1 = no shuffling within shards).
        consumed: samples this rank has already consumed (resume position).
        condition_key: metadata key read as the condition ("label" or "text_ids").

    Raises:
        DataError: manifest latent shape or codebook not compatible with the model, or no samples.
    """

    def __init__(self, data_dir: str | Path, dp_rank: int, dp_size: int, seed: int,
                 latent_shape: tuple[int, int, int], vocab_size: int, shuffle_buffer: int = 256,
                 consumed: int = 0, condition_key: str = "label") -> None:
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        tok = self.manifest["tokenizer"]
        if tuple(tok["latent_shape"]) != tuple(latent_shape):
            raise DataError(
                f"shards in {self.data_dir} have latent shape {tuple(tok['latent_shape'])}, "
                f"the model expects {tuple(latent_shape)}"
            )
        if int(tok["codebook_size"]) > vocab_size:
            raise DataError(f"tokenizer codebook {tok['codebook_size']} exceeds model vocab_size {vocab_size}")
        self.shards = [self.data_dir / s["name"] for s in self.manifest["shards"] if s["num_samples"] > 0]
        self.samples_per_rank = int(self.manifest["num_samples"]) // dp_size
        if self.samples_per_rank == 0:
            raise DataError(
                f"{self.manifest['num_samples']} samples in {self.data_dir} cannot feed {dp_size} data-parallel ranks"
            )
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.latent_shape, self.vocab_size = tuple(latent_shape), vocab_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.consumed = consumed
        self.condition_key = condition_key

    def _epoch_stream(self, epoch: int) -> Iterator[tuple[np.ndarray, str | None]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        shards = list(self.shards)
        rng.shuffle(shards)
        buffer: list[np.ndarray] = []
        for shard in shards:
            for key, tokens, meta in iter_shard(shard):
                if tokens.shape != self.latent_shape:
                    raise DataError(f"{shard}:{key} has latent shape {tokens.shape}, expected {self.latent_shape}")
                buffer.append((tokens, meta.get(self.condition_key)))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[np.ndarray, str | None]]:
        while True:
            epoch, offset = divmod(self.consumed, self.samples_per_rank)
            limit = self.samples_per_rank * self.dp_size
            mine = 0
            for position, (tokens, label) in enumerate(self._epoch_stream(epoch)):
                if position >= limit:
                    break
                if position % self.dp_size != self.dp_rank:
                    continue
                mine += 1
                if mine <= offset:
                    continue
                self.consumed += 1
                flat = tokens.reshape(-1).astype(np.int64)
                if flat.max(initial=0) >= self.vocab_size:
                    raise DataError(f"token id {flat.max()} >= vocab_size {self.vocab_size}")
                yield flat, label


def condition_key(model: ModelConfig) -> str:
    """Metadata key of the condition for ``model``: "text_ids" for text conditioning, else "label"."""
    return "text_ids" if model.layout == "hybrid" and model.condition_type == "text" else "label"


def pad_text_ids(texts: list[list[int]], length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or truncate, as the NBP release's tokenizer call does) text ids to ``length``.

    Returns:
        (int64 [B, length] ids (0 at padding), bool [B, length] True at padding).

    Raises:
        DataError: a text that is not a list of ints in [0, vocab_size).
    """
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    padding = torch.ones(len(texts), length, dtype=torch.bool)
    for row, text in enumerate(texts):
        if not isinstance(text, list) or not all(isinstance(x, int) and 0 <= x < vocab_size for x in text):
            raise DataError(f"text_ids must be a list of ints in [0, {vocab_size}); got {str(text)[:80]}")
        text = text[:length]
        ids[row, :len(text)] = torch.tensor(text, dtype=torch.long)
        padding[row, :len(text)] = False
    return ids, padding


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


def micro_batches(stream: TokenClipStream, micro_batch_size: int, model: ModelConfig,
                  p_drop_cond: float = 0.0, seed: int = 0) -> Iterator[LayoutBatch]:
    """Group the stream into micro-batches in the model's layout (LayoutBatch, tensors [mbs, S]).

    With ``p_drop_cond`` > 0 (hybrid, ``model.null_condition``) each sample's condition becomes the null
    condition with that probability. The draw is seeded by (seed, samples consumed): identical on the
    tensor/pipeline partners of a data-parallel rank (their masks must agree) and after a resume.

    Raises:
        DataError: hybrid class layout and a clip whose label is not one of ``model.condition_labels``;
            hybrid text layout and a clip without valid ``text_ids``.
    """
    class_ids = {name: i for i, name in enumerate(model.condition_labels or [])}
    text = model.layout == "hybrid" and model.condition_type == "text"
    clips, conditions = [], []
    for clip, condition in stream:
        if model.layout == "hybrid" and not text:
            if condition not in class_ids:
                raise DataError(f"clip label {condition!r} is not in model.condition_labels {list(class_ids)}")
            condition = class_ids[condition]
        clips.append(clip)
        conditions.append(condition)
        if len(clips) == micro_batch_size:
            video = torch.from_numpy(np.stack(clips))
            if model.layout == "hybrid":
                if text:
                    ids, padding = pad_text_ids(conditions, model.num_condition_tokens, model.condition_vocab_size)
                else:
                    ids, padding = torch.tensor(conditions).view(-1, 1), torch.zeros(len(conditions), 1, dtype=torch.bool)
                if p_drop_cond > 0:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + stream.consumed)
                    drop = torch.rand(len(conditions), generator=g) < p_drop_cond
                    ids, padding = drop_conditions(ids, padding, drop, model.null_condition_id)
                yield hybrid_batch(video, ids, model.block_size, model.condition_vocab_size, padding,
                                   model.latent_shape, model.block_shape)
            else:
                yield frame_prediction_batch(video, model.block_size, model.latent_shape, model.block_shape)
            clips, conditions = [], []
