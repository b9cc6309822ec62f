"""Fault tolerance of tokenizer training: SIGKILL at a random moment then --load equals an uninterrupted run
(bitwise on CPU); with --exit-signal-handler, SIGUSR1 / SIGTERM (in this process, and to one of two torchrun
ranks) stops every rank after the same step with that step saved, and --load then equals an uninterrupted
run bitwise; an interrupted save is never chosen as latest; --load refuses damaged or mismatched checkpoints
before training with a message naming the checkpoint and the differing values; options that cannot work
together are refused before any work."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import REPO, free_port, kill_before_the_end, kill_process_tree
from tests.distributed.test_tokenizer_recipe import _assert_same
from tests.tokenizer_data import SMALL_MODEL, write_two_videos

LAUNCHER = "launchers/train_tokenizer.py"
STEPS = 30  # of the subprocess runs (about 20 steps/s with a save every step on one core)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokfaults")
    return root, write_two_videos(root)


def _cli(root: Path, config: Path, name: str, steps: int = STEPS, *extra: str) -> list[str]:
    """Launcher flags of a GAN + LeCam + EMA + joint image/video run saving every step."""
    return [LAUNCHER, "--config", str(config), "--data", str(root / "videos"),
            "--output", str(root / name / "tok.safetensors"), "--resolution", "16", "--num-frames", "5",
            "--train-steps", str(steps), "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "2", "--seed", "3",
            "--log-interval", "1", "--eval-clips", "1", "--image-every", "2", "--image-batch-size", "2",
            "--disc-weight", "0.5", "--disc-start", "1", "--disc-channels", "4", "--disc-layers", "2",
            "--lecam-weight", "0.1", "--lecam-decay", "0.9", "--ema-decay", "0.8", "--holdout-fraction", "0.25",
            "--save", str(root / name / "ckpt"), "--save-interval", "1", *extra]


def _command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _run(nproc: int, args: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(nproc, args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _load(folder: Path, name: str):
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def _opts(root: Path, config: Path, name: str, **overrides):
    """In-process TrainOptions with the same recipe as :func:`_cli` (4 steps, a save every 2)."""
    from data_prep.tokenizer.train import TrainOptions

    values = dict(config=str(config), data=str(root / "videos"), output=str(root / name / "tok.safetensors"),
                  resolution=16, num_frames=5, train_steps=4, batch_size=1, lr=1e-3, warmup_steps=2, seed=3,
                  log_interval=100, eval_clips=1, image_every=2, image_batch_size=2, disc_weight=0.5,
                  disc_start=1, disc_channels=4, disc_layers=2, lecam_weight=0.1, lecam_decay=0.9,
                  ema_decay=0.8, save=str(root / name / "ckpt"), save_interval=2, holdout_fraction=0.25)
    values.update(overrides)
    return TrainOptions(**values)


# ------------------------------------------------------------------------------ SIGKILL + resume


@pytest.mark.parametrize("nproc", [1, 2])  # 2: torchrun, DDP, per-rank LeCam anchors and RNG
def test_sigkill_at_a_random_moment_then_load_equals_uninterrupted_bitwise(setup, nproc):
    """A run saving every step is SIGKILLed (launcher and workers at once) at a random moment after a random
    number of published checkpoints, rerun with --load to the same --train-steps; its final training state
    (tokenizer, discriminator, EMA, both optimizers, LeCam, every rank's RNG) and exported tokenizer equal an
    uninterrupted run's bit for bit."""
    from data_prep.tokenizer.checkpoint import read_latest_training_iteration, verify_training_checkpoint

    root, config = setup
    full, killed = f"full{nproc}", f"killed{nproc}"
    _run(nproc, _cli(root, config, full))

    seed = int(os.environ.get("TOKENIZER_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    ckpt = root / killed / "ckpt"

    def start() -> subprocess.Popen:
        shutil.rmtree(root / killed, ignore_errors=True)
        return subprocess.Popen(_command(nproc, _cli(root, config, killed)), cwd=REPO, env=_env(),
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # inside a later step or inside its save, before the last checkpoint (else tried again, earlier)
    kill = kill_before_the_end(start, lambda: read_latest_training_iteration(ckpt), last=STEPS,
                               kill_after=rng.randint(1, STEPS // 2), delay=rng.uniform(0.0, 0.15), timeout=120,
                               poll=0.005)
    latest = read_latest_training_iteration(ckpt)
    assert latest == kill.latest and 1 <= latest < STEPS, (seed, kill)
    verify_training_checkpoint(ckpt / f"iter_{latest:07d}")  # what was published is complete
    written = [p.stat().st_mtime for p in [ckpt / "latest_checkpointed_iteration.txt",
                                            *(ckpt / f"iter_{latest:07d}").iterdir()]]
    assert max(written) <= kill.killed_at, (seed, kill, written)  # --load will take what the killed run wrote

    out = _run(nproc, _cli(root, config, killed, STEPS, "--load", str(ckpt)))
    log_text = out.stdout + out.stderr
    assert f"resumed from {ckpt / f'iter_{latest:07d}'} at step {latest}" in log_text, (seed, log_text[-2000:])
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == STEPS
    assert read_latest_training_iteration(ckpt) == STEPS and not list(ckpt.glob(".iter_*.tmp")), seed
    a, b = root / full / "ckpt" / f"iter_{STEPS:07d}", ckpt / f"iter_{STEPS:07d}"
    state_full, state_resumed = _load(a, "state.pt"), _load(b, "state.pt")
    for key in ("model", "optimizer", "discriminator", "disc_optimizer", "ema", "lecam"):
        assert key in state_full, key
    _assert_same(state_full, state_resumed, f"state (seed {seed}, killed after {latest})")
    for r in range(nproc):
        _assert_same(_load(a, f"rng_rank{r}.pt"), _load(b, f"rng_rank{r}.pt"), f"rng_rank{r} (seed {seed})")
    from data_prep.tokenizer import load_tokenizer

    _assert_same(load_tokenizer(root / full / "tok.safetensors").state_dict(),
                 load_tokenizer(root / killed / "tok.safetensors").state_dict(), f"exported (seed {seed})")


# ------------------------------------------------------------------------- exit signals


def assert_same_run(root: Path, a: str, b: str, steps: int, ranks: int = 2) -> None:
    """Runs ``root/a`` and ``root/b`` (checkpoints in ``NAME/ckpt``, tokenizer in ``NAME/tok.safetensors``) end
    with the same training state at ``steps``, each rank's RNG and the same exported tokenizer, bit for bit."""
    from data_prep.tokenizer import load_tokenizer

    x, y = root / a / "ckpt" / f"iter_{steps:07d}", root / b / "ckpt" / f"iter_{steps:07d}"
    _assert_same(_load(x, "state.pt"), _load(y, "state.pt"), f"state {a} vs {b}")
    for r in range(ranks):
        _assert_same(_load(x, f"rng_rank{r}.pt"), _load(y, f"rng_rank{r}.pt"), f"rng_rank{r} {a} vs {b}")
    _assert_same(load_tokenizer(root / a / "tok.safetensors").state_dict(),
                 load_tokenizer(root / b / "tok.safetensors").state_dict(), f"exported {a} vs {b}")




@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_an_exit_signal_saves_the_step_and_load_resumes_bitwise(setup, monkeypatch, sig):
    """In this process: the signal arrives during the first step (sent from inside it); the run finishes that
    step, saves it (its save interval would not have), exports nothing and puts the signal handlers back; the
    rerun with --load to 4 steps equals an uninterrupted run bit for bit (state, RNG, exported tokenizer)."""
    import data_prep.tokenizer.train as train
    from data_prep.tokenizer import load_tokenizer
    from data_prep.tokenizer.checkpoint import read_latest_training_iteration

    root, config = setup
    name = f"signal_{sig.name}"
    full = _opts(root, config, f"{name}_full")
    train.train_tokenizer(full)
    before = signal.getsignal(sig)
    real_step = train._train_step

    def step_then_signal(opts, t, bank, generator, step, *args, **kwargs):
        out = real_step(opts, t, bank, generator, step, *args, **kwargs)
        if step == 0:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(train, "_train_step", step_then_signal)
    stopped = _opts(root, config, name, exit_signal_handler=True)
    result = train.train_tokenizer(stopped)
    monkeypatch.undo()
    assert result["steps"] == 1 and f"exit signal received ({sig.name} on this rank)" in result["stopped"], result
    assert read_latest_training_iteration(stopped.save) == 1  # saved at the stop (save_interval is 2)
    assert not Path(stopped.output).exists()  # training is not finished: nothing exported
    assert signal.getsignal(sig) == before

    train.train_tokenizer(stopped.replace(load=stopped.save))
    assert read_latest_training_iteration(stopped.save) == 4
    a, b = Path(full.save) / "iter_0000004", Path(stopped.save) / "iter_0000004"
    _assert_same(_load(a, "state.pt"), _load(b, "state.pt"), f"state ({sig.name})")
    _assert_same(_load(a, "rng_rank0.pt"), _load(b, "rng_rank0.pt"), f"rng ({sig.name})")
    _assert_same(load_tokenizer(full.output).state_dict(), load_tokenizer(stopped.output).state_dict(), "exported")


def test_an_exit_signal_in_the_last_step_finishes_the_run(setup, monkeypatch):
    """The signal arrives during the last step: nothing is left to resume, so the run evaluates and exports
    as usual (the same tokenizer as without the signal) instead of stopping unexported."""
    import data_prep.tokenizer.train as train
    from data_prep.tokenizer import load_tokenizer

    root, config = setup
    real_step = train._train_step

    def step_then_signal(opts, t, bank, generator, step, *args, **kwargs):
        out = real_step(opts, t, bank, generator, step, *args, **kwargs)
        if step == opts.train_steps - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    plain = _opts(root, config, "last_plain")
    train.train_tokenizer(plain)
    monkeypatch.setattr(train, "_train_step", step_then_signal)
    opts = _opts(root, config, "last_signal", exit_signal_handler=True)
    result = train.train_tokenizer(opts)
    assert result["steps"] == 4 and "stopped" not in result and result["psnr"] > 0, result
    _assert_same(load_tokenizer(plain.output).state_dict(), load_tokenizer(opts.output).state_dict(), "exported")


SIGNAL_STEPS = 200  # long enough that the signal always lands inside the run


def test_sigusr1_to_one_of_two_ranks_stops_both_after_the_same_step_and_load_resumes_bitwise(setup):
    """torchrun, 2 ranks (DDP), --exit-signal-handler, no periodic saves: SIGUSR1 to rank 1's worker alone
    while it trains; both ranks stop after the same step (one MAX all-reduce per step), that step is saved,
    nothing is exported and torchrun exits 0; the rerun with --load equals an uninterrupted run bit for bit."""
    import psutil

    from data_prep.tokenizer.checkpoint import read_latest_training_iteration

    root, config = setup
    extra = ("--save-interval", "0", "--exit-signal-handler")
    _run(2, _cli(root, config, "usr1_full", SIGNAL_STEPS, *extra))
    log_file = root / "usr1.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(_command(2, _cli(root, config, "usr1", SIGNAL_STEPS, *extra)), cwd=REPO, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not re.search(r"step +3 \|",
                                                                                     log_file.read_text()):
            time.sleep(0.01)
        workers = [p for p in psutil.Process(proc.pid).children() if LAUNCHER in " ".join(p.cmdline())]
        rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
        assert len(workers) == 2 and len(rank1) == 1, (workers, log_file.read_text()[-2000:])
        rank1[0].send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc)
    text = log_file.read_text()
    assert code == 0, text[-3000:]
    result = json.loads(text.strip().splitlines()[-1])
    stopped_at = result["steps"]
    print(f"\nSIGUSR1 to rank 1 after step 3 was logged: both ranks stopped after step {stopped_at}")
    assert 3 <= stopped_at < SIGNAL_STEPS and "exit signal received (--exit-signal-handler)" in result["stopped"]
    ckpt = root / "usr1" / "ckpt"
    assert read_latest_training_iteration(ckpt) == stopped_at  # saved at the stop, by both ranks
    assert {p.name for p in (ckpt / f"iter_{stopped_at:07d}").iterdir()} >= {"state.pt", "rng_rank0.pt",
                                                                              "rng_rank1.pt"}
    assert not (root / "usr1" / "tok.safetensors").exists()

    out = _run(2, _cli(root, config, "usr1", SIGNAL_STEPS, *extra, "--load", str(ckpt)))
    assert f"resumed from {ckpt / f'iter_{stopped_at:07d}'} at step {stopped_at}" in out.stdout + out.stderr
    assert_same_run(root, "usr1_full", "usr1", SIGNAL_STEPS)


# ------------------------------------------------------------------------- interrupted saves


@pytest.fixture(scope="module")
def short_run(setup):
    """In-process 4-step run with checkpoints at steps 2 and 4."""
    from data_prep.tokenizer.train import train_tokenizer

    root, config = setup
    opts = _opts(root, config, "short")
    assert train_tokenizer(opts)["steps"] == 4
    return Path(opts.save)


def _copy(short_run: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(short_run, ckpt)
    return ckpt


def test_an_interrupted_save_is_never_chosen_as_latest(setup, short_run, tmp_path, caplog):
    """A staging directory with partial content (and a stray latest-file temp naming it) beside the complete
    iter_0000004: --load resumes from step 4, the leftovers are cleaned at the next save."""
    from data_prep.tokenizer.checkpoint import verify_training_checkpoint
    from data_prep.tokenizer.train import latest_iteration, train_tokenizer

    root, config = setup
    ckpt = _copy(short_run, tmp_path)
    partial = ckpt / ".iter_0000006.tmp"  # what a SIGKILL in the middle of the step-6 save leaves
    shutil.copytree(ckpt / "iter_0000004", partial)
    (partial / "manifest.json").unlink()
    data = (partial / "state.pt").read_bytes()
    (partial / "state.pt").write_bytes(data[: len(data) // 3])
    stray = ckpt / ".latest_checkpointed_iteration.txt.0123abcd.tmp"
    stray.write_text("6\n")
    assert latest_iteration(ckpt) == 4

    opts = _opts(root, config, "interrupted", save=str(ckpt), load=str(ckpt), train_steps=6)
    with caplog.at_level(logging.INFO, logger="data_prep.tokenizer.train"):
        assert train_tokenizer(opts)["steps"] == 6
    assert f"resumed from {ckpt / 'iter_0000004'} at step 4" in caplog.text
    assert latest_iteration(ckpt) == 6 and not partial.exists() and not stray.exists()
    manifest = verify_training_checkpoint(ckpt / "iter_0000006")
    assert set(manifest["files"]) == {"state.pt", "rng_rank0.pt"} and manifest["step"] == 6
    assert int(_load(ckpt / "iter_0000006", "state.pt")["step"]) == 6
    # LeCam's anchors are per rank (EMAs of that rank's logits): saved with the rank's RNG and restored from it
    rank_state = _load(ckpt / "iter_0000006", "rng_rank0.pt")
    assert set(rank_state) == {"generator", "torch", "lecam"}
    _assert_same(rank_state["lecam"], _load(ckpt / "iter_0000006", "state.pt")["lecam"])


def test_a_checkpoint_published_before_a_crash_but_not_marked_latest_is_replaced(setup, short_run, tmp_path):
    """iter_0000004 renamed into place but the latest file still names step 2 (killed between the two
    renames): --load resumes from step 2 and the re-save of step 4 replaces the orphan directory."""
    from data_prep.tokenizer.train import latest_iteration, train_tokenizer

    root, config = setup
    ckpt = _copy(short_run, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2\n")
    (ckpt / "iter_0000004" / "state.pt").write_bytes(b"orphan")
    opts = _opts(root, config, "orphan", save=str(ckpt), load=str(ckpt))
    assert train_tokenizer(opts)["steps"] == 4 and latest_iteration(ckpt) == 4
    _assert_same(_load(short_run / "iter_0000004", "state.pt"), _load(ckpt / "iter_0000004", "state.pt"))
    assert not list(ckpt.glob(".*.tmp"))


def test_a_new_run_into_another_runs_save_replaces_its_checkpoint(setup, short_run, tmp_path, caplog):
    """--save already holds another run's checkpoints of the same steps and the new run has no --load: its
    final state is saved over them (not skipped as already saved: a later --load would resume the other run),
    with a warning; a run resumed from --save at its last step leaves that checkpoint as it is."""
    from data_prep.tokenizer.train import latest_iteration, train_tokenizer

    root, config = setup
    ckpt = _copy(short_run, tmp_path)
    mine = dict(lr=2e-3, save_interval=0)  # another run: another learning rate, only the final save
    with caplog.at_level(logging.WARNING, logger="data_prep.tokenizer.train"):
        assert train_tokenizer(_opts(root, config, "other", save=str(ckpt), **mine))["steps"] == 4
    assert f"--save {ckpt} already holds checkpoints of another run (latest: step 4)" in caplog.text
    reference = tmp_path / "reference"  # the same run into an empty --save
    assert train_tokenizer(_opts(root, config, "reference", save=str(reference), **mine))["steps"] == 4
    assert latest_iteration(ckpt) == 4
    saved, theirs = _load(ckpt / "iter_0000004", "state.pt"), _load(short_run / "iter_0000004", "state.pt")
    _assert_same(_load(reference / "iter_0000004", "state.pt"), saved)
    assert not all(torch.equal(saved["model"][k], theirs["model"][k]) for k in theirs["model"])

    before = (ckpt / "iter_0000004" / "state.pt").stat()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_prep.tokenizer.train"):
        again = _opts(root, config, "again", save=str(ckpt), load=os.path.relpath(ckpt), **mine)  # the same folder
        assert train_tokenizer(again)["steps"] == 4
    after = (ckpt / "iter_0000004" / "state.pt").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not saved again
    assert "another run" not in caplog.text


# ------------------------------------------------------------------ damaged / mismatched --load


def _refused(opts, match: str) -> str:
    """Run train_tokenizer(opts), expect TrainingCheckpointError matching ``match``; no training happened."""
    from data_prep.tokenizer.checkpoint import TrainingCheckpointError
    from data_prep.tokenizer.train import train_tokenizer

    before = sorted(p.name for p in Path(opts.load).iterdir())
    with pytest.raises(TrainingCheckpointError, match=match) as info:
        train_tokenizer(opts)
    assert sorted(p.name for p in Path(opts.load).iterdir()) == before  # nothing saved
    assert not Path(opts.output).exists()  # nothing exported
    return str(info.value)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"state\.pt has \d+ bytes, expected \d+ \(truncated\?\)"),
    ("missing_rng", r"rng_rank0\.pt is missing"),
    ("flip_byte", r"state\.pt has another SHA-256 than when it was written"),
    ("bad_manifest", r"unreadable manifest\.json"),
    ("legacy_truncated", r"cannot read state\.pt"),
    ("bad_latest", r"does not hold an iteration number: 'iter4'"),
    ("latest_names_missing", r"names iteration 8 but .*iter_0000008 is missing"),
])
def test_load_of_a_damaged_checkpoint_fails_before_training(setup, short_run, tmp_path, damage, message):
    root, config = setup
    ckpt = _copy(short_run, tmp_path)
    folder = ckpt / "iter_0000004"
    state = folder / "state.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "missing_rng":
        (folder / "rng_rank0.pt").unlink()
    elif damage == "flip_byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "bad_manifest":
        (folder / "manifest.json").write_text('{"format": "megatron-nbp-tok')
    elif damage == "legacy_truncated":  # a checkpoint from before manifests existed
        (folder / "manifest.json").unlink()
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "bad_latest":
        (ckpt / "latest_checkpointed_iteration.txt").write_text("iter4\n")
    elif damage == "latest_names_missing":
        (ckpt / "latest_checkpointed_iteration.txt").write_text("8\n")
    text = _refused(_opts(root, config, f"damaged_{damage}", load=str(ckpt), save=None, train_steps=6), message)
    assert str(ckpt) in text
    if damage not in ("bad_latest", "latest_names_missing"):
        assert f"checkpoint {folder} is damaged" in text


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "other.yaml"
    path.write_text(SMALL_MODEL + extra)
    return path


def test_load_of_a_checkpoint_for_other_settings_fails_naming_each_difference(setup, short_run, tmp_path):
    root, _ = setup
    ckpt = _copy(short_run, tmp_path)
    folder = ckpt / "iter_0000004"

    def opts(config, **overrides):
        return _opts(root, config, "mismatch", load=str(ckpt), save=None, train_steps=6, **overrides)

    wider = _config(tmp_path, "").read_text().replace("base_channels: 4", "base_channels: 8")
    (tmp_path / "wider.yaml").write_text(wider)
    text = _refused(opts(tmp_path / "wider.yaml"), "does not match this run")
    assert text == f"checkpoint {folder} does not match this run: model.base_channels: checkpoint 4 vs current 8"

    text = _refused(opts(_config(tmp_path, "  levels: [8, 5, 5, 5]\n")), "does not match this run")
    assert "model.levels: checkpoint [8, 8, 8, 5, 5, 5] vs current [8, 5, 5, 5]" in text
    assert "codebook_size: checkpoint 64000 vs current 1000" in text and str(folder) in text

    text = _refused(opts(_config(tmp_path, ""), resolution=32), "does not match this run")
    assert "latent_shape: checkpoint [2, 2, 2] vs current [2, 4, 4]" in text and "resolution: checkpoint 16 vs current 32" in text

    text = _refused(opts(_config(tmp_path, ""), disc_channels=8), "does not match this run")
    assert text.endswith("discriminator.channels: checkpoint 4 vs current 8")

    # another number of ranks: the per-rank data order and RNG cannot be continued
    from data_prep.tokenizer.checkpoint import TrainingCheckpointError, check_training_settings

    saved = json.loads((folder / "manifest.json").read_text())["settings"]
    with pytest.raises(TrainingCheckpointError, match="world_size: checkpoint 1 vs current 2$"):
        check_training_settings(saved, dict(saved, world_size=2), folder)
    check_training_settings(saved, dict(saved, discriminator=None, ema=None), folder)  # unused here: not compared

    # a checkpoint without manifest (older format): the tensors themselves are checked
    (folder / "manifest.json").unlink()
    text = _refused(opts(tmp_path / "wider.yaml"), "the saved tokenizer does not fit this run")
    assert str(folder) in text and "size mismatch" in text


def test_launcher_refuses_a_mismatched_checkpoint_with_a_clear_message(setup, short_run, tmp_path):
    """Through the command line: exit status 2, the reason on stderr, no traceback, nothing trained."""
    root, _ = setup
    ckpt = _copy(short_run, tmp_path)
    config = _config(tmp_path, "  levels: [8, 5, 5, 5]\n")
    proc = _run(1, _cli(root, config, "cli_mismatch", 6, "--load", str(ckpt)), expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"train_tokenizer.py: error: checkpoint {ckpt / 'iter_0000004'} does not match this run: "
            "model.levels: checkpoint [8, 8, 8, 5, 5, 5] vs current [8, 5, 5, 5]") in proc.stderr
    assert "Traceback" not in proc.stderr and "step      1" not in proc.stderr
    assert not (root / "cli_mismatch" / "tok.safetensors").exists()


@pytest.mark.parametrize("world, flags, message", [
    ("1", ["--global-batch-size", "4", "--micro-batch-size", "3"],
     "micro_batch_size 3 must divide the 4 clips per rank of a step (global_batch_size 4 / world size 1)"),
    ("2", ["--global-batch-size", "2", "--micro-batch-size", "2"],
     "micro_batch_size 2 must divide the 1 clips per rank of a step (global_batch_size 2 / world size 2)"),
    ("1", ["--batch-size", "3", "--micro-batch-size", "2"],
     "micro_batch_size 2 must divide the 3 clips per rank of a step (batch_size)"),
    ("2", ["--global-batch-size", "3"], "global_batch_size 3 must be a positive multiple of the world size 2"),
])
def test_launcher_refuses_a_batch_that_does_not_split_into_micro_batches(setup, tmp_path, monkeypatch, capsys,
                                                                         world, flags, message):
    """Before any work (no process group, no data read, nothing written): exit status 2 and one line naming
    the sizes, also for the world size torchrun would give (WORLD_SIZE)."""
    from data_prep.cli.train_tokenizer import main

    root, config = setup
    monkeypatch.setenv("WORLD_SIZE", world)
    args = _cli(root, config, "split", 2)[1:]  # without the launcher's path
    args[args.index("--save") + 1] = str(tmp_path / "ckpt")
    args[args.index("--output") + 1] = str(tmp_path / "tok.safetensors")
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train_tokenizer.py: error: {message}"], err
    assert not any(tmp_path.iterdir())


def test_launcher_refuses_an_exit_signal_handler_without_save(setup, tmp_path, monkeypatch, capsys):
    """Nothing could be saved on the signal: exit status 2 and one line, before any work."""
    from data_prep.cli.train_tokenizer import main

    root, config = setup
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = _cli(root, config, "nosave", 2)[1:]
    at = args.index("--save")
    del args[at:at + 2]
    args[args.index("--output") + 1] = str(tmp_path / "tok.safetensors")
    assert main([*args, "--exit-signal-handler"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train_tokenizer.py: error: exit_signal_handler needs save: on the signal the training state is "
                   "saved there, and a requeued job resumes from it with load"], err
    assert not any(tmp_path.iterdir())
