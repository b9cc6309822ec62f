"""megatron-nbp's offline data side: video I/O (PyAV), the MAGVITv2-style causal 3D CNN tokenizer with an
FSQ quantizer and its training, the WebDataset token-shard format and the distributed tokenization job."""
