"""The DeepSpeed backend's optimizer parameter groups (megatron_nbp.training.optim.weight_decay_groups)
are the groups megatron-core forms for the megatron backend (``get_megatron_optimizer``'s grouping):
the same groups in the same order, each with the same parameters in the same order and the same keys
(in the same order) and values, on every tensor-parallel rank of every test model (learned positions
with LayerNorm and biases; RMSNorm / SwiGLU without linear biases; class- and text-conditional hybrid
layouts with 3D RoPE; the untied output layer), under Megatron-LM's rule and the official release's
(``train.no_weight_decay``); and the release rule leaves out exactly the word embedding and the position
tables beyond megatron's. The same models check ``model.position_embedding_init`` zeros. One torchrun
of 2 ranks (TP2) builds each model once."""

import json

import pytest

from tests.dist_utils import torchrun

CONFIGS = ["tests/configs/tiny_test.yaml", "tests/configs/tiny_test_llama.yaml",
           "tests/configs/tiny_test_hybrid.yaml", "tests/configs/tiny_test_text_rope.yaml",
           "tests/configs/tiny_test_untied.yaml"]
# What the release rule leaves out of weight decay beyond megatron's biases and 1-D parameters, per config.
RELEASE_EXTRA = {
    "tests/configs/tiny_test.yaml": ["embedding.word_embeddings.weight", "embedding.position_embeddings.video.weight"],
    "tests/configs/tiny_test_llama.yaml": ["embedding.word_embeddings.weight",
                                           "embedding.position_embeddings.video.weight"],
    "tests/configs/tiny_test_hybrid.yaml": ["embedding.word_embeddings.weight",
                                            "embedding.position_embeddings.condition.weight",
                                            "embedding.position_embeddings.video.weight"],
    "tests/configs/tiny_test_text_rope.yaml": ["embedding.word_embeddings.weight"],  # 3D RoPE: no table
    "tests/configs/tiny_test_untied.yaml": ["embedding.word_embeddings.weight",
                                            "embedding.position_embeddings.video.weight"],
}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    out = tmp_path_factory.mktemp("param_groups") / "groups.json"
    args = ["--output", str(out), "--tp", "2"]
    for config in CONFIGS:
        args += ["--config", config]
    torchrun(2, "tests/workers/param_groups_worker.py", *args)
    return json.loads(out.read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_groups_equal_megatron_cores_on_every_rank(groups, config):
    ranks = groups[config]
    assert len(ranks) == 2
    for rank, record in enumerate(ranks):
        assert record["ours"] == record["megatron"], (config, rank)
        assert record["release"]["ours"] == record["release"]["megatron"], (config, rank)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.endswith("untied.yaml")])  # megatron's rule
def test_biases_and_norm_weights_are_not_decayed_and_matrices_are(groups, config):
    """The comparison above is not vacuous: both kinds of group exist and hold what they should."""
    decayed, not_decayed = groups[config][0]["ours"]
    assert decayed["values"]["wd_mult"] == 1.0 and not_decayed["values"]["wd_mult"] == 0.0
    assert all(name.endswith(".weight") for name in decayed["params"])
    assert "embedding.word_embeddings.weight" in decayed["params"]
    assert any("linear_fc1.weight" in name for name in decayed["params"])
    assert "decoder.final_layernorm.weight" in not_decayed["params"]
    biases = [name for name in not_decayed["params"] if name.endswith(".bias")]
    if config.endswith("llama.yaml"):  # no linear biases; RMSNorm has none either
        assert biases == []
    else:
        assert any("linear_qkv.bias" in name for name in biases)


@pytest.mark.parametrize("config", CONFIGS)
def test_release_rule_leaves_out_exactly_the_word_embedding_and_position_tables(groups, config):
    for rank, record in enumerate(groups[config]):
        decayed, not_decayed = record["release"]["ours"]
        assert decayed["values"]["wd_mult"] == 1.0 and not_decayed["values"]["wd_mult"] == 0.0
        names = decayed["params"] + not_decayed["params"]
        biases_and_norms = {n for n in names if n.endswith(".bias") or "layernorm." in n}
        if record["ours"] != record["release"]["ours"]:  # the config's own rule is megatron's: compare with it
            assert set(record["ours"][1]["params"]) == biases_and_norms, (config, rank)
        extra = sorted(set(not_decayed["params"]) - biases_and_norms)
        assert extra == sorted(RELEASE_EXTRA[config]), (config, rank, extra)
        assert biases_and_norms <= set(not_decayed["params"]), (config, rank)
        if config.endswith("untied.yaml"):  # the untied head is decayed, as the release's is
            assert "output_layer.weight" in decayed["params"]
            assert record["ours"] == record["release"]["ours"]  # its own rule is the release's
        else:  # tied, one pipeline stage: no separate output weight
            assert "output_layer.weight" not in names


@pytest.mark.parametrize("config", CONFIGS)
def test_zeros_position_init_gives_zero_tables(groups, config):
    for record in groups[config]:
        tables = record["position_tables"]
        assert sorted(tables) == sorted(n for n in RELEASE_EXTRA[config] if "position" in n)
        assert all(v == 0.0 for v in tables.values()), tables
