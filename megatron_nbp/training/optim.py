"""What both backends' optimizers share: the weight-decay parameter groups and the LR schedule.

The megatron backend gets its groups from ``get_megatron_optimizer``; the DeepSpeed backend builds them
with :func:`weight_decay_groups`, which produces the same groups (same members, order and keys), so the
two backends decay the same parameters and megatron's ``OptimizerParamScheduler`` drives both.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_nbp.config import TrainingConfig


def weight_decay_groups(module: torch.nn.Module, lr: float, min_lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``module``'s trainable parameters, as megatron-core forms them by
    default (Megatron-LM's rule): no weight decay (``wd_mult`` 0) for biases (names ending in ``.bias``)
    and every 1-D parameter (norm weights), weight decay (``wd_mult`` 1) for the rest; expert-parallel
    parameters (``allreduce=False``) in groups of their own.

    Groups come decayed first, each holding its parameters in ``named_parameters`` order, with the keys
    megatron's ``OptimizerParamScheduler`` reads (``wd_mult``, ``lr_mult``, ``max_lr``, ``min_lr``) and
    megatron's bookkeeping keys (``is_expert_parallel``, ``default_config``, ``is_decoupled_lr``), in
    megatron's key order (the order is visible in saved optimizer states). Unlike megatron's grouping
    there is no collective: every rank of the DeepSpeed backend (no pipeline parallelism) holds the same
    parameter names, so the groups agree across ranks. A group is made only for kinds that occur.

    Args:
        module: the model (its ``named_parameters``; frozen parameters are left out).
        lr, min_lr: peak and final learning rate, stored as the groups' ``max_lr`` / ``min_lr``.

    Returns:
        list of param-group dicts for a torch optimizer (``params``: list of parameters).
    """
    grouped: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.dim() == 1 or name.endswith(".bias")
        expert = not getattr(param, "allreduce", True)
        grouped.setdefault((no_decay, expert), []).append(param)
    groups = []
    for no_decay, expert in sorted(grouped, key=lambda key: key[0]):  # stable: first-seen order within a kind
        groups.append({"params": grouped[no_decay, expert], "is_expert_parallel": expert, "default_config": True,
                       "wd_mult": 0.0 if no_decay else 1.0, "lr_mult": 1.0, "is_decoupled_lr": False,
                       "max_lr": lr, "min_lr": min_lr})
    return groups


def build_scheduler(optimizer, t: TrainingConfig) -> OptimizerParamScheduler:
    """megatron's OptimizerParamScheduler: linear warmup from 0 over ``lr_warmup_iters``, then
    ``lr_decay_style`` decay to ``min_lr`` at ``train_iters``; constant weight decay (scaled per
    parameter group by ``wd_mult``). Sets the groups' lr/weight_decay at construction and on step()."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
    )
