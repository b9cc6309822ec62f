"""The contract between the shared training loop (:mod:`megatron_nbp.training.loop`) and a training
backend: :class:`TrainingBackend` (megatron-core DDP in :mod:`.megatron_backend`, DeepSpeed ZeRO in
:mod:`.deepspeed_backend`) and the :class:`StepResult` of one iteration.

A backend owns this rank's model, optimizer and LR schedule and everything that differs between the
data-parallel machineries; the loop owns the job around them (config and data checks, process groups,
the data stream, logging, the save / exit cadence, the non-finite fault policy), which is therefore the
same for every backend. Every method below is called on every rank of the world in the same order;
those marked *collective* must be, the others are cheap local reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from megatron_nbp.config import NBPConfig
from megatron_nbp.device import DevicePlan
from megatron_nbp.layouts import LayoutBatch
from megatron_nbp.restore import Restored
from megatron_nbp.training_log import peak_memory_gib


@dataclass(frozen=True)
class StepResult:
    """What one training iteration reports to the loop; the same on every rank.

    Attributes:
        loss: token-weighted mean cross entropy (nats per video token) over the iteration's micro-batches
            and data-parallel ranks; non-finite when a non-finite loss made the step skip.
        grad_norm: global L2 norm of the gradients before clipping; nan when the update was skipped.
        applied: True when the optimizer applied the update (and the LR schedule advanced); False when
            it was skipped (non-finite loss or gradient on some rank, or an fp16 loss-scale overflow):
            weights, optimizer state and LR schedule are then unchanged.
        loss_scale_overflow: the skip was an fp16 dynamic loss-scale overflow that lowered a scale still
            above ``train.min_loss_scale``: a normal event of loss scaling, not a fault (always False
            when ``applied``).
    """

    loss: float
    grad_norm: float
    applied: bool
    loss_scale_overflow: bool = False


class TrainingBackend(ABC):
    """One rank's side of a training job: builds the model / optimizer / LR scheduler, runs one
    iteration, saves and loads checkpoints, and answers the loop's logging questions.

    Lifecycle (driven by :func:`megatron_nbp.training.loop.pretrain`): the loop validates the config and
    starts the process groups (megatron's parallel_state, TP x PP x DP), constructs the backend (no
    allocation), calls :meth:`build` once, :meth:`load` when resuming, then :meth:`train_step` per
    iteration with :meth:`save` at its cadence.

    Args:
        cfg: the run's config, validated (``NBPConfig.validate``) before any method is called.
    """

    #: the ``train.backend`` value that selects this backend
    name: ClassVar[str]

    def __init__(self, cfg: NBPConfig) -> None:
        self.cfg = cfg
        self.plan: DevicePlan | None = None

    @abstractmethod
    def build(self, plan: DevicePlan) -> None:
        """Build this rank's model stage on ``plan.device`` in the run's precision, wrapped for data
        parallelism, its optimizer and the LR scheduler. Collective (the wrappers broadcast or partition
        parameters). parallel_state must be initialised; the RNGs are as :func:`initialize_parallel`
        seeded them, so the same seed gives the same initial weights on every backend. Sets
        :attr:`plan`."""

    @property
    @abstractmethod
    def precision(self) -> str:
        """The resolved training precision, "bf16", "fp16" or "fp32" (local read, after :meth:`build`)."""

    @abstractmethod
    def describe(self, dp_size: int, num_microbatches: int) -> str:
        """The startup line the loop prints on rank 0 after :meth:`build` (parallel layout, batch
        shape, precision and backend settings). Local."""

    @abstractmethod
    def load(self) -> Restored | None:
        """Restore the latest checkpoint in ``cfg.load`` (called only when it is set): weights, and as
        :func:`megatron_nbp.restore.what_to_restore` decides from ``--finetune`` / ``--no-load-optim`` /
        ``--no-load-rng`` and the checkpoint's layout, the optimizer state, LR schedule, iteration, data
        position and RNG states (re-seeded when not restored). Collective.

        Returns:
            the :class:`~megatron_nbp.restore.Restored` (where training continues: iteration and consumed
            global samples, 0 and 0 under ``--finetune``), or None when ``cfg.load`` holds none (training
            starts from scratch).

        Raises:
            CheckpointError: a damaged checkpoint, one written for another model or optimizer, a layout
                change that cannot load (named), or ``--finetune`` with no checkpoint.
        """

    @abstractmethod
    def train_step(self, data_iterator: Iterator[LayoutBatch], num_microbatches: int) -> StepResult:
        """One iteration: forward and backward of ``num_microbatches`` host micro-batches drawn from
        ``data_iterator`` (this rank's data-parallel share; each batch is moved to :attr:`plan`'s device
        by the forward step), the non-finite check, the optimizer step and the LR-schedule step.
        Collective; a non-finite loss or gradient on any rank skips the update on every rank.

        Returns:
            the :class:`StepResult`, identical on every rank.
        """

    @abstractmethod
    def save(self, iteration: int, consumed: int) -> Path:
        """Write and publish a checkpoint of the current state as ``iteration`` with ``consumed`` global
        samples seen, under ``cfg.save`` (called only when it is set). Collective.

        Returns:
            the published checkpoint directory.
        """

    @abstractmethod
    def evaluate(self, data_iterator: Iterator[LayoutBatch], num_microbatches: int) -> tuple[float, float]:
        """Forward only, no gradient, no update: the NBP loss of ``num_microbatches`` host micro-batches
        from ``data_iterator`` (this rank's data-parallel share), with the model in eval mode (dropout
        and token corruption off) and back in train mode afterwards. Collective.

        Returns:
            (sum of the per-token cross entropies in nats, number of loss tokens), summed over the
            micro-batches and the data-parallel ranks (reduced as :meth:`train_step` reduces its loss),
            identical on every rank.
        """

    @abstractmethod
    def gather_weights(self, dst: int) -> dict[str, torch.Tensor] | None:
        """The current weights as one single-device model: every tensor-parallel shard all-gathered and
        every pipeline stage collected on global rank ``dst``, under megatron's TP1 PP1 parameter names
        (those of the inference format, megatron_nbp.inference.convert_common; no tied
        ``output_layer.weight``), as fp32 CPU tensors. Collective.

        Returns:
            the state dict on rank ``dst``, None on the other ranks.
        """

    @abstractmethod
    def learning_rate(self) -> float:
        """The learning rate the next update uses (the first parameter group's, after the last
        LR-schedule step). Local."""

    def peak_memory_gib(self) -> tuple[float, float] | None:
        """(max allocated, max reserved) device memory in GiB, the largest over all ranks; None on CPU.
        Collective on CUDA (a MAX all-reduce): the loop calls it on every rank at the logging interval."""
        return peak_memory_gib(self.plan)
