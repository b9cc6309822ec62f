"""The NBP training job both backends share (Megatron-LM's ``pretrain`` / ``train`` structure):
:func:`pretrain` checks the config and data (:func:`start_job`), builds the chosen
:class:`~megatron_nbp.training.backend.TrainingBackend`, resumes (:meth:`~TrainingBackend.load`), opens
the data stream (:func:`build_data_iterator`) and runs :func:`training_loop`: iterations, the non-finite
fault policy, Megatron-style logging, the save / exit cadence.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.data import check_manifest, condition_key, micro_batches
from megatron_nbp.data_blend import build_token_stream
from megatron_nbp.device import DevicePlan, device_plan
from megatron_nbp.layouts import LayoutBatch
from megatron_nbp.model.params import count_parameters, format_count
from megatron_nbp.parallel import initialize_parallel, is_logging_rank, print_rank_0
from megatron_nbp.restore import Restored
from megatron_nbp.training.backend import TrainingBackend
from megatron_nbp.training.deepspeed_backend import DeepSpeedBackend
from nbp_common.exit_control import ExitControl
from megatron_nbp.training.megatron_backend import MegatronBackend
from megatron_nbp.training.profiling import IterationProfiler, ProfileWindow
from megatron_nbp.training.samples import TrainingSamples
from megatron_nbp.training.validation import Validation
from megatron_nbp.training_log import TrainingLogger

#: ``train.backend`` -> its TrainingBackend class
BACKENDS: dict[str, type[TrainingBackend]] = {cls.name: cls for cls in (MegatronBackend, DeepSpeedBackend)}


def pretrain(cfg: NBPConfig) -> list[float]:
    """The training job (launchers/pretrain_nbp.py) with the backend ``cfg.train.backend`` names:
    returns the per-iteration losses seen on the logging rank (empty elsewhere). Resumes from
    ``cfg.load`` if it holds a checkpoint.

    Raises:
        ConfigError, DataError, ValueError: see :func:`start_job` (before any process group or allocation).
        CheckpointError: a ``cfg.load`` checkpoint that is damaged or does not fit the run.
        FloatingPointError: see :func:`training_loop`.
    """
    exit_control = ExitControl.for_run(cfg)  # signals caught and the clock running from here, as in Megatron-LM
    plan, dp_size, num_microbatches = start_job(cfg)  # validates cfg, train.backend included
    backend = BACKENDS[cfg.train.backend](cfg)
    backend.build(plan)
    print_rank_0(backend.describe(dp_size, num_microbatches))
    iteration, consumed = 0, 0
    if cfg.load:
        restored = backend.load()
        report_resume(cfg, restored)
        if restored is not None:
            iteration, consumed = restored.iteration, restored.consumed
    data_iterator = build_data_iterator(cfg, consumed)
    return training_loop(cfg, backend, data_iterator, num_microbatches, iteration, consumed, exit_control)


def start_job(cfg: NBPConfig) -> tuple[DevicePlan, int, int]:
    """What both backends do before building a model: validate the config, check the data manifest
    against the model (no process group or allocation yet), choose the device and start the process
    groups (TP x PP from ``cfg.parallel``; PP is 1 with the DeepSpeed backend, validation refuses more),
    refuse what this device cannot run, print the parameter count.

    Returns:
        (device plan, data-parallel size, micro-batches per iteration).

    Raises:
        ConfigError, DataError, ValueError: a bad config, mismatched data, or no ``--data`` / ``--data-path``.
    """
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    check_device_support(cfg, device_plan())
    for _weight, folder in cfg.data_folders():  # --data or --data-path; each folder before any model is built
        check_manifest(folder, cfg.model, cfg.train.tokenizer_sha256)
    if cfg.valid_data:
        check_manifest(cfg.valid_data, cfg.model, cfg.train.tokenizer_sha256)
    t = cfg.train
    p = cfg.parallel
    plan = initialize_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=t.seed)
    dp_size = parallel_state.get_data_parallel_world_size()
    count = count_parameters(cfg.model)
    print_rank_0(f"> parameters: transformer {format_count(count.transformer)}, total {format_count(count.total)}")
    print_rank_0(f"> device: {plan.device} ({plan.distributed_backend}) | precision "
                 f"{plan.resolve_precision(t.precision)}")
    for line in cfg.deepspeed.file_warnings() if cfg.train.backend == "deepspeed" else []:
        print_rank_0(f"> warning: {line}")
    return plan, dp_size, t.global_batch_size // (t.micro_batch_size * dp_size)


def check_device_support(cfg: NBPConfig, plan: DevicePlan) -> None:
    """Refuse settings this device cannot train with (the config itself is valid).

    Raises:
        ConfigError: FlexAttention training on a CPU (torch has no CPU backward for it), the
            Transformer Engine spec without CUDA, or an nsys capture range (``--profile`` without
            ``--use-pytorch-profiler``) without CUDA.
    """
    errors = []
    if not plan.is_cuda and cfg.model.attention_backend == "flex":
        errors.append("--attention-backend flex trains on CUDA only (torch's FlexAttention has no CPU backward); "
                      "use --attention-backend dense on this machine")
    if not plan.is_cuda and cfg.model.transformer_impl == "transformer_engine":
        errors.append("--transformer-impl transformer_engine needs a CUDA GPU; use --transformer-impl local")
    if not plan.is_cuda and cfg.train.profile and not cfg.train.use_pytorch_profiler:
        errors.append("--profile without --use-pytorch-profiler opens a CUDA profiler capture range (nsys) and "
                      "needs a CUDA GPU; add --use-pytorch-profiler on this machine")
    if errors:
        raise ConfigError("invalid configuration for " + str(plan.device) + ":\n  - " + "\n  - ".join(errors))


def report_resume(cfg: NBPConfig, restored: Restored | None) -> None:
    """The Megatron-style line saying which checkpoint ``--load`` took (None: nothing to resume), then
    one line of what it restored and what was re-seeded (:meth:`Restored.summary`)."""
    if restored is None:
        print_rank_0(f"> no checkpoint in {cfg.load}, starting from scratch")
        return
    print_rank_0(f"> loaded checkpoint from {cfg.load} at iteration {restored.checkpoint_iteration}")
    print_rank_0(restored.summary())


def build_data_iterator(cfg: NBPConfig, consumed: int) -> Iterator[LayoutBatch]:
    """Micro-batches for this rank's data-parallel position, resuming after ``consumed`` global samples.
    The batches stay on the host; the forward step moves them
    (:func:`megatron_nbp.training.step.make_forward_step`). parallel_state must be initialised."""
    dp_size = parallel_state.get_data_parallel_world_size()
    stream = build_token_stream(
        cfg.data_folders(), parallel_state.get_data_parallel_rank(), dp_size, cfg.train.seed, cfg.model.latent_shape,
        cfg.model.vocab_size, cfg.train.shuffle_buffer, consumed=consumed // dp_size,
        condition_key=condition_key(cfg.model),
    )
    return micro_batches(stream, cfg.train.micro_batch_size, cfg.model, cfg.train.p_drop_cond, cfg.train.seed)


def make_profiler(cfg: NBPConfig, backend: TrainingBackend) -> IterationProfiler:
    """This rank's :class:`IterationProfiler` of ``--profile`` (one that records nothing without it or on a
    rank not in ``--profile-ranks``)."""
    window = ProfileWindow.from_config(cfg) or ProfileWindow(0, 1, ranks=())
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = backend.plan.device if backend.plan is not None else "cpu"
    return IterationProfiler(window, rank, device)


def training_loop(cfg: NBPConfig, backend: TrainingBackend, data_iterator: Iterator[LayoutBatch],
                  num_microbatches: int, iteration: int = 0, consumed: int = 0,
                  exit_control: ExitControl | None = None) -> list[float]:
    """The iteration loop both backends share: ``backend.train_step``, Megatron-style log line +
    TensorBoard (throughput, TFLOP/s per GPU, MFU and peak memory, see megatron_nbp.training_log),
    checkpoint (``backend.save``, when ``cfg.save`` is set) at ``save_interval`` / the last iteration /
    ``exit_interval`` (which then stops, as in Megatron-LM), and after an exit signal or past the time
    limit (``exit_control``, see nbp_common.exit_control: save, then return); the validation
    loss (megatron_nbp.training.validation) and training-time samples (megatron_nbp.training.samples) at
    their intervals; ``--profile`` records its window of iterations (megatron_nbp.training.profiling). An
    iteration whose step applied no update (non-finite loss or gradient, skipped) is logged and counted;
    ``train.max_skipped_iterations`` of them in a row save a final checkpoint (of the last good weights:
    skipped steps change nothing) and abort. An fp16 loss-scale overflow (``StepResult.loss_scale_overflow``)
    is counted as skipped but is no fault. Collective: every rank runs it with the same arguments.

    Args:
        backend: a built backend (its ``plan`` gives the device for the logger's memory figures).
        data_iterator: this rank's host micro-batches (``num_microbatches`` are drawn per iteration).
        iteration, consumed: where training resumes (0, 0 from scratch).
        exit_control: signal handler and time limit (default: :meth:`ExitControl.for_run` of ``cfg``, its
            clock starting now); its signal handlers are restored when the loop ends.

    Returns:
        per-iteration losses on the logging rank (empty elsewhere).

    Raises:
        FloatingPointError: too many consecutive skipped iterations.
    """
    t = cfg.train
    logger = TrainingLogger(cfg, enabled=is_logging_rank(), plan=backend.plan,
                            world_size=dist.get_world_size() if dist.is_initialized() else 1)
    history: list[float] = []
    skipped_in_a_row = 0
    validation = Validation.from_config(cfg, num_microbatches)  # --valid-data / --eval-interval
    samples = TrainingSamples.from_config(cfg)  # --sample-interval
    exit_control = exit_control or ExitControl.for_run(cfg)
    exit_control.device = backend.plan.device if backend.plan is not None else exit_control.device
    profiler = make_profiler(cfg, backend)
    while iteration < t.train_iters:
        profiler.before(iteration)
        start = time.perf_counter()
        with profiler.iteration(iteration + 1):
            result = backend.train_step(data_iterator, num_microbatches)
        iteration += 1
        consumed += t.global_batch_size
        history.append(result.loss)
        log_now = iteration % t.log_interval == 0 or iteration == t.train_iters
        memory = backend.peak_memory_gib() if log_now else None  # collective on CUDA: every rank calls it
        logger.log(iteration, result.loss, backend.learning_rate(), result.grad_norm, result.applied,
                   time.perf_counter() - start, consumed, memory)
        profiler.after(iteration)
        overflow = not result.applied and result.loss_scale_overflow
        skipped_in_a_row = 0 if result.applied or overflow else skipped_in_a_row + 1
        if not result.applied:
            print_rank_0(f"> iteration {iteration}: fp16 loss-scale overflow, update skipped" if overflow else
                         f"> iteration {iteration}: non-finite loss or gradient, update skipped "
                         f"({skipped_in_a_row} in a row, limit {t.max_skipped_iterations})")
        if skipped_in_a_row >= t.max_skipped_iterations:
            profiler.close()
            path = backend.save(iteration, consumed) if cfg.save else None
            logger.close()
            exit_control.restore()
            raise FloatingPointError(
                f"{skipped_in_a_row} consecutive iterations with a non-finite loss or gradient (up to iteration "
                f"{iteration}; train.max_skipped_iterations={t.max_skipped_iterations}); "
                + (f"saved the last good weights to {path}" if path else "no --save given, nothing saved"))
        for periodic in (validation, samples):  # collective: every rank evaluates / gathers
            if periodic is not None and periodic.due(iteration):
                periodic.run(backend, iteration, logger)
        stop = exit_control.check()  # collective when enabled: one small all-reduce, same answer on every rank
        exiting = bool(t.exit_interval) and iteration % t.exit_interval == 0 or stop is not None
        if cfg.save and (exiting or iteration == t.train_iters
                         or (t.save_interval and iteration % t.save_interval == 0)):
            print_rank_0(f"> saved checkpoint {backend.save(iteration, consumed)}")
        if exiting:
            why = exit_control.describe(stop) if stop else f"--exit-interval {t.exit_interval}"
            print_rank_0(f"> exiting at iteration {iteration} ({why})" + ("" if cfg.save else "; no --save given, "
                                                                            "nothing saved"))
            break
    profiler.close()
    logger.close()
    exit_control.restore()
    return history if is_logging_rank() else []
