"""megatron-nbp: Next-Block Prediction (NBP) video generation on megatron-core: the decoder, its token
layouts and block-causal attention, training (megatron and DeepSpeed ZeRO backends), checkpoints,
conversion, KV-cache generation and FVD evaluation. The offline data side (tokenizer, tokenization job)
is the sibling package ``data_prep``."""

__version__ = "0.2.0"
