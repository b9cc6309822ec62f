"""Class- or text-conditional hybrid layout (UCF-101), P condition tokens, ids as in the official NBP
release (special ids 0..L-1 with BOV = 0 and MBOS_i = i, then the condition vocabulary, then the video
codes)::

    sequence  = [c_1..c_P, BOV, z_0 .. z_{L-2}, z_{L-1}, MBOS_1..MBOS_{L-1}, z_L, ..., z_{N-L-1}]
    block ids =  0 ... 0,   1,   2 ..    L,     L+1 ...                L+1,  L+2 (one per block) ...
    labels    = (cut)     z_0, z_1 .. z_{L-1},  z_L ..          z_{2L-1}, ...  z_{N-1}

The condition block is bidirectional and seen by everything after it; BOV and the first block's
tokens are causal singletons (the first block is generated token by token); the block
``[z_{L-1}, MBOS_1..]`` predicts block 1; from then on block r predicts block r + 1. Loss only on
the N video targets. Generation: L + (N/L - 1) forward passes (16 + 79 = 95 for 5x16x16, L = 16).
Text conditions are padded to P; padded positions are masked as keys (``key_padding``).

Video token k is in block order (megatron_nbp.layouts.order). Positions: ``position_ids`` count
0 .. S-1 (the model's condition table below P, the video-stream table at position - P). 3D RoPE
coordinates ``grid_position_ids`` (megatron's multimodal rotary embedding, Qwen2-VL's convention for
non-video tokens)::

    condition token p          (p, p, p)
    BOV                        (P, P, P)
    video token z_k            (P + 1 + t_k, P + 1 + h_k, P + 1 + w_k)
    MBOS_j                     the coordinates of z_j: the block [z_{L-1}, MBOS_1..] stands where block 0
                               stands in the steady state (block r at block r's coordinates predicts r+1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from megatron_nbp.layouts.base import TokenLayout
from megatron_nbp.layouts.batch import LayoutBatch
from megatron_nbp.layouts.order import video_order
from megatron_nbp.layouts.plan import DecodeStep, GenerationPlan

BOV = 0
"""Model id of the begin-of-video token; MBOS_i is i (1 <= i < L)."""


def hybrid_grid_positions(num_condition: int, latent_shape: tuple[int, int, int],
                          block_shape: tuple[int, int, int]) -> torch.Tensor:
    """3D RoPE coordinates of the P + N hybrid inputs (module docstring): int64 [3, P + N]."""
    n, L = math.prod(latent_shape), math.prod(block_shape)
    return _hybrid_grid(num_condition, video_order(n, L, latent_shape, block_shape)[1], L)


def _hybrid_grid(P: int, video_grid: torch.Tensor, L: int) -> torch.Tensor:
    video = video_grid + (P + 1)
    prefix = torch.arange(P + 1).expand(3, P + 1)                     # condition tokens and BOV
    return torch.cat([prefix, video[:, :L], video[:, 1:L], video[:, L:-L]], dim=1)


def hybrid_block_ids(num_condition: int, num_video: int, block_size: int) -> torch.Tensor:
    """Block id of each of the P + N input positions of the hybrid layout: int64 [P + N]."""
    P, N, L = num_condition, num_video, block_size
    ids = torch.empty(P + N, dtype=torch.long)
    ids[:P] = 0
    ids[P:P + L] = torch.arange(1, L + 1)              # BOV, z_0 .. z_{L-2}: singletons
    rest = torch.arange(N - L) // L + (L + 1)           # [z_{L-1}, MBOS..] then one id per block
    ids[P + L:] = rest
    return ids


def sequence_padding(condition_padding: torch.Tensor | None, num_video: int) -> torch.Tensor | None:
    """Key padding of whole hybrid sequences: bool [B, P] condition padding -> bool [B, P + N] (video
    positions never padded) on the condition padding's device, or None when nothing is padded."""
    if condition_padding is None or not bool(condition_padding.any()):
        return None
    batch = condition_padding.shape[0]
    video = torch.zeros(batch, num_video, dtype=torch.bool, device=condition_padding.device)
    return torch.cat([condition_padding.bool(), video], dim=1)


def hybrid_batch(video_tokens: torch.Tensor, condition: torch.Tensor, block_size: int,
                 condition_vocab_size: int, condition_padding: torch.Tensor | None = None,
                 latent_shape: tuple[int, int, int] | None = None,
                 block_shape: tuple[int, int, int] | None = None) -> LayoutBatch:
    """Class- or text-conditional hybrid layout of a batch (model ids, see the module docstring).

    Args:
        video_tokens: int [B, N] video codes (0 .. codebook-1), flattened (t, h, w).
        condition: int [B, P] condition ids (0 .. condition_vocab_size-1): [B, 1] class labels, or
            text ids padded to P (the ids at padded positions are ignored).
        block_size: L; must divide N, N >= 2L.
        condition_vocab_size: C, number of condition ids (video ids are shifted by L + C).
        condition_padding: bool [B, P], True at padded condition positions (masked as keys).
        latent_shape: (T', H', W') for the 3D RoPE coordinates (default (1, 1, N)).
        block_shape: (bt, bh, bw) with product L: block-major reordering (default: input order).

    Returns:
        LayoutBatch with S = P + N; loss_mask is 0 on the P condition positions; ``key_padding`` set
        when ``condition_padding`` has any True.

    Raises:
        ValueError: shapes that do not fit, or a (non-padded) condition id outside [0, C).
    """
    if video_tokens.dim() != 2 or condition.dim() != 2 or video_tokens.shape[0] != condition.shape[0]:
        raise ValueError(f"need video [B, N] and condition [B, P], got {tuple(video_tokens.shape)} and "
                         f"{tuple(condition.shape)}")
    batch, n = video_tokens.shape
    p, L = condition.shape[1], block_size
    if L < 1 or n % L or n < 2 * L:
        raise ValueError(f"block size {L} must divide the clip length {n} at least twice")
    order, grid = video_order(n, L, latent_shape, block_shape)
    if order is not None:
        video_tokens = video_tokens[:, order]
    if condition_padding is not None:
        if condition_padding.shape != condition.shape:
            raise ValueError(f"condition_padding {tuple(condition_padding.shape)} must match condition "
                             f"{tuple(condition.shape)}")
        condition = condition.masked_fill(condition_padding, 0)
    if condition.numel() and (condition.min() < 0 or condition.max() >= condition_vocab_size):
        raise ValueError(f"condition ids must be in [0, {condition_vocab_size}), got {condition.tolist()}")
    video = video_tokens.long() + L + condition_vocab_size
    specials = torch.arange(L).expand(batch, L)          # BOV = 0, MBOS_i = i
    tokens = torch.cat([
        condition.long() + L,                             # c_1 .. c_P
        specials[:, :1],                                  # BOV
        video[:, :L],                                     # z_0 .. z_{L-1}
        specials[:, 1:],                                  # MBOS_1 .. MBOS_{L-1}
        video[:, L:n - L],                                # z_L .. z_{N-L-1}
    ], dim=1)
    seq = p + n
    labels = torch.cat([torch.zeros(batch, p, dtype=torch.long), video], dim=1)
    loss_mask = torch.cat([torch.zeros(batch, p), torch.ones(batch, n)], dim=1)
    return LayoutBatch(
        tokens=tokens.contiguous(),
        labels=labels.contiguous(),
        loss_mask=loss_mask,
        position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
        block_ids=hybrid_block_ids(p, n, L).expand(batch, seq).contiguous(),
        grid_position_ids=_hybrid_grid(p, grid, L)[:, None].expand(3, batch, seq).contiguous(),
        key_padding=sequence_padding(condition_padding, n),
    )


def pad_text_ids(texts: list[list[int]], length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or truncate, as the NBP release's tokenizer call does) text ids to ``length``.

    Returns:
        (int64 [B, length] ids (0 at padding), bool [B, length] True at padding).

    Raises:
        ValueError: a text that is not a list of ints in [0, vocab_size).
    """
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    padding = torch.ones(len(texts), length, dtype=torch.bool)
    for row, text in enumerate(texts):
        if not isinstance(text, list) or not all(isinstance(x, int) and 0 <= x < vocab_size for x in text):
            raise ValueError(f"text_ids must be a list of ints in [0, {vocab_size}); got {str(text)[:80]}")
        text = text[:length]
        ids[row, :len(text)] = torch.tensor(text, dtype=torch.long)
        padding[row, :len(text)] = False
    return ids, padding


CONDITION_TYPES = ("class", "text")


@dataclass(frozen=True)
class HybridLayout(TokenLayout):
    """The class- or text-conditional hybrid layout (module docstring): S = P + N.

    Attributes (besides TokenLayout's):
        condition_type: "class" (one label token, ids = index in ``condition_labels``) or "text" (up to P
            text ids, padded).
        condition_labels: class names in id order (class conditions).
        text_vocab_size: text tokenizer vocabulary (text conditions).
        num_condition_tokens: P.
        null_condition: the last condition id is the learned null condition.
    """

    name = "hybrid"
    conditional = True
    legacy_num_prefix_tokens = 1             # format-1 checkpoints were class-conditional: one label token

    condition_type: str = "class"
    condition_labels: tuple[str, ...] | None = None
    text_vocab_size: int | None = None
    num_condition_tokens: int = 1
    null_condition: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.condition_labels is not None:
            object.__setattr__(self, "condition_labels", tuple(self.condition_labels))

    @classmethod
    def from_config(cls, config: Any) -> "HybridLayout":
        return cls(config.latent_shape, config.block_shape, config.vocab_size, config.condition_type,
                   config.condition_labels, config.text_vocab_size, config.num_condition_tokens,
                   bool(config.null_condition))

    # ------------------------------------------------------------------ sizes and ids
    @property
    def seq_length(self) -> int:
        """S = P + N: the condition plus the clip (the special tokens take the place of the last block)."""
        return self.num_condition_tokens + self.num_video_tokens

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_condition_tokens

    @property
    def num_real_conditions(self) -> int:
        """Condition ids that name a class or a text id (the null condition excluded)."""
        if self.condition_type == "text":
            return int(self.text_vocab_size or 0)
        return len(self.condition_labels or ())

    @property
    def condition_vocab_size(self) -> int:
        return self.num_real_conditions + (1 if self.null_condition else 0)

    @property
    def null_condition_id(self) -> int | None:
        return self.condition_vocab_size - 1 if self.null_condition else None

    @property
    def video_token_offset(self) -> int:
        """L special ids (BOV = 0, MBOS_i = i) + the condition vocabulary, as in the official release."""
        return self.block_size + self.condition_vocab_size

    @property
    def condition_key(self) -> str:
        return "text_ids" if self.condition_type == "text" else "label"

    def condition_token_ids(self, condition: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """Model ids of condition ids int [B, P] (0 at padded positions, bool [B, P]): id + L."""
        if padding is not None:
            condition = condition.masked_fill(padding, 0)
        return condition + self.block_size

    def sequence_padding(self, condition_padding: torch.Tensor | None) -> torch.Tensor | None:
        """Key padding bool [B, S] of condition padding bool [B, P] (None when nothing is padded)."""
        return sequence_padding(condition_padding, self.num_video_tokens)

    # ------------------------------------------------------------------ positions
    def block_ids(self) -> torch.Tensor:
        return hybrid_block_ids(self.num_condition_tokens, self.num_video_tokens, self.block_size)

    def grid_position_ids(self) -> torch.Tensor:
        return hybrid_grid_positions(self.num_condition_tokens, self.latent_shape, self.block_shape)

    # ------------------------------------------------------------------ training data
    def batch(self, video_tokens: torch.Tensor, condition: torch.Tensor | None = None,
              condition_padding: torch.Tensor | None = None) -> LayoutBatch:
        """:func:`hybrid_batch` of the clips in the layout's block order.

        Raises:
            ValueError: no condition, or what hybrid_batch raises.
        """
        if condition is None:
            raise ValueError("the hybrid layout needs a condition [B, P] for every clip")
        return hybrid_batch(video_tokens, condition, self.block_size, self.condition_vocab_size,
                            condition_padding, self.latent_shape, self.block_shape)

    @cached_property
    def _class_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.condition_labels or ())}

    def sample_condition(self, condition: Any) -> Any:
        """Class: the label's condition id (its index in ``condition_labels``); text: the ids unchanged.

        Raises:
            ValueError: a label that is not one of ``condition_labels``.
        """
        if self.condition_type == "text":
            return condition
        if condition not in self._class_ids:
            raise ValueError(f"clip label {condition!r} is not in model.condition_labels {list(self._class_ids)}")
        return self._class_ids[condition]

    def condition_batch(self, conditions: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids [B, 1] (never padded), or text ids right-padded / truncated to P
        (:func:`pad_text_ids`).

        Raises:
            ValueError: a text that is not a list of ints in [0, condition_vocab_size).
        """
        if self.condition_type == "text":
            return pad_text_ids(conditions, self.num_condition_tokens, self.condition_vocab_size)
        return torch.tensor(conditions).view(-1, 1), torch.zeros(len(conditions), 1, dtype=torch.bool)

    def random_batch(self, batch_size: int, generator: torch.Generator | None = None) -> LayoutBatch:
        video = torch.randint(0, self.vocab_size, (batch_size, self.num_video_tokens), generator=generator)
        condition = torch.randint(0, self.num_real_conditions, (batch_size, self.num_condition_tokens),
                                  generator=generator)
        return self.batch(video, condition)

    # ------------------------------------------------------------------ checks
    def config_problems(self) -> list[str]:
        """Condition type, class labels (distinct, one token) or text vocabulary (P >= 1)."""
        errors = []
        P = self.num_condition_tokens
        if self.condition_type not in CONDITION_TYPES:
            errors.append(f"model.condition_type={self.condition_type!r} not in {CONDITION_TYPES}")
        elif self.condition_type == "class":
            labels = None if self.condition_labels is None else list(self.condition_labels)
            if not labels or len(set(labels)) != len(labels):
                errors.append(f"hybrid class conditioning needs distinct model.condition_labels, got {labels}")
            if P != 1:
                errors.append(f"num_condition_tokens={P}: a class label is 1 token")
        else:
            if not self.text_vocab_size or self.text_vocab_size < 1:
                errors.append(f"hybrid text conditioning needs model.text_vocab_size >= 1, got {self.text_vocab_size}")
            if P < 1:
                errors.append(f"num_condition_tokens={P} must be >= 1 for text")
        return errors

    def manifest_problems(self, manifest: dict) -> list[str]:
        """Class conditions: every clip label the manifest lists must be one of ``condition_labels``. Text
        conditions: the text tokenizer the manifest records (``--text-tokenizer``, data_prep.text_ids) must
        have ``text_vocab_size`` ids."""
        if self.condition_type == "text":
            text = manifest.get("text_tokenizer")
            if text is None or int(text["vocab_size"]) == self.text_vocab_size:
                return []
            return [f"shards hold text ids of the text tokenizer {text.get('path')} ({text['vocab_size']} ids), "
                    f"but model.text_vocab_size is {self.text_vocab_size}"]
        if self.condition_type != "class" or not manifest.get("labels"):
            return []
        known = self.condition_labels or ()
        unknown = sorted(set(manifest["labels"]) - set(known))
        if not unknown:
            return []
        return [f"clip labels {unknown[:10]}{' ...' if len(unknown) > 10 else ''} are not in "
                f"model.condition_labels ({len(known)} classes)"]

    # ------------------------------------------------------------------ generation
    def generation_plan(self, prompt_length: int | None = None) -> GenerationPlan:
        """Prefill [condition (P), BOV] (BOV's logits give z_0); z_0 .. z_{L-2} one pass each (z_k predicts
        z_{k+1}); then ``[z_{L-1}, MBOS_1..MBOS_{L-1}]`` predicts block 1 and every block the next:
        L + N/L - 1 passes.

        Raises:
            ValueError: a prompt length other than None or P (the condition is the prompt).
        """
        P, N, L = self.num_condition_tokens, self.num_video_tokens, self.block_size
        if prompt_length not in (None, P):
            raise ValueError(f"the hybrid layout generates from its {P} condition tokens, not a prompt of "
                             f"{prompt_length}")
        steps = [DecodeStep(0, given=P, special_ids=(BOV,), num_logits=1)]
        steps += [DecodeStep(P + k, fed=1, num_logits=1) for k in range(1, L)]
        steps.append(DecodeStep(P + L, fed=1, special_ids=tuple(range(1, L)), num_logits=L))
        steps += [DecodeStep(start, fed=L, num_logits=L) for start in range(P + 2 * L, P + N, L)]
        return self._plan(steps)
