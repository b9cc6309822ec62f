"""The dtype a converted model is stored in and runs in: ``--dtype bf16|fp16|fp32`` of nbp-convert,
nbp-generate and nbp-evaluate, and ``dtype=`` of load_inference_model and NBPPipeline.from_pretrained.

The names are the precision names of training (megatron_nbp.device.PRECISIONS). When none is given,
generation runs in bf16 on CUDA and fp32 on the CPU (megatron_nbp.device.DevicePlan.default_precision);
the logits are turned to fp32 before sampling whatever the model's dtype (sampling.sample_tokens).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""Name -> torch dtype; the names are megatron_nbp.device.PRECISIONS (a test keeps them equal)."""
CONFIG_DTYPE_KEY = "dtype"
"""The entry of a converted checkpoint's config.json naming its weights' dtype (absent before: fp32)."""


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype among them) -> the torch dtype.

    Raises:
        ValueError: another name or dtype (the message lists the choices).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} not supported; choose one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name (``"bf16"``, ``"fp16"``, ``"fp32"``) of a dtype or name.

    Raises:
        ValueError: as :func:`to_torch_dtype`.
    """
    dtype = to_torch_dtype(dtype)
    return next(name for name, value in DTYPES.items() if value == dtype)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a CUDA device, fp32 elsewhere (the training default precision of the device)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype, or :func:`default_dtype` of ``device`` when None; checked to run
    there (:func:`check_dtype_runs`).

    Raises:
        ValueError: an unknown dtype, or one whose kernels do not run on ``device``.
    """
    resolved = default_dtype(device) if dtype is None else to_torch_dtype(dtype)
    check_dtype_runs(resolved, device)
    return resolved


_CHECKED: set[tuple[torch.dtype, str]] = set()


def check_dtype_runs(dtype: torch.dtype, device: str | torch.device) -> None:
    """Run the decoder's kernels (embedding, layer norm, RMS norm, linear, GELU, SiLU, masked SDPA) once on
    tiny tensors of ``dtype`` on ``device``; a refusal of the build (e.g. a torch without half-precision
    CPU matmuls) becomes a clear error instead of a failure deep inside generation. Recent torch builds
    run bf16 and fp16 on the CPU, so nothing is refused there. Cached per (dtype, device type).

    Raises:
        ValueError: the kernels do not run (names the dtype, the device and the fix).
    """
    device = torch.device(device)
    key = (dtype, device.type)
    if dtype == torch.float32 or key in _CHECKED:
        return
    try:
        with torch.no_grad():
            x = torch.nn.Embedding(4, 8).to(device, dtype)(torch.tensor([[0, 1, 2, 3]], device=device))
            x = torch.nn.RMSNorm(8).to(device, dtype)(torch.nn.LayerNorm(8).to(device, dtype)(x))
            x = torch.nn.functional.gelu(torch.nn.Linear(8, 8).to(device, dtype)(x))
            q = torch.nn.functional.silu(x).view(1, 2, 4, 4)
            allowed = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device).tril()
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=allowed)
    except (RuntimeError, NotImplementedError) as err:
        raise ValueError(f"dtype {dtype_name(dtype)} does not run on {device.type} with torch {torch.__version__} "
                         f"({str(err).splitlines()[0]}); use --dtype fp32 there") from err
    _CHECKED.add(key)


def add_dtype_arg(parser, default_help: str) -> None:
    """``--dtype bf16|fp16|fp32`` on an argparse parser (default None: ``default_help`` says what that means)."""
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=default_help)
