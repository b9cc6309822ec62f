"""Single-device NBP decoder in plain PyTorch (nanoGPT-style), loading the converted checkpoint.

Parameter names are exactly megatron-core GPTModel's at TP=1, PP=1 (local spec), so conversion is a
reshard plus a rename-free copy, and the numerics are those of megatron's layers:
embedding (word + learned absolute position from separate condition / video tables, or none with
3D RoPE) -> N x [norm -> fused QKV (per-head [q, k, v] interleaved, megatron's layout) -> 3D RoPE on
q and k (rope3d) -> SDPA -> proj -> residual; norm -> fc1 -> GELU or SwiGLU -> fc2 ->
residual] -> final norm -> output layer (tied to the word embedding unless untied). Norm is LayerNorm
or RMSNorm; linears have biases unless ``add_bias_linear`` is False.

Attention takes either a dense "allowed" mask (prefill / full forward, the block-causal rule from
:mod:`megatron_nbp.masks`) or no mask (a block step against the KV cache: the new block sees every
cached key and itself, which is the block-causal rule for the newest block). :meth:`NBPDecoder.decode_step`
is the static-shape form of a block step (a device tensor of cache positions, attention over the whole
cache under a "written so far" mask): the code megatron_nbp.inference.static_decode compiles or captures
as a CUDA graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.kv_cache import StaticKVCache
from megatron_nbp.inference.rope import apply_rotary, mrope_frequencies
from megatron_nbp.model.embeddings import ConditionVideoPositionEmbedding


CONFIG_FORMAT_VERSION = 3
"""``format_version`` of config.json: 3 = ``{"format_version", "model": ModelConfig dict, "extra"}``;
1 and 2 held a flat list of fields copied from the ModelConfig (read by :func:`load_converted_config`)."""

# Fields of the format 1 / 2 config.json that are ModelConfig properties now (or provenance).
_DERIVED_FIELDS = ("padded_vocab_size", "max_seq_length", "video_token_offset", "mrope_section", "format_version",
                   "extra")


def converted_config(model_cfg: ModelConfig, extra: dict) -> dict:
    """The config.json content of a converted checkpoint: the trained model's config and provenance
    (``extra``: source checkpoint, iteration, ...)."""
    return {"format_version": CONFIG_FORMAT_VERSION, "model": model_cfg.to_dict(), "extra": dict(extra)}


def load_converted_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a converted checkpoint's config.json, of any format version.

    Format 1 / 2 files (a flat copy of some ModelConfig fields, written by earlier converters) are read
    too: the fields they lack take their defaults, ``max_seq_length`` becomes
    ``max_position_embeddings``, and the vocabulary padding is set to reproduce the stored
    ``padded_vocab_size``.

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, or a config that contradicts itself.
        ConfigError: a field of the wrong type or an unknown field.
    """
    data = json.loads(Path(path).read_text())
    if "model" in data:
        return ModelConfig.from_dict(data["model"])
    fields = {k: v for k, v in data.items() if k not in _DERIVED_FIELDS}
    if fields.get("layout") != "hybrid" or not fields.get("num_condition_tokens"):
        fields.pop("num_condition_tokens", None)  # the old converters wrote the prefix length P (0 or absent)
    fields["max_position_embeddings"] = data["max_seq_length"]
    cfg = ModelConfig.from_dict(fields)
    padded = data["padded_vocab_size"]
    if cfg.padded_vocab_size != padded:
        cfg.make_vocab_size_divisible_by = padded  # a unit >= the vocabulary: padded to exactly this size
    if cfg.padded_vocab_size != padded or cfg.video_token_offset != data.get("video_token_offset", 0):
        raise ValueError(f"{path}: padded_vocab_size {padded} / video_token_offset {data.get('video_token_offset')} "
                         f"do not follow from the stored fields ({cfg.padded_vocab_size} / {cfg.video_token_offset})")
    return cfg


class _Namespace(nn.Module):
    """Empty module used to reproduce megatron's parameter name hierarchy."""


class SelfAttention(nn.Module):
    """Multi-head self-attention with megatron's fused QKV layout and an optional static KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.linear_qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.add_bias_linear)
        self.linear_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, cache: StaticKVCache | None,
                layer: int, start: int | torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, s, hidden]; allowed: bool [B or 1, s, K] or None; ``start``: an int writes the cache at
        ``start : start + s`` and attends to its first ``start + s`` positions (K = start + s); an int64
        tensor [s] of cache positions writes there and attends to the whole cache (K = max_length, static
        shapes). Returns [B, s, hidden]."""
        b, s, _ = x.shape
        qkv = self.linear_qkv(x).view(b, s, self.heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [b, h, s, d]
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            if isinstance(start, torch.Tensor):
                k, v = cache.write(layer, start, k, v)
            else:
                k, v = cache.update(layer, start, k, v)
        attn_mask = None if allowed is None else allowed.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """fc1 -> GELU -> fc2, or SwiGLU: fc1 gives [gate; up] (megatron's order), silu(gate) * up -> fc2."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        width = 2 * cfg.ffn_hidden_size if self.gated else cfg.ffn_hidden_size
        self.linear_fc1 = nn.Linear(cfg.hidden_size, width, bias=cfg.add_bias_linear)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.linear_fc2(F.silu(gate) * up)
        return self.linear_fc2(F.gelu(h))


def make_norm(cfg: ModelConfig) -> nn.Module:
    """torch LayerNorm or RMSNorm, as megatron's WrappedTorchNorm builds them."""
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attention = SelfAttention(cfg)
        self.pre_mlp_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, allowed, cache, layer, start, rope=None):
        x = x + self.self_attention(self.input_layernorm(x), allowed, cache, layer, start, rope)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class NBPDecoder(nn.Module):
    """The converted NBP model on one device.

    Forward:
        tokens: int64 [B, S] ids; position_ids: learned positions int64 [B, S] (or [S]), or for
            rope3d the (t, h, w) coordinates int64 [3, B, S] (megatron_nbp.layouts);
        allowed: bool [B or 1, S, K] "may attend" (K = keys incl. cache), or None = attend to all keys;
        cache / start: a StaticKVCache and the position of tokens[:, 0] in it (KV-cache decoding);
        num_logits: compute the output layer for the last ``num_logits`` positions only (a prefill needs
            its last block's; the [S, V] output product is ~10% of a 512-token prefill at the XL shape).
        Returns logits float [B, S or num_logits, padded_vocab_size].

    Raises (forward):
        ValueError: rope3d position ids not [3, B, S], a learned position beyond the tables, or
            ``num_logits`` outside [1, S].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embedding = _Namespace()
        self.embedding.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.rope = cfg.position_embedding_type == "rope3d"
        if not self.rope:
            p = cfg.num_prefix_tokens
            self.embedding.position_embeddings = ConditionVideoPositionEmbedding(p, cfg.position_table_size - p,
                                                                                 cfg.hidden_size)
        self.decoder = _Namespace()
        self.decoder.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.decoder.final_layernorm = make_norm(cfg)
        if not cfg.share_embeddings_and_output_weights:
            self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        if self.config.share_embeddings_and_output_weights:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor | None = None,
                cache: StaticKVCache | None = None, start: int = 0, num_logits: int | None = None) -> torch.Tensor:
        cfg = self.config
        if num_logits is not None and not 0 < num_logits <= tokens.shape[1]:
            raise ValueError(f"num_logits must be in [1, {tokens.shape[1]}] (the input positions), got {num_logits}")
        if self.rope and (position_ids.dim() != 3 or position_ids.shape[0] != 3):
            raise ValueError(f"rope3d needs (t, h, w) position ids [3, B, S], got {tuple(position_ids.shape)}")
        if not self.rope and position_ids.max() >= cfg.position_table_size:
            raise ValueError(f"position {int(position_ids.max())} beyond the position tables "
                             f"({cfg.position_table_size})")
        return self._run(tokens, position_ids, allowed, cache, start, num_logits)

    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor,
                    cache: StaticKVCache, index: torch.Tensor) -> torch.Tensor:
        """One KV-cache step with static shapes and no host synchronisation (what a CUDA graph captures).

        Args:
            tokens: int64 [B, s] ids fed at the cache positions ``index``.
            position_ids: int64 [1, s] learned positions or [3, 1, s] rope3d (t, h, w) coordinates of them
                (not range-checked: they come from the layout's tables).
            allowed: bool [B or 1, s or 1, max_length] "may attend" over the whole cache, the positions
                written so far (this step's included) and not padding.
            cache: the StaticKVCache the step writes (``StaticKVCache.write``) and reads.
            index: int64 [s] cache positions of the tokens, on the model's device.

        Returns:
            logits float [B, s, padded_vocab_size], equal to :meth:`forward` with ``start = index[0]`` up to
            the summation order of the longer (masked) attention.
        """
        return self._run(tokens, position_ids, allowed, cache, index, None)

    def _run(self, tokens, position_ids, allowed, cache, start, num_logits) -> torch.Tensor:
        cfg = self.config
        x = self.embedding.word_embeddings(tokens)
        rope = None
        if self.rope:
            rope = mrope_frequencies(position_ids, cfg.hidden_size // cfg.num_attention_heads,
                                     cfg.mrope_section, cfg.rotary_base)
        else:
            x = x + self.embedding.position_embeddings(position_ids)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, allowed, cache, i, start, rope)
        if num_logits is not None:
            x = x[:, x.shape[1] - num_logits:]
        return F.linear(self.decoder.final_layernorm(x), self.output_weight())

    def new_cache(self, batch_size: int, max_length: int | None = None) -> StaticKVCache:
        """A preallocated KV cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
        c = self.config
        p = self.embedding.word_embeddings.weight
        return StaticKVCache(c.num_layers, batch_size, c.num_attention_heads, max_length or c.position_table_size,
                             c.hidden_size // c.num_attention_heads, dtype=p.dtype, device=p.device)


def load_inference_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                         dtype: str | torch.dtype | None = None) -> NBPDecoder:
    """Load ``config.json`` + the weights (``model.safetensors``, or shards + ``model.safetensors.index.json``)
    written by :mod:`megatron_nbp.inference.convert`.

    Args:
        checkpoint_dir: the converted model's directory.
        device: where the model goes (the weights are read straight onto it).
        dtype: "bf16" | "fp16" | "fp32" (or the torch dtype) to run in; None = the stored dtype
            (config.json's ``dtype``; fp32 for checkpoints converted before it was recorded).

    Returns:
        The model in eval mode on ``device``, every parameter in the chosen dtype.

    Raises:
        FileNotFoundError: config.json or a weight file is missing.
        ValueError: an unknown dtype, here or in config.json.
        RuntimeError: the weights do not match the config (missing or unexpected tensors).
    """
    from megatron_nbp.inference.dtypes import CONFIG_DTYPE_KEY, to_torch_dtype
    from megatron_nbp.inference.weight_files import read_weight_files

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir / 'config.json'} not found (run launchers/convert_checkpoint.py)")
    cfg = load_converted_config(checkpoint_dir / "config.json")
    stored = json.loads((checkpoint_dir / "config.json").read_text()).get(CONFIG_DTYPE_KEY, "fp32")
    target = to_torch_dtype(stored if dtype is None else dtype)
    tensors = read_weight_files(checkpoint_dir, device)
    old_table = tensors.pop("embedding.position_embeddings.weight", None)
    if old_table is not None:  # format 1: one table over [condition, video stream]; split it in two
        p = cfg.num_prefix_tokens
        tensors["embedding.position_embeddings.video.weight"] = old_table[p:]
        if p:
            tensors["embedding.position_embeddings.condition.weight"] = old_table[:p]
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):
        model = NBPDecoder(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)  # the loaded tensors become the parameters
    return model.to(device).eval()
