"""megatron_nbp.training.optim.weight_decay_groups on a small torch module: which parameters are decayed,
group order and keys (the comparison with megatron-core's own grouping on the real models is
tests/distributed/test_weight_decay_groups.py)."""

import torch

from megatron_nbp.training.optim import weight_decay_groups


class Toy(torch.nn.Module):
    """A linear layer with bias, a norm, plain matrices, a 2-D parameter named like a bias, a frozen
    matrix, a 1-element scale and an expert-parallel layer (megatron marks those ``allreduce=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.film = torch.nn.Module()
        self.film.bias = torch.nn.Parameter(torch.zeros(2, 2))
        self.gate = torch.nn.Parameter(torch.zeros(2, 2))
        self.table = torch.nn.Parameter(torch.zeros(5, 3))
        self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.expert = torch.nn.Linear(3, 3)
        for p in self.expert.parameters():
            p.allreduce = False
        self.scale = torch.nn.Parameter(torch.ones(1))


def names_of(module, group) -> list[str]:
    name = {id(p): n for n, p in module.named_parameters()}
    return [name[id(p)] for p in group["params"]]


def test_biases_and_1d_parameters_are_not_decayed_and_groups_follow_megatrons_order():
    toy = Toy()
    groups = weight_decay_groups(toy, lr=3e-3, min_lr=3e-4)
    assert [names_of(toy, g) for g in groups] == [
        ["gate", "table", "proj.weight"],                   # decayed, in named_parameters order
        ["expert.weight"],                                  # decayed, expert-parallel
        ["scale", "proj.bias", "norm.weight", "norm.bias", "film.bias"],  # not decayed
        ["expert.bias"],                                    # not decayed, expert-parallel
    ]
    assert [(g["wd_mult"], g["is_expert_parallel"]) for g in groups] == [
        (1.0, False), (1.0, True), (0.0, False), (0.0, True)]
    for g in groups:
        assert list(g) == ["params", "is_expert_parallel", "default_config", "wd_mult", "lr_mult",
                           "is_decoupled_lr", "max_lr", "min_lr"]
        assert (g["lr_mult"], g["max_lr"], g["min_lr"], g["default_config"], g["is_decoupled_lr"]) == \
            (1.0, 3e-3, 3e-4, True, False)


def test_kinds_that_do_not_occur_make_no_group():
    groups = weight_decay_groups(torch.nn.LayerNorm(4), lr=1.0, min_lr=0.0)
    assert len(groups) == 1 and groups[0]["wd_mult"] == 0.0 and len(groups[0]["params"]) == 2
    assert weight_decay_groups(torch.nn.Linear(2, 2, bias=False).requires_grad_(False), 1.0, 0.0) == []
