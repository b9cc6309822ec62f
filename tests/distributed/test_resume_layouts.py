"""Resume on another parallel layout, and ``--finetune`` (megatron backend, megatron_nbp.restore).

A TP2 x PP2 run (4 processes, DP 1) trains 5 iterations and saves at iteration 3; that checkpoint is
then resumed as TP1 x PP2 on 4 processes (DP 1 -> 2: TP, PP and DP all change) and as TP2 x PP1 on 2
processes (DP 1), and the losses of iterations 4 and 5 are compared with the uninterrupted run's: 4
checks the weights, 5 also the optimizer state and the LR schedule (the update of iteration 4). A
TP1 x PP2 run with the distributed optimizer (2 processes, DP 1) is resumed on 4 processes (DP 2): its
``dp_reshardable`` optimizer state resharded over DP. ``--finetune`` from the TP2 x PP2 checkpoint
(1 process) starts at iteration 1 with the loaded weights, a fresh LR schedule and data position 0.

Data: 8 clips and a global batch of 8, so every iteration's global batch is the whole data set,
whatever the data-parallel size (the stream splits the shards among DP ranks, so with more clips DP 2
would read another set of clips per iteration than DP 1) and whatever the data position (the
finetune run's first batch holds the same clips as the reference run's iteration 4). Dropout is 0
(tiny_test.yaml), so the RNG, re-seeded on another layout, does not enter the losses.

Tolerance: relative 1e-5 on losses (fp32). The layouts reduce in other orders (TP splits the matmuls
and sums partial products, DP averages gradients over 2 ranks, the loss mean is taken over other
micro-batch splits), so the results may differ by fp32 rounding (here, on CPU, they came out equal);
1e-5 is far above that and far below what a lost part of the optimizer state changes (3.3e-3 at
iteration 5 when the distributed optimizer's Adam step counts were not restored).
"""

import shutil

import pytest

from data_prep.synthetic import write_synthetic_shards
from megatron_nbp.checkpointing import LATEST_FILE, iteration_dir
from megatron_nbp.training_log import read_scalars
from tests.dist_utils import torchrun

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"
REL_TOL = 1e-5


def train(nproc, tp, pp, data, tb, *extra):
    return torchrun(nproc, LAUNCHER, "--tp", str(tp), "--pp", str(pp), "--config", CONFIG, "--data", str(data),
                    "--train-iters", "5", "--tensorboard-dir", str(tb), *extra).stdout


def checkpoint_at_3(save_dir, into):
    """A copy of ``save_dir`` holding only its iteration-3 checkpoint, named latest."""
    into.mkdir()
    shutil.copytree(iteration_dir(save_dir, 3), iteration_dir(into, 3))
    (into / LATEST_FILE).write_text("3")
    return into


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    data = root / "data"
    write_synthetic_shards(data, num_clips=8, clips_per_shard=4, latent_shape=(5, 4, 4), vocab=2048)
    train(4, 2, 2, data, root / "tb_ref", "--save", str(root / "ref"), "--save-interval", "3")
    ckpt = checkpoint_at_3(root / "ref", root / "ckpt")
    out = {
        "tp1pp2": train(4, 1, 2, data, root / "tb_tp1pp2", "--load", str(ckpt)),
        "tp2pp1": train(2, 2, 1, data, root / "tb_tp2pp1", "--load", str(ckpt)),
        "finetune": train(1, 1, 1, data, root / "tb_finetune", "--load", str(ckpt), "--finetune",
                          "--exit-interval", "2"),
    }
    distopt = ("--use-distributed-optimizer",)
    train(2, 1, 2, data, root / "tb_ref_distopt", *distopt, "--save", str(root / "ref_distopt"), "--save-interval", "3")
    ckpt_distopt = checkpoint_at_3(root / "ref_distopt", root / "ckpt_distopt")
    out["distopt_dp2"] = train(4, 1, 2, data, root / "tb_distopt_dp2", *distopt, "--load", str(ckpt_distopt))
    return root, out


def losses(root, name):
    return read_scalars(root / f"tb_{name}", "lm-loss")


def assert_close(got, want, what):
    assert abs(got - want) <= REL_TOL * abs(want), (what, got, want, abs(got - want) / abs(want))


@pytest.mark.parametrize("name, layout", [("tp1pp2", "TP=1 PP=2 DP=2"), ("tp2pp1", "TP=2 PP=1 DP=1")])
def test_resume_on_another_layout_gives_the_uninterrupted_losses(runs, name, layout):
    root, out = runs
    ref, resumed = losses(root, "ref"), losses(root, name)
    assert sorted(ref) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert_close(resumed[step], ref[step], (name, step))
    assert ref[5] < ref[3]  # it trains: iteration 5 would tell a lost optimizer state apart
    stdout = out[name]
    assert "> loaded checkpoint from" in stdout and "at iteration 3" in stdout
    assert ("> restored: weights, optimizer, LR scheduler, iteration 3, data position (24 samples) | re-seeded: "
            "RNG from seed 1237 (--seed + iteration 3; its RNG states are per rank of the checkpoint's layout) | "
            f"checkpoint layout TP=2 PP=2 DP=1, this run {layout}") in stdout, stdout[-3000:]
    assert read_scalars(root / f"tb_{name}", "learning-rate") == {
        k: v for k, v in read_scalars(root / "tb_ref", "learning-rate").items() if k in (4, 5)}


def test_distributed_optimizer_state_reshards_over_data_parallel_ranks(runs):
    root, out = runs
    ref, resumed = losses(root, "ref_distopt"), losses(root, "distopt_dp2")
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert_close(resumed[step], ref[step], ("distopt", step))
    assert "checkpoint layout TP=1 PP=2 DP=1, this run TP=1 PP=2 DP=2" in out["distopt_dp2"]
    assert "> restored: weights, optimizer, LR scheduler, iteration 3" in out["distopt_dp2"]


def test_finetune_starts_at_iteration_0_with_the_loaded_weights(runs):
    root, out = runs
    ref, tuned = losses(root, "ref"), losses(root, "finetune")
    assert sorted(tuned) == [1, 2]
    # iteration 1 evaluates the loaded (iteration-3) weights on the whole data set, as the reference's iteration 4
    assert_close(tuned[1], ref[4], "finetune loss 1 vs reference loss 4")
    assert abs(tuned[1] - ref[1]) > 0.1  # not the initial weights
    ref_lr, tuned_lr = (read_scalars(root / f"tb_{n}", "learning-rate") for n in ("ref", "finetune"))
    assert tuned_lr == {1: ref_lr[1], 2: ref_lr[2]}  # a fresh LR schedule from iteration 0
    stdout = out["finetune"]
    assert "consumed samples:            8 |" in stdout  # data position 0 -> 8 after iteration 1
    assert ("> restored: weights | fresh: optimizer, LR scheduler, iteration 0, data position 0 | re-seeded: RNG "
            "from seed 1234 (--seed + iteration 0; --finetune)") in stdout, stdout[-3000:]
