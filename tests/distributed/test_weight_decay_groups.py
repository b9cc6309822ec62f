"""The DeepSpeed backend's optimizer parameter groups (megatron_nbp.training.optim.weight_decay_groups)
are the groups megatron-core forms for the megatron backend (``get_megatron_optimizer``'s grouping):
the same groups in the same order, each with the same parameters in the same order and the same keys
(in the same order) and values, on every tensor-parallel rank of every test model (learned positions
with LayerNorm and biases; RMSNorm / SwiGLU without linear biases; class- and text-conditional hybrid
layouts with 3D RoPE). One torchrun of 2 ranks (TP2) builds each model once."""

import json

import pytest

from tests.dist_utils import torchrun

CONFIGS = ["tests/configs/tiny_test.yaml", "tests/configs/tiny_test_llama.yaml",
           "tests/configs/tiny_test_hybrid.yaml", "tests/configs/tiny_test_text_rope.yaml"]


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


@pytest.mark.parametrize("config", CONFIGS)
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
