"""Model FLOPs of NBP training and model FLOPs utilisation (MFU).

Model FLOPs count the matrix multiplications the model needs, forward and backward, once (PaLM's
"model FLOPs", Chowdhery et al. 2022, appendix B; Megatron-LM's ``num_floating_point_operations``):
recomputation, communication and element-wise work are not counted, so MFU does not rise when
activations are recomputed. A multiply-add is 2 FLOPs. Per sample of ``s`` input positions,
hidden ``h``, FFN width ``f``, ``n`` layers and padded vocabulary ``V``, one forward pass is::

    per layer   QKV projection            2 s h (3h)
                attention scores QK^T     2 h A
                attention-weighted values 2 h A
                output projection         2 s h h
                MLP (GELU)                2 s h f + 2 s f h        (SwiGLU: 2 s h (2f) + 2 s f h)
    output layer (logits)                 2 s h V

where ``A`` is the number of (query, key) pairs the block-causal mask allows: the attention is counted
as what it computes, not as a dense ``s^2`` (a plain causal mask would give s (s + 1) / 2). For the
frame-prediction layout of ``s = N - L`` positions in ``s / L`` blocks of ``L`` tokens,
``A = L^2 (s/L) (s/L + 1) / 2``; the hybrid layout's causal first row and its condition block are
counted pair by pair from the same block ids the mask is built from. Backward costs twice the forward
(gradients with respect to inputs and to weights), so one training sample costs 3x its forward.
With ``A = s^2`` and ``f = 4h`` this is ``72 B s n h^2 (1 + s / (6h) + V / (12 n h))`` per iteration
of B samples: Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM"), eq. 3, whose factor 96 also counts the forward recomputed under full activation
recomputation (4 x forward instead of 3 x).

MFU = achieved model TFLOP/s per GPU / the GPU's dense bf16 tensor-core peak (:data:`PEAK_TFLOPS` by
device name, or ``--peak-tflops``); the same peak is used whatever the training precision.
"""

from __future__ import annotations

from megatron_nbp.config import ModelConfig

# Dense (no structured sparsity) bf16 tensor-core peak of one GPU, TFLOP/s, from the vendors' data
# sheets; matched as a substring of torch.cuda.get_device_name(), first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),     # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def attention_pairs(model: ModelConfig) -> int:
    """A: (query, key) pairs the block-causal mask of ``model``'s layout allows in one sample (no
    padding: the worst case, every condition position a real token); ``TokenLayout.attention_pairs``."""
    return model.token_layout.attention_pairs()


def forward_flops_per_sample(model: ModelConfig) -> int:
    """Model FLOPs of one sample's forward pass (module docstring), an integer."""
    s, h, f, n, V = (model.seq_length, model.hidden_size, model.ffn_hidden_size, model.num_layers,
                     model.padded_vocab_size)
    mlp = 2 * s * h * (2 * f if model.activation == "swiglu" else f) + 2 * s * f * h
    layer = 2 * s * h * 3 * h + 4 * h * attention_pairs(model) + 2 * s * h * h + mlp
    return n * layer + 2 * s * h * V


def training_flops_per_iteration(model: ModelConfig, global_batch_size: int) -> int:
    """Model FLOPs of one training iteration: 3 x forward x global batch (backward = 2 x forward)."""
    return 3 * forward_flops_per_sample(model) * global_batch_size


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of one GPU: ``override`` if given, else :data:`PEAK_TFLOPS` by name
    (None for an unknown GPU or the CPU: MFU is then not reported)."""
    if override is not None:
        return float(override)
    if not device_name:
        return None
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None
