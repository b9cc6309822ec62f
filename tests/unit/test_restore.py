"""What a --load restores (megatron_nbp.restore.what_to_restore): the flags, layout changes per backend,
the refusals by name, and the rank-0 summary line."""

import pytest

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.restore import LoadOptions, ParallelLayout, Restored, what_to_restore

L = ParallelLayout
TP2PP2 = L(2, 2, 1)


def plan(options=LoadOptions(), saved=TP2PP2, current=TP2PP2, backend="megatron", **kw):
    return what_to_restore(options, saved, current, "CKPT", backend, **kw)


def flags(p):
    return p.optimizer, p.progress, p.rng


def test_same_layout_restores_everything_and_the_flags_take_away_their_part():
    assert flags(plan()) == (True, True, True) and plan().reseed_reason == ""
    assert flags(plan(LoadOptions(load_optim=False))) == (False, True, True)
    no_rng = plan(LoadOptions(load_rng=False))
    assert flags(no_rng) == (True, True, False) and no_rng.reseed_reason == "--no-load-rng"
    tune = plan(LoadOptions(finetune=True))
    assert flags(tune) == (False, False, False) and tune.reseed_reason == "--finetune"


@pytest.mark.parametrize("current", [L(1, 2, 2), L(2, 1, 1), L(2, 2, 2), L(1, 1, 1)])
def test_megatron_layout_change_restores_all_but_the_rng(current):
    p = plan(current=current)
    assert flags(p) == (True, True, False) and "per rank" in p.reseed_reason


def test_distributed_optimizer_reshards_over_dp_only():
    assert flags(plan(current=L(2, 2, 2), distributed_optimizer=True)) == (True, True, False)
    for current in (L(1, 2, 2), L(2, 1, 1)):
        with pytest.raises(CheckpointError, match="--use-distributed-optimizer.*reshards over DP only.*"
                                                  "resume at TP=2 PP=2, or with --no-load-optim or --finetune"):
            plan(current=current, distributed_optimizer=True)
        assert flags(plan(LoadOptions(load_optim=False), current=current, distributed_optimizer=True)) == (
            False, True, False)


def test_deepspeed_layout_rules():
    saved = L(2, 1, 2)
    with pytest.raises(CheckpointError, match="per tensor-parallel rank, resume at TP=2"):
        plan(LoadOptions(finetune=True), saved, L(1, 1, 4), "deepspeed", zero_stage=1)
    with pytest.raises(CheckpointError, match="ZeRO-3 partitions the weights.*resume at DP=2 \\(world size 4\\)"):
        plan(LoadOptions(finetune=True), saved, L(2, 1, 1), "deepspeed", zero_stage=3)
    with pytest.raises(CheckpointError, match="ZeRO-2 .*resume at DP=2, or load it with --no-load-optim or --finetune"):
        plan(LoadOptions(), saved, L(2, 1, 1), "deepspeed", zero_stage=2)
    assert flags(plan(LoadOptions(load_optim=False), saved, L(2, 1, 1), "deepspeed", zero_stage=2)) == (
        False, True, False)
    assert flags(plan(LoadOptions(), saved, saved, "deepspeed", zero_stage=3)) == (True, True, True)


def test_unknown_saved_layout_reseeds():
    p = plan(saved=None)
    assert flags(p) == (True, True, False) and "does not record" in p.reseed_reason


def test_summary_names_what_was_restored_fresh_and_reseeded():
    moved = Restored(plan(LoadOptions(load_optim=False), current=L(1, 2, 2)), 3, 3, 24, 1237)
    assert moved.summary() == (
        "> restored: weights, iteration 3, data position (24 samples) | fresh: optimizer, LR scheduler (advanced "
        "to iteration 3) | re-seeded: RNG from seed 1237 (--seed + iteration 3; its RNG states are per rank of "
        "the checkpoint's layout) | checkpoint layout TP=2 PP=2 DP=1, this run TP=1 PP=2 DP=2")
    whole = Restored(plan(), 3, 3, 24, None)
    assert whole.summary() == ("> restored: weights, optimizer, LR scheduler, iteration 3, data position (24 samples)"
                               " | RNG restored | layout TP=2 PP=2 DP=1")


def test_load_flags_need_load():
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml")
    cfg.train.finetune = True
    with pytest.raises(ConfigError, match="--finetune given without --load"):
        cfg.validate(1)
    cfg.load = "ckpt"
    cfg.validate(1)
