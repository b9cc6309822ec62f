"""The generating commands agree: nbp-generate and nbp-evaluate share one set of sampling flags with one
meaning of "off" (top-k 0, top-p 1), and the generate command builds conditions through the token layout
(the same padding the training data gets)."""

from __future__ import annotations

import pytest
import torch

from megatron_nbp.cli import evaluate as evaluate_cli
from megatron_nbp.cli import generate as generate_cli
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.sampling import SamplingConfig, sampling_from_args
from megatron_nbp.layouts import pad_text_ids

GENERATE = ["--checkpoint", "C", "--tokenizer", "T", "--output", "o.mp4"]
EVALUATE = ["k600", "--checkpoint", "C", "--tokenizer", "T", "--data-dir", "D", "--video-root", "V"]


def test_off_means_the_same_everywhere():
    assert SamplingConfig(top_k=0, top_p=1.0) == SamplingConfig(top_k=None, top_p=None)
    assert SamplingConfig(top_k=0).top_k is None and SamplingConfig(top_p=1.0).top_p is None
    assert SamplingConfig(top_k=50, top_p=0.5) == SamplingConfig(top_k=50, top_p=0.5)
    for bad in (dict(top_k=-1), dict(top_p=0.0), dict(top_p=-0.5), dict(cfg_scale=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


@pytest.mark.parametrize("flags", [[], ["--top-k", "0"], ["--top-p", "1"], ["--top-k", "0", "--top-p", "1.0"],
                                   ["--temperature", "0.7", "--top-k", "100", "--top-p", "0.8", "--cfg-scale", "2"]])
def test_generate_and_evaluate_read_sampling_flags_alike(flags):
    gen = sampling_from_args(generate_cli.build_parser().parse_args(GENERATE + flags))
    ev = sampling_from_args(evaluate_cli.build_parser().parse_args(EVALUATE + flags))
    assert gen == ev
    if "--top-k" in flags and flags[flags.index("--top-k") + 1] == "0":
        assert gen.top_k is None


def test_a_bad_sampling_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.evaluate(EVALUATE + ["--top-p", "0"])
    assert exit_info.value.code == 2
    assert "top_p=0.0" in capsys.readouterr().err


def _text_model(P: int = 4) -> ModelConfig:
    return ModelConfig(layout="hybrid", condition_type="text", text_vocab_size=50, num_condition_tokens=P,
                       latent_shape=(2, 2, 4), block_shape=(1, 1, 4), condition_frames=1)


def test_generate_pads_text_as_the_training_data_does():
    parser = generate_cli.build_parser()
    cfg = _text_model()
    for text in ([3, 9], [1, 2, 3, 4, 5, 6]):
        args = parser.parse_args(GENERATE + ["--text-ids", ",".join(map(str, text)), "--num-samples", "3"])
        condition, padding, _ = generate_cli._condition(parser, args, cfg)
        ids, pad = pad_text_ids([text] * 3, cfg.num_condition_tokens, cfg.condition_vocab_size)
        assert torch.equal(condition, ids)
        assert (padding is None and not pad.any()) or torch.equal(padding, pad)
    with pytest.raises(SystemExit):
        generate_cli._condition(parser, parser.parse_args(GENERATE + ["--text-ids", "3,99"]), cfg)


def test_generate_maps_class_names_through_the_layout():
    parser = generate_cli.build_parser()
    cfg = ModelConfig(layout="hybrid", condition_type="class", condition_labels=["cat", "dog"],
                      latent_shape=(2, 2, 4), block_shape=(1, 1, 4), condition_frames=1)
    args = parser.parse_args(GENERATE + ["--class-name", "dog", "--num-samples", "2"])
    condition, padding, what = generate_cli._condition(parser, args, cfg)
    assert condition.tolist() == [[1], [1]] and padding is None and "dog" in what
    with pytest.raises(SystemExit):
        generate_cli._condition(parser, parser.parse_args(GENERATE + ["--class-name", "cow"]), cfg)


@pytest.mark.parametrize("cli", [generate_cli, evaluate_cli])
def test_sampling_flags_are_derived_from_the_fields(cli):
    """Every SamplingConfig field is a flag of both commands (help = the field's description), and every
    sampling-looking flag of either command is a field or the documented --seed."""
    from nbp_common.config import field_flags, leaf_fields

    from megatron_nbp.inference.sampling import SAMPLING_LAUNCHER_FLAGS

    actions = {opt: a for a in cli.build_parser()._actions for opt in a.option_strings}
    fields = leaf_fields(SamplingConfig)
    for dotted, field in fields.items():
        flag = field_flags(dotted, field)[0]
        assert flag in actions and actions[flag].dest == dotted, (cli.__name__, flag)
        assert actions[flag].help.startswith(field.description)
    field_flag_names = {field_flags(d, f)[0] for d, f in fields.items()}
    sampling_like = {o for o in actions if o.lstrip("-").split("-")[0] in ("top", "temperature", "cfg", "seed")}
    assert sampling_like == field_flag_names | set(SAMPLING_LAUNCHER_FLAGS)
