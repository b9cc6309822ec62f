"""Block-causal core attention modules for megatron-core's SelfAttention.

Two kernels of the one rule in :mod:`megatron_nbp.masks`, each slotting into a megatron layer spec as
``core_attention`` (see :mod:`megatron_nbp.model.spec`):

- ``BlockCausalSDPAttention``: torch SDPA under a dense boolean mask, the CPU path and the reference
  (replaces megatron's DotProductAttention, whose softmax allocates from a CUDA-only buffer);
- ``BlockCausalFlexAttention``: FlexAttention with a cached BlockMask (no dense S x S tensor, fully
  masked tiles skipped), compiled on GPU (the fused path), eager on CPU.

``ATTENTION_BACKENDS`` maps a config name to (core attention class, mask builder); the training step
builds the mask once per layout with the builder and passes it through GPTModel as ``attention_mask``
(the dense bool mask itself, or for flex a handle to the BlockMask, see :class:`FlexMaskRegistry`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_nbp.masks import block_causal_attention_mask, block_causal_block_mask


class BlockCausalSDPAttention(MegatronModule):
    """Scaled dot-product attention under a dense block-causal mask.

    Args (megatron core_attention builder contract):
        config: TransformerConfig (num_attention_heads, kv_channels, num_query_groups, attention_dropout).
        layer_number, attn_mask_type, attention_type, cp_comm_type: accepted for the contract.
        attention_dropout: overrides config.attention_dropout.
        softmax_scale: default 1/sqrt(head dim).
        pg_collection: process groups; its ``tp`` group sets the heads per partition.

    Forward:
        query [sq, b, np, hn], key/value [sk, b, ng, hn] (np, ng: heads / query groups of this TP
        partition), attention_mask bool [b or 1, 1, sq, sk] with True = masked (megatron convention).
        Returns the context [sq, b, np * hn] in the input dtype.

    Raises:
        ValueError: if no attention mask is given (NBP attention is never implicitly causal).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        if config.context_parallel_size != 1:
            raise ValueError("BlockCausalSDPAttention does not support context parallelism")
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is None:
            raise ValueError("block-causal attention needs the layout's attention mask; got None")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias are not supported")
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.num_heads != self.num_groups:
            rep = self.num_heads // self.num_groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        # attention dropout differs across TP ranks (different heads): megatron's model-parallel RNG
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


_compiled_flex = None


@functools.lru_cache(maxsize=None)
def flex_kernel_options(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """FlexAttention kernel options for the block-causal mask at this head dimension.

    torch's correctness flags stay at their defaults (False). ``BLOCKS_ARE_CONTIGUOUS`` does not hold for
    this mask: the query tiles that read a key tile are not one run (a sequence that is not a multiple
    of 128, e.g. 1264, ends in a partial query tile that reads every key tile, so key tile 0 is read by
    query tiles [0, 9]), and the backward kernel would walk the wrong tiles. With it and
    ``ROWS_GUARANTEED_SAFE`` set, the compiled kernel on an H200 gave outputs 15-19% (relative L2) away
    from the dense mask at the nbp-xl shape (tests/gpu/test_gpu.py, 2026-11-30).

    Hopper (compute capability 9.0), bf16 / fp16: torch's default forward tiles are tuned for head dims
    64 / 128 / 256 only and fall back to 64 x 64 with 4 warps for any other; Triton rounds a head dim of
    96 up to 128 inside the kernel, so heads of 96 (nbp-xl) and 128 (nbp-xxl, nbp-3b) get the H100
    head-dim-128 forward tiling: BLOCK_M 128, BLOCK_N 64, 3 stages, 8 warps (a tiling choice only). The
    backward keeps torch's sm90 default (64 / 128 / 128 / 64, 3 stages, 8 warps), already chosen for head
    dims up to 128. Elsewhere (other GPUs, fp32, CPU) torch's own heuristics are kept.

    Returns:
        dict for ``flex_attention(..., kernel_options=...)`` (empty where torch's defaults are kept).
    """
    options: dict = {}
    if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and 64 < head_dim <= 128
            and torch.cuda.get_device_capability(device) == (9, 0)):
        options.update(BLOCK_M=128, BLOCK_N=64, num_stages=3, num_warps=8)
    return options


def flex_kernel(device: torch.device):
    """flex_attention for tensors on ``device``: compiled once per process on CUDA (the fused Triton kernel;
    torch.compile keeps one graph per input shape, so each shape compiles once), eager elsewhere (CPU
    compile has no backward), also on a machine that has a GPU."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexMaskRegistry:
    """BlockMasks by handle, so the flex mask can pass through megatron's activation recomputation.

    megatron's ``tensor_parallel.checkpoint`` (``--recompute-granularity full|selective``) saves the
    attention mask with ``ctx.save_for_backward``, which takes tensors only; a BlockMask is not one. The
    training step therefore gives the model a one-element CPU int64 tensor naming a registered mask
    (reading it is a host read, no device synchronisation), and the flex core attention looks the mask
    up. The newest ``capacity`` masks are kept: more than the micro-batches a 1F1B schedule holds in
    flight, each of which may have its own mask (padded text conditions).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._masks: dict[int, object] = {}
        self._next = 0

    def register(self, block_mask) -> torch.Tensor:
        """Store ``block_mask``; returns its handle, int64 [1] on the CPU."""
        handle = self._next
        self._next += 1
        self._masks[handle] = block_mask
        while len(self._masks) > self.capacity:
            del self._masks[next(iter(self._masks))]
        return torch.tensor([handle], dtype=torch.long)

    def lookup(self, handle: torch.Tensor):
        """The BlockMask registered under ``handle``.

        Raises:
            KeyError: the handle was never registered or has been evicted.
        """
        key = int(handle.reshape(-1)[0])
        if key not in self._masks:
            raise KeyError(f"flex attention mask handle {key} is not registered (evicted after "
                           f"{self.capacity} newer masks?)")
        return self._masks[key]


FLEX_MASKS = FlexMaskRegistry()


class BlockCausalFlexAttention(BlockCausalSDPAttention):
    """FlexAttention under a BlockMask built from the layout's block ids (the fused block-causal path).

    Same contract as :class:`BlockCausalSDPAttention`, except ``attention_mask`` is a
    ``torch.nn.attention.flex_attention.BlockMask`` (see :func:`megatron_nbp.masks.block_causal_block_mask`)
    or a handle from :data:`FLEX_MASKS` (what the training step passes, see :class:`FlexMaskRegistry`).
    The kernel is :func:`flex_kernel` with :func:`flex_kernel_options`.

    Raises:
        ValueError: attention dropout > 0 (FlexAttention has none; the NBP release trains with 0),
            or a mask that is neither a BlockMask nor a handle.
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        if self.dropout_p:
            raise ValueError(f"flex attention has no attention dropout; got {self.dropout_p} (set attention_dropout: 0)")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from torch.nn.attention.flex_attention import BlockMask

        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.long and attention_mask.numel() == 1:
            attention_mask = FLEX_MASKS.lookup(attention_mask)
        if not isinstance(attention_mask, BlockMask):
            raise ValueError(f"flex attention needs a BlockMask, got {type(attention_mask).__name__}")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias are not supported")
        sq, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        context = flex_kernel(q.device)(q, k, v, block_mask=attention_mask, scale=self.softmax_scale,
                                enable_gqa=self.num_heads != self.num_groups,
                                kernel_options=flex_kernel_options(self.head_dim, q.dtype, q.device))
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)


def _dense_mask(block_ids: torch.Tensor, key_padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    return block_causal_attention_mask(block_ids, key_padding).to(device or block_ids.device)


def _flex_mask_handle(block_ids: torch.Tensor, key_padding: torch.Tensor | None = None, device=None) -> torch.Tensor:
    return FLEX_MASKS.register(block_causal_block_mask(block_ids, key_padding, device=device))


ATTENTION_BACKENDS = {
    "dense": (BlockCausalSDPAttention, _dense_mask),
    "flex": (BlockCausalFlexAttention, _flex_mask_handle),
}
