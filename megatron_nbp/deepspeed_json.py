"""Which keys of a DeepSpeed JSON (``--deepspeed-config``, ``deepspeed.config_file``) the project uses.

The DeepSpeed engine config is built from the NBP config (megatron_nbp.training.deepspeed_backend.
deepspeed_config); from the file only ``zero_optimization`` is merged in. Any other top-level key would
be dropped, so it is checked here, by name:

- refused (:data:`REFUSED`): keys that change what is trained (batch sizes, precision, optimizer, LR
  schedule, clipping, gradient communication, recomputation, checkpoints). Training while ignoring them
  would silently train another run than the file describes, and a warning scrolls away in the log of a
  job of days; the message names the NBP flag that sets the same thing.
- warned about (:data:`WARNED`): keys that change only what is logged or profiled; the run is the same
  without them. The warning names the NBP option that logs instead.
- any other key (a misspelling, a DeepSpeed feature the project does not wire up): refused, as an
  unknown key of the YAML config is.

Keys starting with ``_`` are comments (the shipped configs' ``_comment``) and pass.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["USED", "REFUSED", "WARNED", "check_deepspeed_json"]

#: the top-level keys the backend reads from the file
USED = ("zero_optimization",)

_PRECISION = "use --bf16 / --fp16 / --fp32 (fp16 loss scaling: --loss-scale, --initial-loss-scale, --min-loss-scale, " \
             "--loss-scale-window, --hysteresis)"
_OPTIMIZER = "use --lr, --adam-beta1, --adam-beta2, --adam-eps, --weight-decay (the backend builds AdamW itself)"
_SCHEDULE = "use --lr-warmup-iters, --lr-decay-style, --min-lr, --train-iters (megatron's OptimizerParamScheduler)"
_SET_BY_NBP = "it is set by the DeepSpeed backend itself (megatron_nbp.training.deepspeed_backend.deepspeed_config)"
_NOT_WIRED = "it is not supported by megatron-nbp's DeepSpeed backend; remove it"

#: key -> the NBP flag(s) to use instead, or why it cannot be used (refused when present)
REFUSED: dict[str, str] = {
    "train_batch_size": "use --global-batch-size",
    "train_micro_batch_size_per_gpu": "use --micro-batch-size",
    "gradient_accumulation_steps": "use --global-batch-size and --micro-batch-size (accumulation = global / "
                                   "(micro x DP))",
    "gradient_clipping": "use --clip-grad",
    "bf16": _PRECISION,
    "fp16": _PRECISION,
    "amp": _PRECISION,
    "data_types": _PRECISION,
    "communication_data_type": _PRECISION,
    "optimizer": _OPTIMIZER,
    "scheduler": _SCHEDULE,
    "activation_checkpointing": "use --recompute-granularity, --recompute-method, --recompute-num-layers",
    "pipeline": "use --backend megatron with --pp (the DeepSpeed backend runs no pipeline parallelism)",
    "checkpoint": "use --save, --save-interval, --load (megatron_nbp.deepspeed_checkpointing)",
    "zero_allow_untested_optimizer": _SET_BY_NBP,
    "zero_force_ds_cpu_optimizer": _SET_BY_NBP,
    "prescale_gradients": _NOT_WIRED,
    "gradient_predivide_factor": _NOT_WIRED,
    "sparse_gradients": _NOT_WIRED,
    "elasticity": _NOT_WIRED,
    "compression_training": _NOT_WIRED,
    "data_efficiency": _NOT_WIRED,
    "curriculum_learning": _NOT_WIRED,
}

_LOG_LINES = "the iteration lines (--log-interval) and TensorBoard (--tensorboard-dir)"
#: key -> what the project logs instead (warned about when present)
WARNED: dict[str, str] = {
    "wandb": "--wandb-project (with --wandb-exp-name, --wandb-save-dir)",
    "tensorboard": "--tensorboard-dir",
    "csv_monitor": "--tensorboard-dir",
    "comet": "--tensorboard-dir",
    "steps_per_print": _LOG_LINES,
    "wall_clock_breakdown": _LOG_LINES,
    "memory_breakdown": _LOG_LINES + " (peak GPU memory on every logged iteration)",
    "dump_state": _LOG_LINES,
    "flops_profiler": "the iteration lines' TFLOP/s per GPU and MFU (megatron_nbp.flops)",
    "comms_logger": _LOG_LINES,
}


def check_deepspeed_json(path: str | Path) -> tuple[list[str], list[str]]:
    """Check the top-level keys of the DeepSpeed JSON at ``path`` (module doc).

    Returns:
        (problems, warnings): one line per refused key (naming the key, the file and the NBP flag to use)
        and per key that is ignored with a warning; problems also hold an unreadable file or a top level
        that is not a JSON object.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return [f"deepspeed.config_file={str(path)!r}: {exc}"], []
    if not isinstance(raw, dict):
        return [f"{path}: a DeepSpeed config must be a JSON object, got {type(raw).__name__}"], []
    problems, warnings = [], []
    for key in raw:
        if key in USED or key.startswith("_"):
            continue
        if key in WARNED:
            warnings.append(f"{path}: {key!r} is ignored (it only changes logging); megatron-nbp logs with "
                            f"{WARNED[key]}")
        elif key in REFUSED:
            problems.append(f"{path}: {key!r} is not read from a DeepSpeed JSON (only zero_optimization is): "
                            f"{REFUSED[key]}")
        else:
            problems.append(f"{path}: unknown key {key!r}: megatron-nbp reads only zero_optimization from a "
                            "DeepSpeed JSON")
    return problems, warnings
