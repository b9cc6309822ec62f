"""Exit signal handler and time limit (one process), the run record written with a checkpoint, and the
keys of a DeepSpeed JSON that are refused or warned about. The multi-rank behaviour (SIGTERM to every
rank of a TP2 x PP2 run, resume bitwise) is tests/faults/test_exit_signal.py."""

from __future__ import annotations

import json
import os
import signal
from importlib import metadata
from pathlib import Path

import pytest
import torch

from megatron_nbp.cli.pretrain import parse_args
from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.deepspeed_json import REFUSED, WARNED, check_deepspeed_json
from megatron_nbp.run_record import CONFIG_FILE, VERSIONS_FILE, read_run_record, run_record, write_run_record
from nbp_common.exit_control import ExitControl, ExitSignalHandler

REPO = Path(__file__).resolve().parents[2]


# --- signals and time limit -----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_instead_of_terminating_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    control = ExitControl(signal_handler=True)
    with control:
        assert control.check() is None
        os.kill(os.getpid(), sig)  # delivered to this (main) thread before kill returns to Python code
        assert control.check() == "signal"
        assert sig.name in control.describe("signal")
    assert signal.getsignal(sig) is before


def test_without_the_option_nothing_is_caught_and_check_is_free():
    before = signal.getsignal(signal.SIGTERM)
    control = ExitControl(duration_mins=None)
    with control:
        assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM keeps its own action
        assert not control.enabled and control.check() is None
    handler = ExitSignalHandler((signal.SIGUSR2,))
    with handler:
        os.kill(os.getpid(), signal.SIGUSR2)
    assert handler.received and handler.name == "SIGUSR2"


def test_duration_limit_by_the_clock():
    now = [1000.0]
    control = ExitControl(duration_mins=2.0, start=1000.0, clock=lambda: now[0])
    now[0] = 1000.0 + 119.0
    assert control.check() is None
    now[0] = 1000.0 + 121.0
    assert control.check() == "duration"
    assert "2.02 minutes elapsed" in control.describe("duration")


def test_for_run_reads_the_flags_and_validation_refuses_a_bad_duration():
    cfg = parse_args(["--config", "tests/configs/tiny_test.yaml", "--exit-signal-handler",
                      "--exit-duration-in-mins", "90"])
    assert cfg.train.exit_signal_handler and cfg.train.exit_duration_in_mins == 90.0
    with ExitControl.for_run(cfg) as control:
        assert control.handler is not None and control.duration_mins == 90.0
    cfg.train.exit_duration_in_mins = 0.0
    with pytest.raises(ConfigError, match=r"train.exit_duration_in_mins=0.0 must be > 0"):
        cfg.validate(1)


# --- run record -------------------------------------------------------------------------------------


def test_run_record_reloads_to_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--config", "tests/configs/tiny_test.yaml", "--tp", "2", "--lr", "2e-4", "--bf16", "--seed", "7",
            "--exit-signal-handler", "--data", "tokens", "--save", "ckpt"]
    cfg = parse_args(argv)
    write_run_record(tmp_path, run_record(cfg))
    # every field, after the overrides: the YAML reads back into an equal NBPConfig, also through the CLI
    assert NBPConfig.from_yaml(tmp_path / CONFIG_FILE) == cfg
    assert parse_args(["--config", str(tmp_path / CONFIG_FILE)]) == cfg
    assert NBPConfig.from_yaml(tmp_path / CONFIG_FILE).to_dict() == cfg.to_dict()
    record = read_run_record(tmp_path)
    assert record["config"]["train"]["lr"] == 2e-4 and record["config"]["model"]["ffn_hidden_size"] == 256
    versions = json.loads((tmp_path / VERSIONS_FILE).read_text())
    assert versions == record["versions"]
    assert versions["torch"] == metadata.version("torch") and torch.__version__.startswith(versions["torch"][:4])
    assert versions["megatron-core"] == metadata.version("megatron-core")
    assert versions["deepspeed"] == metadata.version("deepspeed")
    assert versions["megatron-nbp"] and versions["python"]
    assert f"# torch: {versions['torch']}" in (tmp_path / CONFIG_FILE).read_text()
    assert read_run_record(tmp_path / "absent") is None  # checkpoints from before the record: no record


# --- DeepSpeed JSON keys ----------------------------------------------------------------------------


def ds_config(tmp_path, body: dict) -> NBPConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    cfg = NBPConfig.from_yaml(REPO / "tests/configs/tiny_test.yaml")
    cfg.train.backend = "deepspeed"
    cfg.deepspeed.config_file = str(path)
    return cfg


def test_shipped_deepspeed_configs_pass():
    for path in sorted((REPO / "configs/deepspeed").glob("*.json")):
        assert check_deepspeed_json(path) == ([], []), path
        cfg = NBPConfig.from_yaml(REPO / "tests/configs/tiny_test.yaml")
        cfg.train.backend = "deepspeed"
        cfg.deepspeed.config_file = str(path)
        cfg.validate(2)


@pytest.mark.parametrize("key, value, flag", [
    ("train_micro_batch_size_per_gpu", 8, "--micro-batch-size"),
    ("train_batch_size", 256, "--global-batch-size"),
    ("bf16", {"enabled": True}, "--bf16"),
    ("optimizer", {"type": "AdamW", "params": {"lr": 3e-4}}, "--adam-beta1"),
    ("scheduler", {"type": "WarmupLR"}, "--lr-warmup-iters"),
    ("gradient_clipping", 0.5, "--clip-grad"),
    ("activation_checkpointing", {}, "--recompute-granularity"),
])
def test_deepspeed_keys_that_change_training_are_refused_by_name(tmp_path, key, value, flag):
    cfg = ds_config(tmp_path, {"zero_optimization": {"stage": 2}, key: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate(2)
    line = next(line for line in str(err.value).splitlines() if repr(key) in line)
    assert flag in line and "ds.json" in line


def test_unknown_deepspeed_key_is_refused_and_logging_keys_are_warned(tmp_path):
    cfg = ds_config(tmp_path, {"zero_optimization": {"stage": 1}, "zero_optimisation": {"stage": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'zero_optimisation'"):
        cfg.validate(2)
    cfg = ds_config(tmp_path, {"_comment": "x", "zero_optimization": {"stage": 1}, "wandb": {"enabled": True},
                               "steps_per_print": 10})
    cfg.validate(2)  # warned, not refused
    warnings = cfg.deepspeed.file_warnings()
    assert len(warnings) == 2 and "'wandb'" in warnings[0] and "--wandb-project" in warnings[0]
    assert "'steps_per_print'" in warnings[1] and "--log-interval" in warnings[1]
    assert not set(REFUSED) & set(WARNED)
