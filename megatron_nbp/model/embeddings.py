"""Learned absolute positions with separate tables for the condition and the video stream (NBP paper).

The input of every layout is ``[condition (P positions), video stream (S - P positions)]`` (P = 0 for
frame prediction). Position ids count 0 .. S-1; ids below P index the condition table, the others the
video table at ``id - P``. A video-stream position therefore has the same embedding whatever the
condition length: a frame-prediction checkpoint (P = 0) and class (P = 1) or text (P = 77) models
share the video table's meaning, which a single table over the whole sequence would not give.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class ConditionVideoPositionEmbedding(nn.Module):
    """Drop-in replacement for megatron's ``LanguageModelEmbedding.position_embeddings`` (an
    ``nn.Embedding`` called with position ids), holding two tables.

    Args:
        num_condition: P, rows of the condition table (0: no condition table).
        num_video: rows of the video-stream table (S - P).
        hidden_size: embedding width.
        init_method: in-place initialiser for each table's weight (megatron's embedding_init_method).

    Forward:
        position_ids: int64 [B, S] (or any shape) in [0, P + num_video).
        Returns float [*position_ids.shape, hidden_size].

    Raises:
        IndexError: a position id beyond the tables (from nn.Embedding).
    """

    def __init__(self, num_condition: int, num_video: int, hidden_size: int,
                 init_method: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self.num_condition = num_condition
        self.condition = nn.Embedding(num_condition, hidden_size) if num_condition else None
        self.video = nn.Embedding(num_video, hidden_size)
        if init_method is not None:
            for table in (self.condition, self.video):
                if table is not None:
                    init_method(table.weight)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.condition is None:
            return self.video(position_ids)
        p = self.num_condition
        condition = self.condition(position_ids.clamp(max=p - 1))
        video = self.video((position_ids - p).clamp(min=0))
        return torch.where((position_ids < p).unsqueeze(-1), condition, video)
