"""Import a tokenizer checkpoint of the official NBP release (Ren et al. 2025, ``nbp/magvit2.py``).

The release's MAGVITv2 (``VideoTokenizer(embed_dim=6, fsq_levels=[8,8,8,5,5,5], use_fsq=True)``, loaded by
its ``load_magvit2``) is the same causal 3D CNN as ours, layer for layer, with four differences that our
:class:`TokenizerConfig` expresses as switches (:func:`official_nbp_config` sets them):

1. Swish with a learned per-channel slope ``beta`` (``activation="swish_learned"``);
2. causal padding via ``F.pad(mode="replicate")`` on all axes, i.e. spatially replicated borders
   (``spatial_pad_mode="replicate"``);
3. decoder upsampling convs keep the current width (``decoder_upsample="current"``);
4. its depth-to-space reads channels as ``(t_block, h_block, w_block, c_out)`` where ours reads
   ``(c_out, t_block, h_block, w_block)`` - fixed here by permuting the output channels of the conv that
   feeds each depth-to-space (same math, no config switch).

The FSQ of the release is the FSQ paper's ``(1 - eps)`` / ``tan`` bound (older ``vector-quantize-pytorch``),
which is what :class:`~data_prep.tokenizer.fsq.FSQ` implements; with ``embed_dim == len(levels) == 6`` it has
no projections, and its index order (first channel least significant) is ours.

Key mapping (after dropping a DDP ``module.`` prefix)::

    encoder_layers.{i}.*                 -> encoder.layers.{i}.*      (same indices; decoder likewise)
    *.fn.0.* / fn.3.*                    -> *.norm1.* / norm2.*       (GroupNorm3D)
    *.fn.1.beta / fn.4.beta              -> *.act1.beta / act2.beta   (Swish)
    *.fn.2.conv.* / fn.5.conv.*          -> *.conv1.conv.* / conv2.conv.*
    *.residual_fn.0.conv.*               -> *.skip.*                  (1x1x1 conv)

Usage::

    python -m data_prep.tokenizer.official_import --checkpoint magvit2.pt --output tokenizer.safetensors
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import save_tokenizer
from .config import TokenizerConfig
from .layers import DepthToSpace3d
from .model import VideoTokenizer

__all__ = ["official_nbp_config", "convert_official_state_dict", "load_official_tokenizer", "read_official_state_dict"]

_IGNORED = re.compile(r"^(zero|quantizers\.(_levels|_basis|implicit_codebook|zero))$")
_RESIDUAL = [
    (re.compile(r"\.fn\.0\."), ".norm1."),
    (re.compile(r"\.fn\.1\.beta$"), ".act1.beta"),
    (re.compile(r"\.fn\.2\.conv\."), ".conv1.conv."),
    (re.compile(r"\.fn\.3\."), ".norm2."),
    (re.compile(r"\.fn\.4\.beta$"), ".act2.beta"),
    (re.compile(r"\.fn\.5\.conv\."), ".conv2.conv."),
    (re.compile(r"\.residual_fn\.0\.conv\."), ".skip."),
]


def official_nbp_config(base_channels: int = 128, norm_groups: int = 32) -> TokenizerConfig:
    """Our config for the official NBP MAGVITv2 layout (widths base * [1, 2, 2, 4], 4 + 4 residual units).

    The defaults (128, 32) are the released model: 370.4M parameters, the paper's "370M" MAGVITv2
    (``configs/tokenizer/magvit2_official.yaml``); smaller values give the same layout at toy widths (tests).
    """
    return TokenizerConfig(
        base_channels=base_channels, channel_multipliers=[1, 2, 2, 4], num_res_blocks=4, num_mid_blocks=4,
        levels=[8, 8, 8, 5, 5, 5], in_channels=3, temporal_downsample=[False, True, True],
        norm_groups=norm_groups, pad_mode="replicate", spatial_pad_mode="replicate",
        activation="swish_learned", decoder_upsample="current",
    )


def _depth_to_space_convs(model: VideoTokenizer) -> dict[str, tuple[int, int, int]]:
    """Names (``decoder.layers.{i}.conv``) of the convs feeding a DepthToSpace3d -> its factors."""
    out = {}
    layers = list(model.decoder.layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, DepthToSpace3d):
            out[f"decoder.layers.{i - 1}.conv"] = layer.factors
    return out


def _permute_depth_to_space(tensor: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Reorder dim 0 from the release's ``(st, sh, sw, c_out)`` to our ``(c_out, st, sh, sw)``."""
    st, sh, sw = factors
    rest = tensor.shape[1:]
    c_out = tensor.shape[0] // (st * sh * sw)
    return tensor.reshape(st, sh, sw, c_out, *rest).permute(3, 0, 1, 2, *range(4, 4 + len(rest))).reshape(
        tensor.shape).contiguous()


def convert_official_state_dict(
    state: Mapping[str, torch.Tensor], model: VideoTokenizer
) -> dict[str, torch.Tensor]:
    """Rename (and permute where needed) an official-layout state dict to ``model``'s names.

    Args:
        state: the release's ``model_state_dict`` (optionally with ``module.`` prefixes).
        model: a :class:`VideoTokenizer` built from :func:`official_nbp_config` (any width).

    Returns:
        A state dict loadable with ``model.load_state_dict(..., strict=True)``.

    Raises:
        ValueError: keys that have no counterpart (e.g. FSQ projections, a conditioning MLP, LFQ), missing
            keys, or shape mismatches - each listed.
    """
    targets = model.state_dict()
    d2s = _depth_to_space_convs(model)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if _IGNORED.match(name):
            continue
        new = re.sub(r"^encoder_layers\.", "encoder.layers.", name)
        new = re.sub(r"^decoder_layers\.", "decoder.layers.", new)
        for pattern, repl in _RESIDUAL:
            new = pattern.sub(repl, new)
        if new not in targets:
            unknown.append(key)
            continue
        tensor = value.detach().to(torch.float32)
        prefix = new.rsplit(".", 1)[0]
        if prefix in d2s:
            tensor = _permute_depth_to_space(tensor, d2s[prefix])
        if tensor.shape != targets[new].shape:
            raise ValueError(f"{key} -> {new}: shape {tuple(tensor.shape)} != expected {tuple(targets[new].shape)}")
        out[new] = tensor
    missing = sorted(set(targets) - set(out))
    if unknown or missing:
        raise ValueError(f"official checkpoint does not match the NBP MAGVITv2 layout: unmapped keys {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}, missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return out


def read_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an official checkpoint: a ``torch.save`` package with ``model_state_dict`` (read with
    ``weights_only=True``: tensors and plain containers only, no code), or a ``.safetensors`` file.

    Raises:
        FileNotFoundError: no file. ValueError: no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official tokenizer checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    package = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(package, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(package.get(key), dict):
                return package[key]
        if all(isinstance(v, torch.Tensor) for v in package.values()):
            return package
    raise ValueError(f"{path}: no model_state_dict / state_dict in the checkpoint")


def load_official_tokenizer(
    path: str | os.PathLike, device: str | torch.device = "cpu", norm_groups: int = 32
) -> VideoTokenizer:
    """Build our :class:`VideoTokenizer` with the released NBP MAGVITv2 weights (eval mode).

    Videos in [-1, 1], ``encode`` / ``decode`` as for any of our tokenizers; indices equal the release's.
    The width is read from the first conv; ``norm_groups`` is the release's 32 (GroupNorm3D(32, C)).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_official_state_dict`, :func:`convert_official_state_dict`.
    """
    state = read_official_state_dict(path)
    width = next((v.shape[0] for k, v in state.items() if k.endswith("encoder_layers.0.conv.weight")), 128)
    model = VideoTokenizer(official_nbp_config(base_channels=int(width), norm_groups=norm_groups))
    model.load_state_dict(convert_official_state_dict(state, model), strict=True)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert an official NBP MAGVITv2 checkpoint to this project's format")
    parser.add_argument("--checkpoint", required=True, help="official .pt (torch.save package) or .safetensors")
    parser.add_argument("--output", required=True, help="our tokenizer checkpoint to write (.safetensors)")
    args = parser.parse_args(argv)
    model = load_official_tokenizer(args.checkpoint)
    save_tokenizer(model, args.output, extra_metadata={"imported_from": "NBP official magvit2", "source": str(args.checkpoint)})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
