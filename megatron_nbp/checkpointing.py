"""Sharded training checkpoints with megatron-core dist_checkpointing, Megatron-LM layout.

    SAVE_DIR/
      latest_checkpointed_iteration.txt     <- "120": published last, atomically
      iter_0000120/                         <- dist_checkpointing directory (any TP/PP can load it)

A checkpoint is written into ``iter_XXXXXXX.tmp`` and, after every rank has finished, published by
rank 0 with :func:`nbp_common.files.publish_directory`: its files fsync-ed, the directory renamed to
``iter_XXXXXXX`` (the parent fsync-ed), and only then named in ``latest_checkpointed_iteration.txt``
(temp file, fsync, ``os.replace``). A crash at any moment leaves the previous checkpoint as latest;
what it left (staging directories, an orphan renamed aside, a pointer temporary) is removed by the
next save.

Contents: model and optimizer (sharded tensors), the LR scheduler, iteration and consumed samples
(common state, rank 0), per-rank RNG states (python, numpy, torch, megatron's model-parallel tracker)
as a ShardedObject indexed by (PP, TP, DP) rank, the model config (checked on load), the run's
training precision and optimizer kind (:class:`RunInfo`) and the run record (the whole resolved config
and the software versions, megatron_nbp.run_record: in the common state as ``run_record`` and as
``config.yaml`` / ``versions.json`` in the directory, written before it is published).

Precision. Weights are saved in the training precision (bf16 / fp16 weights, and under megatron's
mixed-precision optimizer their fp32 main copies as ``optimizer.state.fp32_param.*``). A checkpoint
resumes in any precision of the same optimizer family: bf16 <-> fp16 completely (main params, Adam
moments, the fp16 loss scaler where there is one); fp32 <-> bf16 / fp16 only without the optimizer
state (``load_optimizer=False``, the optimizer layouts differ), the weights then coming from the most
precise copy in the checkpoint (the fp32 main params of a bf16 / fp16 run, when saved per parameter).
The distributed optimizer saves its state in megatron's ``dp_reshardable`` format (resharding across
data-parallel sizes; TP / PP fixed for the optimizer state, the model reshards freely).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_nbp.run_record import write_run_record
from megatron_nbp.safe_loading import UnsafeCheckpointError, read_megatron_metadata, verify_megatron_checkpoint
from nbp_common.files import publish_directory, remove_leftovers, staging_path

LATEST_FILE = "latest_checkpointed_iteration.txt"
# Model settings that must match between a checkpoint and the model loading it.
_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
               "latent_shape", "block_shape", "layout", "untie_embeddings_and_output_weights", "normalization",
               "activation", "add_bias_linear", "condition_type", "condition_labels", "text_vocab_size",
               "num_condition_tokens", "null_condition", "position_embedding_type", "max_position_embeddings")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model."""


@dataclass(frozen=True)
class RunInfo:
    """How a megatron-backend run trains, stored in its checkpoints' common state: the precision
    ("fp32", "bf16" or "fp16") and whether the optimizer is megatron's distributed optimizer. A
    checkpoint written before these were recorded reads as fp32 with the plain optimizer."""

    precision: str = "fp32"
    use_distributed_optimizer: bool = False

    @property
    def optimizer_metadata(self) -> dict[str, str]:
        """megatron's ``sharded_state_dict`` metadata for the optimizer: the distributed optimizer in the
        ``dp_reshardable`` format (the one that loads with torch's Adam, the fallback without TE / Apex)."""
        return {"distrib_optim_sharding_type": "dp_reshardable"} if self.use_distributed_optimizer else {}

    @property
    def mixed_precision(self) -> bool:
        """True for bf16 / fp16 weights with fp32 main params (megatron's mixed-precision optimizer)."""
        return self.precision != "fp32"


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    """``save_dir/iter_XXXXXXX`` (7 digits, as Megatron-LM)."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def read_latest_iteration(load_dir: str | Path) -> int | None:
    """Iteration named in ``latest_checkpointed_iteration.txt``, or None if there is no checkpoint.

    Raises:
        CheckpointError: the file is unreadable or names a directory that does not exist.
    """
    path = Path(load_dir) / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} does not hold an iteration number: {text!r}")
    iteration = int(text)
    if not iteration_dir(load_dir, iteration).is_dir():
        raise CheckpointError(f"{path} names iteration {iteration} but {iteration_dir(load_dir, iteration)} is missing")
    return iteration


def rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch (CPU and CUDA) and megatron's model-parallel tracker."""
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state` on this rank."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(data: Any) -> ShardedObject:
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_data_parallel_world_size())
    rank = (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", data, (pp, tp, dp), rank, replica_id=0)


def unwrap(model):
    """The GPTModel inside megatron's DDP wrapper (checkpoint keys never carry the wrapper's prefix)."""
    return getattr(model, "module", model)


def _sharded_state(model, optimizer, is_loading: bool, run: RunInfo) -> dict[str, Any]:
    model_sd = unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=run.optimizer_metadata)
    return state


def save_checkpoint(save_dir: str | Path, iteration: int, model, optimizer, scheduler,
                    consumed_samples: int, model_config: dict[str, Any], run: RunInfo | None = None,
                    record: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Writes and publishes ``iter_XXXXXXX`` (see module doc).

    Args:
        model: the (DDP-wrapped) megatron model of this rank.
        optimizer: megatron optimizer; scheduler: OptimizerParamScheduler.
        consumed_samples: global training samples consumed so far (data position).
        model_config: ModelConfig as a dict, stored to check compatibility on load.
        run: precision and optimizer kind of the run (default: fp32, plain optimizer).
        record: the run record (megatron_nbp.run_record.run_record), stored in the common state and as
            ``config.yaml`` / ``versions.json`` in the directory; None: no record.

    Returns:
        The published iteration directory.
    """
    run = run or RunInfo()
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    tmp = staging_path(final)
    rank = dist.get_rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(save_dir, "iter_*.tmp", LATEST_FILE)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False, run=run)
    state["rng_state"] = _sharded_rng(rng_state())
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["model_config"] = model_config
    state["run"] = asdict(run)
    if record is not None:
        state["run_record"] = record
    dist_checkpointing.save(state, str(tmp))
    if rank == 0 and record is not None:
        write_run_record(tmp, record)  # staged with the checkpoint: published together or not at all
    dist.barrier()
    if rank == 0:
        publish_directory(tmp, final, save_dir / LATEST_FILE, str(iteration))
    dist.barrier()
    return final


def verify_checkpoint(ckpt: str | Path) -> None:
    """Check a ``torch_dist`` checkpoint directory before anything in it is unpickled
    (:func:`megatron_nbp.safe_loading.verify_megatron_checkpoint`: torch.distributed.checkpoint would
    unpickle its bytes items with ``weights_only=False``).

    Raises:
        CheckpointError: a pickled item needs more than tensors and plain data, or a file or the index
            is missing or truncated; the message names the checkpoint.
    """
    try:
        verify_megatron_checkpoint(ckpt)
    except UnsafeCheckpointError as err:
        raise CheckpointError(f"checkpoint {ckpt}: {err}") from err
    except (Exception, CheckpointException) as err:  # a missing / truncated file or index
        raise CheckpointError(f"checkpoint {ckpt} is damaged or does not fit this model: {err}") from err


@dataclass(frozen=True)
class OpenCheckpoint:
    """The latest checkpoint of a ``--load`` directory, verified (:func:`verify_checkpoint`) and its
    common state read; its tensors not yet loaded (:func:`restore_checkpoint`).

    Attributes:
        path: the ``iter_XXXXXXX`` directory; iteration: its iteration.
        common: the common state (iteration, consumed_samples, scheduler, model_config, run).
        run: precision and optimizer kind it was written with.
        layout: (TP, PP, DP) sizes of the run that wrote it (from its per-rank RNG states' global
            shape), or None when it holds no RNG states.
    """

    path: Path
    iteration: int
    common: dict[str, Any]
    run: RunInfo
    layout: tuple[int, int, int] | None


_RNG_KEY = re.compile(r"^rng_state/shard_[0-9.]+_([0-9]+)\.([0-9]+)\.([0-9]+)$")


def saved_layout(ckpt: str | Path) -> tuple[int, int, int] | None:
    """(TP, PP, DP) sizes of the run that wrote ``ckpt``, read from the index key of its per-rank RNG
    states (a ShardedObject of global shape (PP, TP, DP)); None if it holds none. ``ckpt`` must have
    passed :func:`verify_checkpoint`."""
    for key in read_megatron_metadata(ckpt).state_dict_metadata:
        match = _RNG_KEY.match(key)
        if match:
            pp, tp, dp = (int(g) for g in match.groups())
            return tp, pp, dp
    return None


def open_checkpoint(load_dir: str | Path) -> OpenCheckpoint | None:
    """Collective-free: find, verify and read the header of the latest checkpoint in ``load_dir``.

    Returns:
        the :class:`OpenCheckpoint`, or None when ``load_dir`` holds no checkpoint.

    Raises:
        CheckpointError: ``load_dir`` holds a DeepSpeed checkpoint; the pointer names a missing
            directory; a file is damaged or a pickled item in it needs more than tensors and plain data.
    """
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        if (Path(load_dir) / "latest").is_file():
            raise CheckpointError(f"{load_dir} holds a DeepSpeed checkpoint; resume it with --backend deepspeed "
                                  "(convert_checkpoint.py exports either kind)")
        return None
    ckpt = iteration_dir(load_dir, iteration)
    verify_checkpoint(ckpt)
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as err:  # missing / truncated common.pt or metadata
        raise CheckpointError(f"checkpoint {ckpt} (named by {LATEST_FILE}) is unreadable: {err}") from err
    return OpenCheckpoint(ckpt, iteration, common, RunInfo(**common.get("run", {})), saved_layout(ckpt))


def load_checkpoint(load_dir: str | Path, model, optimizer, scheduler, model_config: dict[str, Any],
                    load_optimizer: bool = True, load_rng: bool = True,
                    run: RunInfo | None = None) -> tuple[int, int]:
    """Collective: restore the latest checkpoint in ``load_dir`` into model / optimizer / scheduler
    (:func:`open_checkpoint` + :func:`restore_checkpoint`).

    Returns:
        (iteration, consumed_samples); (0, 0) when ``load_dir`` holds no checkpoint.

    Raises:
        CheckpointError: see :func:`open_checkpoint` and :func:`restore_checkpoint`.
    """
    opened = open_checkpoint(load_dir)
    if opened is None:
        return 0, 0
    return restore_checkpoint(opened, model, optimizer, scheduler, model_config, load_optimizer, load_rng, run)


def restore_checkpoint(opened: OpenCheckpoint, model, optimizer, scheduler, model_config: dict[str, Any],
                       load_optimizer: bool = True, load_rng: bool = True,
                       run: RunInfo | None = None) -> tuple[int, int]:
    """Collective: load an :class:`OpenCheckpoint` into model / optimizer / scheduler.

    The checkpoint may have been written with another TP/PP/DP layout (dist_checkpointing reshards);
    the RNG states then cannot be matched to ranks, so pass ``load_rng=False``
    (:func:`megatron_nbp.restore.what_to_restore` decides). It may have been written in another
    precision (module doc): weights load in any case; the optimizer state only within the same
    optimizer family. The LR scheduler is restored with the optimizer.

    Args:
        run: precision and optimizer kind of the loading run (default: fp32, plain optimizer).

    Returns:
        (iteration, consumed_samples) of the checkpoint.

    Raises:
        CheckpointError: the checkpoint's model settings differ from ``model_config``; its optimizer
            state cannot be loaded by this run's optimizer (fp32 vs bf16 / fp16, distributed or not);
            a file is damaged or holds tensors of other shapes.
    """
    run = run or RunInfo()
    ckpt, common, saved = opened.path, opened.common, opened.run
    check_model_config(common.get("model_config", {}), model_config, ckpt)
    if load_optimizer:
        check_optimizer_compatible(saved, run, ckpt)
    if load_optimizer and run.use_distributed_optimizer:
        init_distributed_optimizer_state(optimizer)
    state = _sharded_state(model, optimizer if load_optimizer else None, is_loading=True, run=run)
    if not load_optimizer and not run.mixed_precision and saved.mixed_precision:
        read_weights_from_main_params(state["model"], ckpt)
    if load_rng:
        state["rng_state"] = _sharded_rng(None)
    try:
        loaded = dist_checkpointing.load(state, str(ckpt))
    except (Exception, CheckpointException) as err:  # a damaged/missing shard file, tensors of other shapes
        # (torch.distributed.checkpoint's CheckpointException is a BaseException)
        lines = [line for line in str(err).strip().splitlines() if line.strip()]  # torch.dcp nests tracebacks
        raise CheckpointError(f"checkpoint {ckpt} is damaged or does not fit this model: "
                              f"{lines[-1].strip() if lines else type(err).__name__}") from err
    unwrap(model).load_state_dict(loaded["model"])
    if load_optimizer:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        if run.use_distributed_optimizer:
            restore_step_counts(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
    elif optimizer is not None and run.mixed_precision:
        optimizer.reload_model_params()  # fp32 main params from the loaded weights
    if load_rng:
        set_rng_state(loaded["rng_state"])
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


def init_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh megatron distributed optimizer (or each one of a ChainedOptimizer) the Adam state
    entries its ``sharded_state_dict`` reads, before a checkpoint is loaded into them: torch's Adam (the
    optimizer without TE / Apex) creates its state, the step count included, only at its first step, and
    megatron's ``DistributedOptimizer.state_dict`` needs one step count. megatron's own
    ``_init_optimizer_states_with_dummy_values`` (one step on zero gradients); the values are replaced
    by the loaded ones. A no-op for an optimizer that has stepped."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def restore_step_counts(optimizer) -> None:
    """Give each parameter's Adam state its own, loaded step count after megatron's distributed optimizer
    loaded a checkpoint into torch's Adam (the optimizer without TE / Apex). Its ``load_state_dict``
    carries the saved step count in each parameter group (``step``) but leaves the per-parameter
    ``step`` of torch's Adam at the value it had before the load (and would share one tensor among all
    parameters, which torch's Adam increments in place once per parameter): the bias correction of every
    later step would be wrong."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in (inner.param_groups if inner is not None else ()):
            if "step" not in group or group["step"] is None:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def check_optimizer_compatible(saved: RunInfo, run: RunInfo, where: Any) -> None:
    """Refuse to load the optimizer state of a checkpoint (``where``) written by another optimizer family.

    Raises:
        CheckpointError: fp32 vs bf16 / fp16 (megatron's fp32 optimizer vs its mixed-precision optimizer
            with fp32 main params), or the distributed optimizer vs the plain one.
    """
    if saved.use_distributed_optimizer != run.use_distributed_optimizer:
        raise CheckpointError(
            f"checkpoint {where} was written {'with' if saved.use_distributed_optimizer else 'without'} "
            f"--use-distributed-optimizer and this run is {'with' if run.use_distributed_optimizer else 'without'} "
            "it: the optimizer state layouts differ; resume with the same setting")
    if saved.mixed_precision != run.mixed_precision:
        raise CheckpointError(
            f"checkpoint {where} was trained in {saved.precision} and this run is {run.precision}: megatron's "
            f"{'mixed-precision' if saved.mixed_precision else 'fp32'} optimizer state does not load into the "
            f"{'mixed-precision' if run.mixed_precision else 'fp32'} optimizer; resume in "
            f"{'bf16 or fp16' if saved.mixed_precision else 'fp32'}, or load the weights only (without the "
            "optimizer state)")


def read_weights_from_main_params(model_sd: dict[str, Any], ckpt: Path) -> None:
    """Point each model tensor of ``model_sd`` (megatron ShardedTensors, loaded in place) at the fp32 main
    copy a mixed-precision checkpoint ``ckpt`` holds (``optimizer.state.fp32_param.<key>``, written by
    megatron's mixed-precision optimizer; not by the distributed optimizer, whose state is flat), where
    it has one: the weights then load at full precision."""
    from megatron.core.dist_checkpointing import ShardedTensor

    saved = set(read_megatron_metadata(ckpt).state_dict_metadata)
    for name, item in list(model_sd.items()):
        if isinstance(item, ShardedTensor) and f"optimizer.state.fp32_param.{item.key}" in saved:
            model_sd[name] = dataclasses_replace(item, key=f"optimizer.state.fp32_param.{item.key}")


def check_model_config(saved: dict[str, Any], model_config: dict[str, Any], where: Any) -> None:
    """Refuse a checkpoint (``where``) whose saved model settings differ in shape from ``model_config``.

    Raises:
        CheckpointError: naming each differing setting.
    """
    if "share_embeddings_and_output_weights" in saved:  # written before untie_embeddings_and_output_weights
        saved = {**saved, "untie_embeddings_and_output_weights": not saved["share_embeddings_and_output_weights"]}
    diffs = {k: (saved.get(k), model_config.get(k)) for k in _SHAPE_KEYS
             if k in saved and _norm(saved.get(k)) != _norm(model_config.get(k))}
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} does not match the model: "
            + ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diffs.items())
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
