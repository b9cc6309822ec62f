"""The paper / release recipes (configs/paper) and the options they use: the untied head flag (and the
inverse key older files hold), the release's parameter count and vocabulary, the LR schedule over
``lr_decay_iters``, and the checks on the new fields."""

import math
import re

import pytest
import torch

from megatron_nbp.checkpointing import CheckpointError, check_model_config
from megatron_nbp.config import ConfigError, ModelConfig, NBPConfig

XL = "configs/model/nbp_xl.yaml"
K600, UCF101, RELEASE = "configs/paper/k600.yaml", "configs/paper/ucf101.yaml", "configs/paper/k600_release.yaml"


def dry_run(capsys, *configs: str) -> str:
    from megatron_nbp.cli import pretrain

    pretrain.main([arg for c in configs for arg in ("--config", c)] + ["--dry-run"])
    return capsys.readouterr().out


def test_k600_paper_config_has_the_release_models_878_5m_parameters(capsys):
    out = dry_run(capsys, XL, K600)
    # The release's nbp-xl, counted by hand: 24 layers of h = 1536, ffn f = 6144, GELU, LayerNorm, biases:
    h, f, layers, codes, rows = 1536, 6144, 24, 64000, 1280
    layer = 2 * (2 * h) + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    total = layers * layer + 2 * h + codes * h + rows * h + codes * h  # final norm, embedding, positions, head
    assert total == 878_533_632 and round(total / 1e6, 1) == 878.5
    assert f"total 878.53M ({total:,})" in out and "output layer 98.30M (untied)" in out
    assert "seq 1264, vocab 64000" in out
    values = dict(re.findall(r"^  (\S+) \.+ (.*)$", out, flags=re.MULTILINE))
    assert values["train.train_iters"] == "100000" and values["model.max_position_embeddings"] == "1280"
    assert values["train.no_weight_decay"] == "'release'" and values["model.position_embedding_init"] == "'zeros'"
    from megatron_nbp.model.params import count_parameters

    tied = NBPConfig.from_yaml([XL, K600], {"model.untie_embeddings_and_output_weights": False})
    assert count_parameters(tied.model).total == total - codes * h  # tied: one vocabulary matrix less


def test_ucf101_paper_config_is_text_conditioned_with_the_96k_vocabulary(capsys):
    out = dry_run(capsys, XL, UCF101)
    assert "layout hybrid, seq 1288, vocab 96016 (video 64000 + special/condition 32016; padded 96128)" in out
    cfg = NBPConfig.from_yaml([XL, UCF101])
    m, t = cfg.model, cfg.train
    assert (m.condition_type, m.num_condition_tokens, m.text_vocab_size) == ("text", 8, 32000)
    assert (t.global_batch_size, t.train_iters, t.lr_warmup_iters, t.lr) == (256, 100000, 5000, 6e-4)
    assert m.untie_embeddings_and_output_weights


def test_release_layer_changes_only_the_schedule_and_beta2():
    paper, release = NBPConfig.from_yaml([XL, K600]), NBPConfig.from_yaml([XL, K600, RELEASE])
    changed = {k: (v, release.to_dict()["train"][k]) for k, v in paper.to_dict()["train"].items()
               if release.to_dict()["train"][k] != v}
    assert changed == {"lr_decay_style": ("linear", "cosine"), "lr_decay_iters": (None, 4000000),
                       "adam_beta2": (0.98, 0.95)}
    assert paper.model == release.model
    release.validate(1)


def test_schedule_decays_over_lr_decay_iters_in_both_styles():
    from megatron_nbp.training.optim import build_scheduler, weight_decay_groups

    for style in ("cosine", "linear"):
        t = NBPConfig.from_dict({"train": {"lr": 1.0, "min_lr": 0.1, "lr_warmup_iters": 4, "train_iters": 10,
                                           "lr_decay_iters": 100, "lr_decay_style": style}}).train
        optimizer = torch.optim.AdamW(weight_decay_groups(torch.nn.Linear(2, 2), t.lr, t.min_lr))
        scheduler = build_scheduler(optimizer, t)
        for step in range(1, 10):
            scheduler.step(1)
            frac = (step - 4) / 96
            want = (step / 4 if step <= 4 else
                    0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * frac)) if style == "cosine" else 1 - frac))
            assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), (style, step)


def test_untie_flag_and_the_inverse_key_of_older_files(tmp_path):
    from megatron_nbp.cli.pretrain import parse_args

    assert parse_args(["--config", "tests/configs/tiny_test.yaml", "--untie-embeddings-and-output-weights"]) \
        .model.untie_embeddings_and_output_weights
    assert not ModelConfig().untie_embeddings_and_output_weights and ModelConfig().share_embeddings_and_output_weights
    old = ModelConfig.from_dict({"share_embeddings_and_output_weights": False})  # a checkpoint / config.json of before
    assert old.untie_embeddings_and_output_weights and "share_embeddings_and_output_weights" not in old.to_dict()
    with pytest.raises(ConfigError, match="contradict"):
        ModelConfig.from_dict({"share_embeddings_and_output_weights": True, "untie_embeddings_and_output_weights": True})
    saved_tied = {"share_embeddings_and_output_weights": True, "num_layers": 4}
    check_model_config(saved_tied, ModelConfig(num_layers=4).to_dict(), "old")
    with pytest.raises(CheckpointError, match="untie_embeddings_and_output_weights: checkpoint False vs model True"):
        check_model_config(saved_tied, ModelConfig(num_layers=4, untie_embeddings_and_output_weights=True).to_dict(),
                           "old")


@pytest.mark.parametrize("overrides,message", [
    ({"train.lr_decay_iters": 2}, "train.lr_decay_iters=2 must exceed lr_warmup_iters=2"),
    ({"model.position_embedding_init": "zeros", "model.position_embedding_type": "rope3d"},
     "model.position_embedding_init='zeros' needs learned_absolute positions"),
])
def test_new_fields_are_checked(overrides, message):
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.validate(1)
