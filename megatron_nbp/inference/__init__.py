"""Single-device inference: converted checkpoint format, plain PyTorch model, KV-cache generation."""
