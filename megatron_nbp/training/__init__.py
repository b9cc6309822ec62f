"""NBP pretraining: one training job over two interchangeable backends.

* :mod:`.backend`: the contract, :class:`TrainingBackend` (build, train_step, save, load,
  learning_rate, logging figures) and the :class:`StepResult` of an iteration;
* :mod:`.loop`: :func:`pretrain` (chooses the backend from ``train.backend``) and the shared
  :func:`training_loop` (non-finite fault policy, logging, save / exit cadence, resume);
* :mod:`.step`: the shared iteration pieces: forward step, loss, attention-mask cache, loss reduction
  fused with the non-finite check;
* :mod:`.optim`: weight-decay parameter groups and the LR schedule;
* :mod:`.megatron_backend`: megatron-core DDP / distributed optimizer, 1F1B pipeline schedule;
* :mod:`.deepspeed_backend`: DeepSpeed ZeRO 1/2/3 over megatron-core tensor parallelism.
"""

from megatron_nbp.training.backend import StepResult, TrainingBackend
from megatron_nbp.training.deepspeed_backend import DeepSpeedBackend
from megatron_nbp.training.loop import BACKENDS, build_data_iterator, pretrain, start_job, training_loop
from megatron_nbp.training.megatron_backend import (MegatronBackend, TrainingState, build_training_state,
                                                    optimizer_config, train_step)
from megatron_nbp.training.optim import build_scheduler, weight_decay_groups
from megatron_nbp.training.step import (MaskCache, check_and_reduce, loss_func, make_forward_step,
                                        reduce_losses)

__all__ = [
    "BACKENDS", "DeepSpeedBackend", "MaskCache", "MegatronBackend", "StepResult", "TrainingBackend",
    "TrainingState", "build_data_iterator", "build_scheduler", "build_training_state", "check_and_reduce",
    "loss_func", "make_forward_step", "optimizer_config", "pretrain", "reduce_losses", "start_job",
    "train_step", "training_loop", "weight_decay_groups",
]
