"""Save at iteration k, resume, and the next losses equal an uninterrupted run (TP2 x PP2, dropout on,
shuffled data): model, optimizer, scheduler, RNG and data position are all restored."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_nbp.checkpointing import LATEST_FILE
from tests.dist_utils import torchrun
from tests.synthetic import write_synthetic_shards

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"


def tb_losses(logdir) -> dict[int, float]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("lm-loss")}


def train(data, tb, exit_interval=None, save=None, load=None, save_interval=None):
    args = ["--tp", "2", "--pp", "2", "--config", CONFIG, "--data", str(data), "--train-iters", "6",
            "--tensorboard-dir", str(tb), "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    if save:
        args += ["--save", str(save), "--save-interval", str(save_interval)]
    if load:
        args += ["--load", str(load)]
    if exit_interval:
        args += ["--exit-interval", str(exit_interval)]
    return torchrun(4, LAUNCHER, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    train(root / "data", root / "tb_full")
    # "interrupted" after iteration 3 (Megatron's --exit-interval saves and exits), then resumed
    train(root / "data", root / "tb_first", exit_interval=3, save=root / "ckpt", save_interval=100)
    out = train(root / "data", root / "tb_resumed", save=root / "ckpt", load=root / "ckpt", save_interval=3)
    return root, out.stdout


def test_resumed_losses_equal_uninterrupted(runs):
    root, stdout = runs
    assert "loaded checkpoint" in stdout and "iteration 3" in stdout
    full, first, resumed = (tb_losses(root / name) for name in ("tb_full", "tb_first", "tb_resumed"))
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == full[step]
    for step in (4, 5, 6):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    assert full[6] < full[1]


def test_checkpoint_layout_is_megatron_style(runs):
    root, _ = runs
    ckpt = root / "ckpt"
    assert (ckpt / LATEST_FILE).read_text().strip() == "6"
    assert (ckpt / "iter_0000003" / "metadata.json").is_file() and (ckpt / "iter_0000006").is_dir()
    assert not list(ckpt.glob("*.tmp"))
