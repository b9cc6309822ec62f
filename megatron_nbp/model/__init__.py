"""The NBP decoder: megatron-core GPTModel with block-causal core attention (ModuleSpec)."""
