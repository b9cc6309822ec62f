"""DeepSpeed ZeRO training checkpoints, DeepSpeed's layout, published atomically:

    SAVE_DIR/
      latest                         <- "global_step120": written last, atomically (temp file + rename)
      global_step120/                <- engine.save_checkpoint: mp_rank_XX_model_states.pt (ZeRO-1/2) or
                                        zero_pp_rank_D_mp_rank_XX_model_states.pt (ZeRO-3), and
                                        zero_pp_rank_D_mp_rank_XX_optim_states.pt (fp32 master partitions)
        rng_state_RRRRR.pt           <- every global rank's RNG states
        nbp_checkpoint.json          <- iteration, consumed samples, layout (ZeRO stage, TP, DP), model config,
                                        run record (resolved config + versions, megatron_nbp.run_record)
        config.yaml, versions.json   <- the run record as files (nbp-pretrain --config config.yaml reruns it)

DeepSpeed writes into ``global_stepN.tmp`` (``save_latest=False``); after every rank has finished, rank
0 publishes it with :func:`nbp_common.files.publish_directory` (files fsync-ed, the directory renamed,
the parent fsync-ed) and only then names it in ``latest``, so a crash never leaves a half checkpoint as
the latest; what it left (staging directories, an orphan renamed aside, a temporary of ``latest``) is
removed by the next save.
``client_state`` carries the LR scheduler, iteration and consumed samples (data position).
Resuming needs the same TP size, and the same DP size unless without the optimizer
state (ZeRO-1/2; megatron_nbp.restore); ``launchers/convert_checkpoint.py`` turns any of these
checkpoints into the single-device inference format (megatron_nbp.inference.convert_zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nbp.checkpointing import LATEST_FILE, CheckpointError, check_model_config, rng_state, set_rng_state
from megatron_nbp.run_record import write_run_record
from megatron_nbp.safe_loading import UnsafeCheckpointError, safe_torch_load, use_weights_only_loading
from nbp_common.files import atomic_write_bytes, publish_directory, remove_leftovers, staging_path

LATEST_TAG_FILE = "latest"
META_FILE = "nbp_checkpoint.json"


def tag_name(iteration: int) -> str:
    """DeepSpeed's default tag for an iteration: ``global_stepN``."""
    return f"global_step{iteration}"


def is_deepspeed_checkpoint(load_dir: str | Path) -> bool:
    """True if ``load_dir`` holds a DeepSpeed checkpoint written by this module (a ``latest`` tag file)."""
    return (Path(load_dir) / LATEST_TAG_FILE).is_file()


def read_latest_tag(load_dir: str | Path) -> str | None:
    """The tag named in ``load_dir/latest``, or None if there is none.

    Raises:
        CheckpointError: the tag's directory or its metadata file is missing.
    """
    path = Path(load_dir) / LATEST_TAG_FILE
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(load_dir) / tag / META_FILE).is_file():
        raise CheckpointError(f"{path} names {tag!r} but {Path(load_dir) / tag / META_FILE} is missing")
    return tag


def read_meta(load_dir: str | Path, tag: str) -> dict[str, Any]:
    """The ``nbp_checkpoint.json`` of checkpoint ``tag`` (iteration, consumed_samples, zero_stage,
    tensor_model_parallel_size, data_parallel_size, model_config).

    Raises:
        CheckpointError: the checkpoint directory or its metadata is missing.
    """
    path = Path(load_dir) / tag / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (not a megatron-nbp DeepSpeed checkpoint?)")
    return json.loads(path.read_text())


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rng_state_{rank:05d}.pt"


def save_deepspeed_checkpoint(save_dir: str | Path, iteration: int, engine, scheduler, consumed_samples: int,
                              model_config: dict[str, Any], zero_stage: int,
                              record: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Writes and publishes ``global_stepN`` (see module doc).

    Args:
        engine: the DeepSpeedEngine; scheduler: OptimizerParamScheduler.
        consumed_samples: global training samples consumed so far (data position).
        model_config: ModelConfig as a dict (checked on load, read by the converter).
        record: the run record (megatron_nbp.run_record.run_record), stored in ``nbp_checkpoint.json`` and
            as ``config.yaml`` / ``versions.json``; None: no record.

    Returns:
        The published checkpoint directory.
    """
    save_dir = Path(save_dir)
    tag = tag_name(iteration)
    final = save_dir / tag
    tmp_tag = staging_path(final).name
    rank = dist.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(save_dir, "global_step*.tmp", LATEST_TAG_FILE)
    dist.barrier()
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples,
                    "scheduler": scheduler.state_dict()}
    engine.save_checkpoint(str(save_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), _rng_file(save_dir / tmp_tag, rank))
    if rank == 0:
        meta = {"format": "megatron-nbp-deepspeed/1", "iteration": iteration, "consumed_samples": consumed_samples,
                "zero_stage": zero_stage,
                "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                "world_size": dist.get_world_size(), "model_config": model_config}
        if record is not None:
            meta["run_record"] = record
            write_run_record(save_dir / tmp_tag, record)  # staged: published with the checkpoint or not at all
        atomic_write_bytes(save_dir / tmp_tag / META_FILE, json.dumps(meta, indent=1).encode())
    dist.barrier()
    if rank == 0:
        publish_directory(save_dir / tmp_tag, final, save_dir / LATEST_TAG_FILE, tag)
    dist.barrier()
    return final


def load_deepspeed_checkpoint(load_dir: str | Path, engine, scheduler, model_config: dict[str, Any],
                              load_optimizer: bool = True, load_rng: bool = True, weights_only: bool = False,
                              same_layout: bool = True) -> tuple[int, int]:
    """Collective: restore the latest checkpoint in ``load_dir`` into the engine (module, ZeRO optimizer
    partitions), the scheduler and this rank's RNG states.

    Args:
        load_optimizer: restore the ZeRO optimizer state and the LR schedule (False: DeepSpeed's
            ``load_optimizer_states=False``; the fp32 master weights are then refreshed from the loaded
            weights, DeepSpeed's ``_restore_from_bit16_weights``).
        load_rng: restore this rank's RNG states.
        weights_only: only the module (DeepSpeed's ``load_module_only``: no optimizer, no step counters;
            ``--finetune``).
        same_layout: refuse a checkpoint of another TP or DP size (False: the caller has checked the
            layout change, :func:`megatron_nbp.restore.what_to_restore`).

    Returns:
        (iteration, consumed_samples); (0, 0) when ``load_dir`` holds no checkpoint.

    Raises:
        CheckpointError: ``load_dir`` holds a megatron-backend checkpoint; the checkpoint's model
            settings differ from this run, or (``same_layout``) its TP size or DP size; DeepSpeed could not
            load it; this rank's RNG file is missing; or a file would need unpickling more than tensors and
            plain data (megatron_nbp.safe_loading: refused before anything in it runs).
    """
    tag = read_latest_tag(load_dir)
    if tag is None:
        if (Path(load_dir) / LATEST_FILE).is_file():
            raise CheckpointError(f"{load_dir} holds a megatron-backend checkpoint; resume it with --backend megatron "
                                  "(convert_checkpoint.py exports either kind)")
        return 0, 0
    meta = read_meta(load_dir, tag)
    ckpt = Path(load_dir) / tag
    check_model_config(meta.get("model_config", {}), model_config, ckpt)
    layout = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size())
    saved = (meta["tensor_model_parallel_size"], meta["data_parallel_size"])
    if same_layout and saved != layout:
        raise CheckpointError(f"{ckpt} was written with TP={saved[0]} DP={saved[1]}; this run has TP={layout[0]} "
                              f"DP={layout[1]}. Resume with the same layout (convert_checkpoint.py exports any layout)")
    use_weights_only_loading(engine)  # DeepSpeed itself would torch.load(weights_only=False)
    try:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_module_only=weights_only,
                                                    load_optimizer_states=load_optimizer and not weights_only,
                                                    load_lr_scheduler_states=False)
    except UnsafeCheckpointError as err:
        raise CheckpointError(f"checkpoint {ckpt}: {err}") from err
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    if load_optimizer and not weights_only:
        scheduler.load_state_dict(client_state["scheduler"])
    if load_rng:
        try:
            rng = load_rng_file(_rng_file(ckpt, dist.get_rank()))
        except UnsafeCheckpointError as err:
            raise CheckpointError(f"checkpoint {ckpt}: {err}") from err
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {err}") from err
        set_rng_state(rng)
    return int(meta["iteration"]), int(meta["consumed_samples"])


def load_rng_file(path) -> dict:
    """Read a per-rank RNG file weights-only (tensors, plain containers and the numpy pieces of
    ``np.random.get_state()``; megatron_nbp.safe_loading), never code."""
    return safe_torch_load(path)
