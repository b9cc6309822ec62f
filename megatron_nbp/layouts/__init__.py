"""NBP token layouts: turn clips of video tokens into model inputs, targets, loss mask, positions and
block ids, and plan generation (the NBP paper; official NBP release).

One class per layout, each a :class:`TokenLayout` (``base``), selected by the ``model.layout`` config value
through :func:`token_layout` (``registry``; ``ModelConfig.token_layout`` builds it from the config):

* :class:`FramePredictionLayout` (``frame_prediction``, K600): no prefix, S = N - L, position i predicts
  video token i + L; block size L = 1 is the NTP baseline.
* :class:`HybridLayout` (``hybrid``, UCF-101): a class or text condition of P tokens, BOV, the first block
  token by token, then MBOS and one block per step; S = P + N.

Shared pieces: ``order`` (block-major order of non-contiguous block shapes, (t, h, w) coordinates),
``batch`` (:class:`LayoutBatch`, the ``pkeep`` corruption), ``plan`` (:class:`GenerationPlan`, the forward
passes of KV-cache generation). The attention rule (``block_id[key] <= block_id[query]``, padded keys
never attended) lives only in megatron_nbp.masks.
"""

from megatron_nbp.layouts.base import TokenLayout
from megatron_nbp.layouts.batch import LayoutBatch, corrupt_video_tokens
from megatron_nbp.layouts.frame_prediction import (FramePredictionLayout, frame_prediction_batch,
                                                   frame_prediction_block_ids, frame_prediction_grid_positions)
from megatron_nbp.layouts.hybrid import (HybridLayout, hybrid_batch, hybrid_block_ids, hybrid_grid_positions,
                                         pad_text_ids)
from megatron_nbp.layouts.order import block_major_order, video_grid_coordinates
from megatron_nbp.layouts.plan import DecodeStep, GenerationPlan
from megatron_nbp.layouts.registry import LAYOUTS, layout_class, token_layout

__all__ = [
    "DecodeStep", "FramePredictionLayout", "GenerationPlan", "HybridLayout", "LAYOUTS", "LayoutBatch", "TokenLayout",
    "block_major_order", "corrupt_video_tokens", "frame_prediction_batch", "frame_prediction_block_ids",
    "frame_prediction_grid_positions", "hybrid_batch", "hybrid_block_ids", "hybrid_grid_positions", "layout_class",
    "pad_text_ids", "token_layout", "video_grid_coordinates",
]
