"""What both backends' optimizers share: the weight-decay parameter groups and the LR schedule.

Which parameters are not decayed is one rule, :func:`no_weight_decay` (``train.no_weight_decay``). The
megatron backend gets its groups from ``get_megatron_optimizer`` (with :func:`megatron_config_overrides`
for the rule); the DeepSpeed backend builds them with :func:`weight_decay_groups`, which produces the same
groups (same members, order and keys), so the two backends decay the same parameters and megatron's
``OptimizerParamScheduler`` drives both.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_nbp.config import TrainingConfig

NO_WEIGHT_DECAY_RULES = ("megatron", "release")
# Parameters of the NBP decoder (names as GPTModel.named_parameters gives them, without DDP /
# Float16Module "module." prefixes) that the release rule adds to megatron's biases and 1-D parameters.
RELEASE_WORD_EMBEDDING = "embedding.word_embeddings.weight"
RELEASE_POSITION_TABLES = "embedding.position_embeddings."  # .condition.weight / .video.weight (or .weight)


def _unwrapped_name(name: str) -> str:
    """``name`` without the ``module.`` prefixes megatron's DDP and Float16Module add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def no_weight_decay(name: str, param: torch.nn.Parameter, rule: str = "megatron") -> bool:
    """Whether the parameter ``name`` of the NBP decoder is left out of weight decay under ``rule``.

    * ``"megatron"`` (Megatron-LM's default grouping): biases (names ending in ``.bias``) and every 1-D
      parameter (LayerNorm / RMSNorm weights and biases).
    * ``"release"`` (the official NBP release, which decays only its linear layers' matrices): the above,
      plus the word embedding ``embedding.word_embeddings.weight``, the learned position tables
      ``embedding.position_embeddings.condition.weight`` / ``.video.weight``, and, for a tied head under
      pipeline parallelism, the last stage's copy of the word embedding (``output_layer.weight`` marked
      ``shared_embedding`` by megatron-core: it must be updated as the word embedding is). An untied
      ``output_layer.weight`` is decayed, as the release's head is.

    Args:
        name: the parameter's name in ``named_parameters`` (``module.`` prefixes of wrappers ignored).
        param: the parameter (its dimension and megatron's attributes are read).
        rule: one of :data:`NO_WEIGHT_DECAY_RULES`.

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in NO_WEIGHT_DECAY_RULES:
        raise ValueError(f"no_weight_decay rule {rule!r} not in {NO_WEIGHT_DECAY_RULES}")
    if param.dim() == 1 or name.endswith(".bias"):
        return True
    if rule == "release":
        name = _unwrapped_name(name)
        return (name == RELEASE_WORD_EMBEDDING or name.startswith(RELEASE_POSITION_TABLES)
                or bool(getattr(param, "shared_embedding", False)))
    return False


def megatron_config_overrides(rule: str) -> dict | None:
    """``config_overrides`` for megatron-core's ``get_megatron_optimizer`` that apply :func:`no_weight_decay`
    (``wd_mult`` 0 for the parameters it names): None for ``"megatron"`` (megatron-core's own default
    grouping, the same rule), a name predicate for ``"release"``.

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in NO_WEIGHT_DECAY_RULES:
        raise ValueError(f"no_weight_decay rule {rule!r} not in {NO_WEIGHT_DECAY_RULES}")
    if rule == "megatron":
        return None
    predicate = ParamWithNamePredicate(name=f"nbp_no_weight_decay_{rule}",
                                       fn=lambda param, name: no_weight_decay(name, param, rule))
    return {ParamKey(with_name_predicate=predicate): {"wd_mult": 0.0}}


def weight_decay_groups(module: torch.nn.Module, lr: float, min_lr: float,
                        rule: str = "megatron") -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``module``'s trainable parameters, as megatron-core forms them
    (``get_megatron_optimizer`` with :func:`megatron_config_overrides`): no weight decay (``wd_mult`` 0)
    for the parameters :func:`no_weight_decay` names under ``rule`` (Megatron-LM's default: biases and
    every 1-D parameter), weight decay (``wd_mult`` 1) for the rest; expert-parallel parameters
    (``allreduce=False``) in groups of their own.

    Groups come decayed first, each holding its parameters in ``named_parameters`` order, with the keys
    megatron's ``OptimizerParamScheduler`` reads (``wd_mult``, ``lr_mult``, ``max_lr``, ``min_lr``) and
    megatron's bookkeeping keys (``is_expert_parallel``, ``default_config``, ``is_decoupled_lr``), in
    megatron's key order (the order is visible in saved optimizer states). Unlike megatron's grouping
    there is no collective: every rank of the DeepSpeed backend (no pipeline parallelism) holds the same
    parameter names, so the groups agree across ranks. A group is made only for kinds that occur.

    Args:
        module: the model (its ``named_parameters``; frozen parameters are left out).
        lr, min_lr: peak and final learning rate, stored as the groups' ``max_lr`` / ``min_lr``.
        rule: ``train.no_weight_decay``, see :func:`no_weight_decay`.

    Returns:
        list of param-group dicts for a torch optimizer (``params``: list of parameters).
    """
    grouped: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = no_weight_decay(name, param, rule)
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
    ``lr_decay_style`` (linear, cosine or constant) decay to ``min_lr`` at ``lr_decay_iters`` (default
    ``train_iters``; min_lr after it); constant weight decay (scaled per parameter group by ``wd_mult``).
    Sets the groups' lr/weight_decay at construction and on step(). Both backends use it."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters or t.train_iters, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
    )
