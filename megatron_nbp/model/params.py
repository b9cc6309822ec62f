"""Parameter counts of the NBP decoder from its config alone (no weights allocated).

Counts megatron-core's GPTModel with the local layer spec exactly as built by
:func:`megatron_nbp.model.builder.build_gpt_model` (LayerNorm or RMSNorm, linears with or without
bias, GELU or SwiGLU MLP, learned absolute positions, padded vocabulary, tied or untied output layer);
the tests check it against the numel of real models.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_nbp.config import ModelConfig


@dataclass
class ParameterCount:
    """Parameters by part; ``transformer`` (the layers + final norm) is what model-size tables quote."""

    word_embeddings: int
    position_embeddings: int
    transformer: int
    output_layer: int

    @property
    def total(self) -> int:
        return self.word_embeddings + self.position_embeddings + self.transformer + self.output_layer


def count_parameters(model: ModelConfig) -> ParameterCount:
    """Exact parameter count of the whole model (all TP/PP ranks together, tied weights once).

    Per layer (h = hidden_size, f = ffn_hidden_size, f1 = 2f for SwiGLU else f, b = 1 with linear biases):
    two norms (2h each for LayerNorm, h for RMSNorm), QKV 3h^2 + 3bh, projection h^2 + bh, fc1 h f1 + b f1,
    fc2 f h + bh; then the final norm, the word embedding (padded vocabulary x h), the position tables
    (``position_table_size`` x h, learned_absolute only) and, untied, the output layer (padded vocabulary
    x h, no bias: megatron's ColumnParallelLinear output layer has none)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    vocab = model.padded_vocab_size
    norm = 2 * h if model.normalization == "LayerNorm" else h      # weight (+ bias)
    b = 1 if model.add_bias_linear else 0
    f1 = 2 * f if model.activation == "swiglu" else f              # gated: [gate; up]
    layer = (
        norm                         # input norm
        + 3 * h * h + b * 3 * h      # fused QKV
        + h * h + b * h              # attention output projection
        + norm                       # pre-MLP norm
        + h * f1 + b * f1            # fc1
        + f * h + b * h              # fc2
    )
    return ParameterCount(
        word_embeddings=vocab * h,
        position_embeddings=model.position_table_size * h if model.position_embedding_type == "learned_absolute" else 0,
        transformer=model.num_layers * layer + norm,
        output_layer=0 if model.share_embeddings_and_output_weights else vocab * h,
    )


def format_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
