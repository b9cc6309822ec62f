"""megatron_nbp.training.optim.weight_decay_groups on a small torch module and the NBP decoder's parameter
names: which parameters are decayed under train.no_weight_decay megatron / release, group order and keys (the
comparison with megatron-core's own grouping on the real models is tests/distributed/test_weight_decay_groups.py)."""

import pytest
import torch

from megatron_nbp.training.optim import no_weight_decay, weight_decay_groups


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


# ------------------------------------------------------------------ train.no_weight_decay: megatron | release
def nbp_decoder(untied: bool):
    """A 1-layer hybrid NBP decoder (megatron's parameter names: condition and video position tables)."""
    from megatron_nbp.config import ModelConfig
    from megatron_nbp.inference.model import NBPDecoder

    return NBPDecoder(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=100,
                                  latent_shape=(2, 2, 2), block_shape=(1, 1, 2), layout="hybrid",
                                  condition_labels=["a"], untie_embeddings_and_output_weights=untied))


BIASES_AND_NORMS = [
    "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.bias",
    "decoder.layers.0.self_attention.linear_qkv.bias", "decoder.layers.0.self_attention.linear_proj.bias",
    "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.bias",
    "decoder.layers.0.mlp.linear_fc1.bias", "decoder.layers.0.mlp.linear_fc2.bias",
    "decoder.final_layernorm.weight", "decoder.final_layernorm.bias"]
RELEASE_EXTRA = ["embedding.word_embeddings.weight", "embedding.position_embeddings.condition.weight",
                 "embedding.position_embeddings.video.weight"]
MATRICES = ["decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_proj.weight",
            "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"]


@pytest.mark.parametrize("untied", [False, True])
def test_release_rule_also_leaves_out_the_word_embedding_and_position_tables(untied):
    model = nbp_decoder(untied)
    head = ["output_layer.weight"] if untied else []  # the release's untied head is decayed
    megatron = weight_decay_groups(model, 1.0, 0.0, "megatron")
    assert sorted(names_of(model, megatron[1])) == sorted(BIASES_AND_NORMS)
    assert sorted(names_of(model, megatron[0])) == sorted(RELEASE_EXTRA + MATRICES + head)
    release = weight_decay_groups(model, 1.0, 0.0, "release")
    assert [g["wd_mult"] for g in release] == [1.0, 0.0]
    assert sorted(names_of(model, release[1])) == sorted(BIASES_AND_NORMS + RELEASE_EXTRA)
    assert sorted(names_of(model, release[0])) == sorted(MATRICES + head)


def test_release_rule_reads_names_through_wrappers_and_the_tied_copy_of_the_last_stage():
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module.module = nbp_decoder(untied=False)  # megatron DDP(Float16Module(model)): "module.module." names
    names = {n for n, p in wrapped.named_parameters() if no_weight_decay(n, p, "release")}
    assert names == {"module.module." + n for n in BIASES_AND_NORMS + RELEASE_EXTRA}
    copy = torch.nn.Parameter(torch.zeros(4, 4))  # the last stage's tied output_layer.weight under PP > 1
    copy.shared_embedding = True
    assert no_weight_decay("module.output_layer.weight", copy, "release")
    assert not no_weight_decay("module.output_layer.weight", copy, "megatron")  # as the word embedding
    assert not no_weight_decay("module.output_layer.weight", torch.nn.Parameter(torch.zeros(4, 4)), "release")
    with pytest.raises(ValueError, match="'paper' not in"):
        no_weight_decay("x.weight", copy, "paper")
