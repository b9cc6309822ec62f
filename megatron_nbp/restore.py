"""What a ``--load`` restores, for both training backends: Megatron-LM's ``--finetune``,
``--no-load-optim`` and ``--no-load-rng``, and a resume on another TP / PP / DP layout.

=========================  ===========  ===============  ==============  ===========================
from the checkpoint         resume       --no-load-optim  --no-load-rng   --finetune
=========================  ===========  ===============  ==============  ===========================
weights                     restored     restored         restored        restored
optimizer state             restored     fresh            restored        fresh
LR schedule                 restored     fresh, advanced  restored        fresh (iteration 0)
                                         to the iteration
iteration, data position    restored     restored         restored        0, 0
RNG states                  restored*    restored*        re-seeded       re-seeded from ``--seed``
=========================  ===========  ===============  ==============  ===========================

\\* only on the layout the checkpoint was written with. RNG states are saved per (TP, PP, DP) rank and
mean nothing on another layout; they are then re-seeded from ``--seed + iteration`` (a run resumed at
iteration 3 does not repeat the dropout masks of iteration 1). The data position (consumed global
samples) is global and carries over to any layout. A TP / PP change keeps the sample order exactly (the
data stream depends on the DP rank and size only). A DP-size change keeps the count, not the set: each
rank reads a contiguous share of every epoch (:mod:`megatron_nbp.data`), so the rest of the current epoch
is re-cut into the new number of shares and some of its clips may come twice and others not at all;
later epochs are exact.

Layout changes (:func:`what_to_restore` refuses what cannot work, by name):

* megatron backend: weights reshard over any TP / PP / DP (megatron-core dist_checkpointing). The plain
  optimizer's state reshards with them. The distributed optimizer's state (megatron's ``dp_reshardable``
  format) reshards over DP only: a TP or PP change then needs ``--no-load-optim`` or ``--finetune``.
* DeepSpeed backend: files are per TP rank, so TP is fixed (``launchers/convert_checkpoint.py`` exports
  any layout). ZeRO-1/2 keep the whole TP shard of the weights per file and load on another DP size
  without the optimizer state (its partitions are per DP rank): ``--no-load-optim`` or ``--finetune``.
  ZeRO-3 partitions the weights themselves: DP is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.core import parallel_state

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.config import TrainingConfig
from megatron_nbp.parallel import set_seed


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor-, pipeline- and data-parallel sizes of a run or of the run that wrote a checkpoint."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def current(cls) -> ParallelLayout:
        """This run's layout (megatron parallel_state must be initialised)."""
        return cls(parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(),
                   parallel_state.get_data_parallel_world_size())

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}"


@dataclass(frozen=True)
class LoadOptions:
    """The loading flags of a run (Megatron-LM's): ``finetune`` (weights only, iteration 0),
    ``load_optim`` (False: ``--no-load-optim``), ``load_rng`` (False: ``--no-load-rng``)."""

    finetune: bool = False
    load_optim: bool = True
    load_rng: bool = True

    @classmethod
    def from_config(cls, t: TrainingConfig) -> LoadOptions:
        """The options of ``t`` (``finetune``, ``no_load_optim``, ``no_load_rng``)."""
        return cls(finetune=t.finetune, load_optim=not t.no_load_optim, load_rng=not t.no_load_rng)


@dataclass(frozen=True)
class RestorePlan:
    """What one ``--load`` takes from the checkpoint (the weights always).

    Attributes:
        saved, current: the checkpoint's layout (None when it does not say) and this run's.
        optimizer: optimizer state and LR schedule restored (else fresh; the schedule is then advanced
            to the loaded iteration unless ``progress`` is False).
        progress: iteration and consumed samples restored (else 0 and 0: ``--finetune``).
        rng: the per-rank RNG states restored (else re-seeded, see :func:`finish_restore`).
        reseed_reason: why the RNG is re-seeded ("" when restored).
    """

    saved: ParallelLayout | None
    current: ParallelLayout
    optimizer: bool
    progress: bool
    rng: bool
    reseed_reason: str = ""


@dataclass(frozen=True)
class Restored:
    """The outcome of a ``--load``: the plan carried out, the checkpoint's iteration, where training
    continues (``iteration``, ``consumed`` global samples; 0, 0 under ``--finetune``) and the seed the
    RNG was re-seeded with (None when the saved states were restored)."""

    plan: RestorePlan
    checkpoint_iteration: int
    iteration: int
    consumed: int
    reseeded_with: int | None

    def summary(self) -> str:
        """One line for rank 0: what was restored, what is fresh, what was re-seeded and why."""
        p = self.plan
        restored = ["weights"]
        fresh = []
        if p.optimizer:
            restored += ["optimizer", "LR scheduler"]
        else:
            fresh += ["optimizer", "LR scheduler" + (f" (advanced to iteration {self.iteration})" if p.progress else "")]
        if p.progress:
            restored += [f"iteration {self.iteration}", f"data position ({self.consumed} samples)"]
        else:
            fresh += ["iteration 0", "data position 0"]
        layout = (f" | checkpoint layout {p.saved}, this run {p.current}" if p.saved != p.current
                  else f" | layout {p.current}")
        rng = ("RNG restored" if p.rng else
               f"re-seeded: RNG from seed {self.reseeded_with} (--seed + iteration {self.iteration}; "
               f"{p.reseed_reason})")
        return (f"> restored: {', '.join(restored)}" + (f" | fresh: {', '.join(fresh)}" if fresh else "")
                + f" | {rng}{layout}")


def what_to_restore(options: LoadOptions, saved: ParallelLayout | None, current: ParallelLayout, where: object,
                    backend: Literal["megatron", "deepspeed"], *, distributed_optimizer: bool = False,
                    zero_stage: int | None = None) -> RestorePlan:
    """Decide what a ``--load`` of checkpoint ``where`` (written on layout ``saved``) restores on this
    run's ``current`` layout (the rules in the module doc).

    Args:
        distributed_optimizer: the megatron checkpoint was written with ``--use-distributed-optimizer``.
        zero_stage: the DeepSpeed checkpoint's ZeRO stage.

    Raises:
        CheckpointError: a layout change that cannot load, naming the layouts and what would work.
    """
    optimizer = options.load_optim and not options.finetune
    same = saved == current
    if saved is not None and not same:
        if backend == "deepspeed":
            if saved.tp != current.tp:
                raise CheckpointError(
                    f"DeepSpeed checkpoint {where} was written at {saved}; this run has {current}: its files are "
                    f"per tensor-parallel rank, resume at TP={saved.tp} (convert_checkpoint.py exports any layout)")
            if saved.dp != current.dp and zero_stage == 3:
                raise CheckpointError(
                    f"ZeRO-3 checkpoint {where} was written at {saved}; this run has {current}: ZeRO-3 partitions "
                    f"the weights per data-parallel rank, resume at DP={saved.dp} (world size "
                    f"{saved.tp * saved.pp * saved.dp})")
            if saved.dp != current.dp and optimizer:
                raise CheckpointError(
                    f"ZeRO-{zero_stage} checkpoint {where} was written at {saved}; this run has {current}: the ZeRO "
                    "optimizer partitions are per data-parallel rank; resume at "
                    f"DP={saved.dp}, or load it with --no-load-optim or --finetune (weights only)")
        elif distributed_optimizer and optimizer and (saved.tp, saved.pp) != (current.tp, current.pp):
            raise CheckpointError(
                f"checkpoint {where} was written at {saved} with --use-distributed-optimizer; this run has "
                f"{current}: that optimizer state (dp_reshardable) reshards over DP only; resume at "
                f"TP={saved.tp} PP={saved.pp}, or with --no-load-optim or --finetune (weights only)")
    if options.finetune:
        reason = "--finetune"
    elif not options.load_rng:
        reason = "--no-load-rng"
    elif saved is None:
        reason = "the checkpoint does not record its layout"
    elif not same:
        reason = "its RNG states are per rank of the checkpoint's layout"
    else:
        reason = ""
    return RestorePlan(saved, current, optimizer=optimizer, progress=not options.finetune, rng=not reason,
                       reseed_reason=reason)


def finish_restore(plan: RestorePlan, scheduler, checkpoint_iteration: int, consumed: int, seed: int) -> Restored:
    """After the checkpoint's tensors are in: zero the progress under ``--finetune``, advance a fresh LR
    schedule (megatron's OptimizerParamScheduler) to the loaded iteration, and re-seed the RNGs
    (:func:`megatron_nbp.parallel.set_seed` with ``seed + iteration``, its per-pipeline-stage offset
    included) when they were not restored. Local; every rank calls it.

    Returns:
        the :class:`Restored` (``reseeded_with`` None when the RNG states were restored)."""
    iteration, consumed = (checkpoint_iteration, consumed) if plan.progress else (0, 0)
    if not plan.optimizer and iteration:
        scheduler.step(increment=iteration)
    reseeded = None
    if not plan.rng:
        reseeded = seed + iteration
        set_seed(reseeded)
    return Restored(plan, checkpoint_iteration, iteration, consumed, reseeded)


def check_nothing_to_load(options: LoadOptions, load_dir: object) -> None:
    """``load_dir`` holds no checkpoint: fine for a resume (training starts from scratch, as in
    Megatron-LM), not for ``--finetune``.

    Raises:
        CheckpointError: under ``--finetune``, which has nothing to start from.
    """
    if options.finetune:
        raise CheckpointError(f"--finetune: no checkpoint in --load {load_dir} to take the weights from")
