"""Invalid configurations are refused before any process group exists, naming the values."""

import pytest

from megatron_nbp.config import ConfigError, NBPConfig

TINY = "configs/tiny_frame_prediction.yaml"


def test_tiny_config_is_valid_for_tp2_pp2():
    cfg = NBPConfig.from_yaml(TINY, {"parallel.tensor_model_parallel_size": 2,
                                     "parallel.pipeline_model_parallel_size": 2})
    cfg.validate(world_size=4)
    assert cfg.model.block_size == 8 and cfg.model.seq_length == 320 - 8
    assert cfg.model.padded_vocab_size == 64000  # already a multiple of 128: no padding, at any TP


@pytest.mark.parametrize("overrides,world,message", [
    ({"parallel.tensor_model_parallel_size": 3}, 3, "num_attention_heads=4 not divisible by tensor parallel size 3"),
    ({"parallel.pipeline_model_parallel_size": 3}, 3, "num_layers=4 not divisible by pipeline parallel size 3"),
    ({"parallel.tensor_model_parallel_size": 2}, 3, "world size 3 not divisible by TP x PP = 2 x 1"),
    ({"train.global_batch_size": 7}, 1, "global_batch_size=7 not divisible"),
    ({"model.block_shape": [1, 1, 3]}, 1, "does not tile latent_shape"),
    ({"model.block_shape": [2, 1, 8]}, 1, "does not tile latent_shape (5, 8, 8)"),
    ({"model.layout": "hybrid", "model.condition_type": "text"}, 1, "needs model.text_vocab_size >= 1"),
    ({"model.layout": "hybrid", "model.condition_type": "speech"}, 1, "condition_type='speech' not in"),
    ({"model.position_embedding_type": "alibi"}, 1, "position_embedding_type='alibi' not in"),
    ({"model.transformer_impl": "transformer_engine"}, 1, "needs transformer-engine on a CUDA machine"),
    ({"model.condition_frames": 5}, 1, "condition_frames=5"),
    ({"train.lr_warmup_iters": 500}, 1, "lr_warmup_iters=500"),
    ({"model.layout": "hybrid"}, 1, "class conditioning needs distinct model.condition_labels"),
    ({"model.layout": "prefix"}, 1, "model.layout='prefix' not in"),
    ({"model.attention_backend": "flex", "model.attention_dropout": 0.1}, 1, "has no attention dropout"),
])
def test_invalid_combinations_are_refused(overrides, world, message):
    cfg = NBPConfig.from_yaml(TINY, overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate(world_size=world)


def test_unknown_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(ConfigError, match="num_layer"):
        NBPConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="unknown config key"):
        NBPConfig.from_yaml(TINY, {"train.learning_rate": 1.0})


def test_hybrid_vocabulary_and_sequence_follow_the_official_layout():
    cfg = NBPConfig.from_yaml(["configs/model/nbp_xl.yaml", "configs/data/ucf101.yaml"])
    cfg.validate(world_size=8)
    m = cfg.model
    assert m.condition_vocab_size == 101 and m.video_token_offset == 16 + 101
    assert m.total_vocab_size == 16 + 101 + 64000 and m.seq_length == 1 + 1280
