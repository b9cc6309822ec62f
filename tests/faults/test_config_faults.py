"""Every invalid parallel / batch / layout combination is refused by the real launcher before any data is
opened, any process group exists or any weight is allocated, with the offending values in the message.

The launcher's ``main`` runs in-process with WORLD_SIZE set as torchrun would; the functions that would
open the data, start process groups or build the model are replaced by spies that record the call and
stop the job, so a refusal that comes too late (or not at all) fails the test. A valid config is the
control: it must get past validation and reach the data check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny_frame_prediction.yaml"


def _launcher():
    """The module behind launchers/pretrain_nbp.py and nbp-pretrain."""
    import megatron_nbp.cli.pretrain

    return megatron_nbp.cli.pretrain


class Reached(Exception):
    """Raised by a spy: the job got past validation to real work."""


@pytest.fixture
def spies(monkeypatch):
    """Replace data check, process-group start and model builds (both backends) by recording spies."""
    import megatron_nbp.training.deepspeed_backend as ds
    import megatron_nbp.training.loop as loop
    import megatron_nbp.training.megatron_backend as megatron

    calls: list[str] = []

    def spy(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise Reached(name)
        return called

    monkeypatch.setattr(loop, "check_manifest", spy("check_manifest"))
    monkeypatch.setattr(loop, "initialize_parallel", spy("initialize_parallel"))
    monkeypatch.setattr(megatron, "build_gpt_model", spy("build_gpt_model"))
    monkeypatch.setattr(ds, "build_gpt_model", spy("build_gpt_model"))
    monkeypatch.chdir(REPO)
    return calls


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "override.yaml"
    path.write_text(text)
    return str(path)


# (flags after --config TINY, extra YAML layered on top or None, WORLD_SIZE, the message's offending values)
INVALID = {
    "TP does not divide the attention heads": (["--tp", "3"], None, 3,
                                               "num_attention_heads=4 not divisible by tensor parallel size 3"),
    "TP does not divide the padded vocabulary": (
        ["--tp", "2"], "model:\n  vocab_size: 63999\n  make_vocab_size_divisible_by: 1\n", 2,
        "padded vocabulary 63999 not divisible by tensor parallel size 2 (raise make_vocab_size_divisible_by=1)"),
    "TP does not divide the MLP": (["--tp", "2"], "model:\n  ffn_hidden_size: 509\n", 2,
                                   "ffn_hidden_size=509 not divisible by tensor parallel size 2"),
    "PP does not divide the layers": (["--pp", "3"], None, 3, "num_layers=4 not divisible by pipeline parallel size 3"),
    "world size not divisible by TP x PP": (["--tp", "2", "--pp", "2"], None, 6,
                                            "world size 6 not divisible by TP x PP = 2 x 2"),
    "global batch not divisible by micro-batch x DP": (
        ["--tp", "2", "--global-batch-size", "6"], None, 4,
        "global_batch_size=6 not divisible by micro_batch_size x data-parallel size = 2 x 2"),
    "block shape does not tile the latent": (
        [], "model:\n  block_shape: [1, 3, 8]\n", 1, "block_shape (1, 3, 8) does not tile latent_shape (5, 8, 8)"),
    "sequence longer than the position table": (
        ["--max-position-embeddings", "256"], None, 1,
        "sequence length 312 (layout frame_prediction, latent_shape (5, 8, 8), block_shape (1, 1, 8)) exceeds "
        "model.max_position_embeddings=256"),
    "hidden size not divisible by heads": ([], "model:\n  hidden_size: 130\n  ffn_hidden_size: 520\n", 1,
                                           "hidden_size=130 not divisible by num_attention_heads=4"),
    "condition frames not below the latent frames": ([], "model:\n  condition_frames: 5\n", 1,
                                                     "condition_frames=5 must be in [1, 4]"),
    "pipeline parallel with the DeepSpeed backend": (
        ["--backend", "deepspeed", "--zero-stage", "3", "--pp", "2"], None, 4,
        "pipeline parallel size 2 with the DeepSpeed backend"),
    "unknown ZeRO stage": (["--backend", "deepspeed"],
                           "deepspeed:\n  zero_stage: 4\n", 2, "deepspeed.zero_stage=4 not in (1, 2, 3)"),
    "unknown precision": ([], "train:\n  precision: fp8\n", 1,
                          "train.precision='fp8' not in ('auto', 'bf16', 'fp16', 'fp32')"),
    "overlapped parameter gather without the distributed optimizer": (
        ["--overlap-param-gather"], None, 2,
        "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
    "distributed optimizer with the DeepSpeed backend": (
        ["--backend", "deepspeed", "--use-distributed-optimizer"], None, 2,
        "--use-distributed-optimizer is a megatron-backend option: ZeRO-1/2/3 already shard the optimizer state"),
    "full recompute without a method": (
        ["--recompute-granularity", "full", "--recompute-num-layers", "1"], None, 1,
        "--recompute-granularity full needs --recompute-method uniform|block, got None"),
    "full recompute of more layers than a stage holds": (
        ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3", "--pp", "2"],
        None, 2, "--recompute-num-layers in [1, 2] (layers per pipeline stage), got 3"),
    "uniform recompute chunks that do not divide the stage": (
        ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3"], None, 1,
        "--recompute-num-layers 3 must divide the 4 layers of a pipeline stage"),
    "selective recompute with a layer count": (
        ["--recompute-granularity", "selective", "--recompute-num-layers", "2"], None, 1,
        "--recompute-granularity selective recomputes the core attention of every layer"),
    "sequence parallel with the local layer spec": (
        ["--sequence-parallel", "--tp", "2"], None, 2, "--sequence-parallel needs --transformer-impl transformer_engine"),
    "sequence parallel without tensor parallelism": (
        ["--sequence-parallel"], None, 1, "--sequence-parallel splits activations across the tensor-parallel group"),
    "flex attention training on a CPU": (
        ["--attention-backend", "flex"], None, 1,
        "--attention-backend flex trains on CUDA only (torch's FlexAttention has no CPU backward)"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_combination_is_refused_before_any_work(case, spies, tmp_path, monkeypatch):
    flags, extra_yaml, world, message = INVALID[case]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    configs = ["--config", TINY] + (["--config", _yaml(tmp_path, extra_yaml)] if extra_yaml else [])
    with pytest.raises(SystemExit) as exit_:
        _launcher().main([*configs, "--data", str(tmp_path / "no_data"), *flags])
    text = str(exit_.value.code)
    assert text.startswith("pretrain_nbp.py [rank 0]: ConfigError: invalid configuration")
    assert message in text, text
    assert spies == [], f"{case}: reached {spies} before refusing"
    assert not dist.is_initialized()


def test_every_problem_of_a_config_is_listed_at_once(spies, tmp_path, monkeypatch):
    """One refusal names all the offending settings, so a user fixes the config in one go."""
    monkeypatch.setenv("WORLD_SIZE", "6")
    extra = _yaml(tmp_path, "model:\n  block_shape: [1, 3, 8]\n")
    with pytest.raises(SystemExit) as exit_:
        _launcher().main(["--config", TINY, "--config", extra, "--data", str(tmp_path), "--tp", "3", "--pp", "3",
                          "--max-position-embeddings", "100"])
    text = str(exit_.value.code)
    for message in ("num_attention_heads=4 not divisible by tensor parallel size 3",
                    "num_layers=4 not divisible by pipeline parallel size 3",
                    "world size 6 not divisible by TP x PP = 3 x 3",
                    "block_shape (1, 3, 8) does not tile latent_shape (5, 8, 8)"):
        assert message in text, text
    assert spies == []


@pytest.mark.parametrize("flags,world", [(["--tp", "2", "--pp", "2"], 4),
                                         (["--backend", "deepspeed", "--zero-stage", "3", "--tp", "2"], 4),
                                         (["--max-position-embeddings", "312"], 1),
                                         (["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                           "--overlap-param-gather", "--recompute-granularity", "full",
                                           "--recompute-method", "block", "--recompute-num-layers", "2", "--pp", "2"],
                                          4)])
def test_a_valid_config_gets_past_validation(flags, world, spies, tmp_path, monkeypatch):
    """Control: the same launcher path with a valid config reaches the data check (so the spies work)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(Reached):
        _launcher().main(["--config", TINY, "--data", str(tmp_path), *flags])
    assert spies == ["check_manifest"]


def test_a_larger_position_table_is_built_and_counted():
    """max_position_embeddings sizes the learned tables (Megatron-LM's meaning); the default is the sequence."""
    from megatron_nbp.config import NBPConfig
    from megatron_nbp.model.params import count_parameters

    default = NBPConfig.from_yaml(TINY).model
    larger = NBPConfig.from_yaml(TINY, {"model.max_position_embeddings": 400}).model
    assert default.position_table_size == default.seq_length == 312 and larger.position_table_size == 400
    diff = count_parameters(larger).position_embeddings - count_parameters(default).position_embeddings
    assert diff == (400 - 312) * default.hidden_size


def test_deepspeed_json_that_disables_the_nan_check_is_refused_before_any_work(spies, tmp_path, monkeypatch):
    """The NaN/Inf skip of the DeepSpeed backend needs DeepSpeed's gradient norm: a JSON turning it off is refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds_json = tmp_path / "zero2.json"
    ds_json.write_text('{"zero_optimization": {"stage": 2, "compute_grad_norm": false}}')
    with pytest.raises(SystemExit) as exit_:
        _launcher().main(["--config", TINY, "--data", str(tmp_path), "--backend", "deepspeed", "--zero-stage", "2",
                          "--deepspeed-config", str(ds_json)])
    assert f"zero_optimization.compute_grad_norm=false in {ds_json}" in str(exit_.value.code)
    assert spies == []
