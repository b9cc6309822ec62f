"""The run record every training checkpoint carries: the resolved config of the run (every field of
:class:`~megatron_nbp.config.NBPConfig`, after the YAML layers and the command-line flags) and the
versions of the software that trained it (Python, torch, megatron-core, DeepSpeed, megatron-nbp).

It is stored twice, inside the checkpoint's own state (megatron: the common state dict's ``run_record``;
DeepSpeed: ``nbp_checkpoint.json``) and as two files in the checkpoint directory, written into the
staging directory before :func:`nbp_common.files.publish_directory` publishes it, so a checkpoint is
never published without them:

    iter_0000120/config.yaml     <- NBPConfig.from_yaml reads it back: nbp-pretrain --config it = the same run
    iter_0000120/versions.json   <- {"python": ..., "torch": ..., "megatron-core": ..., "deepspeed": ...,
                                     "megatron-nbp": ...}; null for a package that is not installed

Checkpoints written before the record existed have neither; nothing requires them.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from nbp_common.files import atomic_write_text

__all__ = ["CONFIG_FILE", "VERSIONS_FILE", "package_versions", "run_record", "write_run_record",
           "read_run_record"]

CONFIG_FILE = "config.yaml"
VERSIONS_FILE = "versions.json"
#: distribution names whose versions are recorded (importlib.metadata; nothing is imported)
_PACKAGES = ("torch", "megatron-core", "deepspeed", "megatron-nbp")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that shape a training run, read from the installed
    distributions' metadata (DeepSpeed is not imported). A package that is not installed reads None;
    megatron-nbp run from a source tree that is not installed reads ``megatron_nbp.__version__``."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["megatron-nbp"] is None:
        from megatron_nbp import __version__

        versions["megatron-nbp"] = __version__
    return versions


def run_record(cfg) -> dict[str, Any]:
    """``{"config": cfg.to_dict(), "versions": package_versions()}`` for an NBPConfig ``cfg``: plain,
    JSON- and YAML-safe data (what a checkpoint's common state may hold, megatron_nbp.safe_loading)."""
    return {"config": cfg.to_dict(), "versions": package_versions()}


def write_run_record(folder: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` (from :func:`run_record`) as ``folder/config.yaml`` (the config, with the versions
    as comments on top) and ``folder/versions.json``, each atomically (nbp_common.files)."""
    folder = Path(folder)
    versions = record["versions"]
    header = ("# Resolved config of the run that wrote this checkpoint (every field, after --config layers and "
              "flags).\n# Rerun it: nbp-pretrain --config config.yaml\n"
              + "".join(f"# {name}: {version}\n" for name, version in versions.items()))
    atomic_write_text(folder / CONFIG_FILE, header + yaml.safe_dump(record["config"], sort_keys=False))
    atomic_write_text(folder / VERSIONS_FILE, json.dumps(versions, indent=1) + "\n")


def read_run_record(folder: str | Path) -> dict[str, Any] | None:
    """The record a checkpoint directory holds as files, ``{"config": dict, "versions": dict}``, or None
    for a checkpoint written before records existed (no ``config.yaml``).

    Raises:
        OSError, ValueError: the files exist but cannot be read or parsed.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        return None
    versions_path = folder / VERSIONS_FILE
    return {"config": yaml.safe_load((folder / CONFIG_FILE).read_text()),
            "versions": json.loads(versions_path.read_text()) if versions_path.is_file() else {}}
