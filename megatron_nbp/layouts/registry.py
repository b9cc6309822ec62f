"""The token layouts by name (the ``model.layout`` config value) and :func:`token_layout`."""

from __future__ import annotations

from typing import Any

from megatron_nbp.layouts.base import TokenLayout
from megatron_nbp.layouts.frame_prediction import FramePredictionLayout
from megatron_nbp.layouts.hybrid import HybridLayout

LAYOUTS: dict[str, type[TokenLayout]] = {cls.name: cls for cls in (FramePredictionLayout, HybridLayout)}
"""Every token layout, by its ``model.layout`` name."""


def layout_class(name: str) -> type[TokenLayout]:
    """The TokenLayout subclass selected by ``model.layout`` = ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model.layout={name!r} not in {tuple(LAYOUTS)}") from None


def token_layout(model_config: Any) -> TokenLayout:
    """The token layout of a model, built from its config's own fields.

    Args:
        model_config: a ``megatron_nbp.config.ModelConfig`` (training, conversion and inference all read
            the same config; anything with ``layout``, ``latent_shape``, ``block_shape``, ``vocab_size`` and the condition fields
            ``condition_type``, ``condition_labels``, ``text_vocab_size``, ``num_condition_tokens``,
            ``null_condition``).

    Returns:
        A new immutable TokenLayout (the config may change later; build another then).

    Raises:
        ValueError: ``model_config.layout`` is not a known layout name.
    """
    return layout_class(model_config.layout).from_config(model_config)
