"""Tokenizer DDP equals one process with the same global batch: ``torchrun --nproc-per-node 2`` with 2 clips per
rank (in one pass, or as 2 micro-batches of 1 with accumulated gradients) and plain ``python`` with 4 clips per
step, all through launchers/train_tokenizer.py, end with the same weights, optimizer moments and per-step losses
within an fp32 tolerance; a run that differs only in its data (rank 0's half of the global batch alone) lands
far outside that tolerance. In one process with the GAN, LeCam and EMA on, micro-batches equal one pass too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run, torchrun
from tests.tokenizer_data import write_two_videos

LAUNCHER = "launchers/train_tokenizer.py"
STEPS = 4
GLOBAL_BATCH = 4
# fp32: the runs sum the same per-clip terms in another order (a mean over 4 clips vs the all-reduced mean of
# two means over 2, or of micro-batches). Adam turns that rounding into weight differences where a gradient
# component is near its epsilon, in a few elements each, by up to about lr x (rounding / epsilon): the
# largest single-element difference is therefore a poor measure (2e-6 to 2e-5 of the weight scale and up to
# 6e-3 of a tensor's own largest magnitude, depending on the videos and the machine's kernels). The tests
# compare L2 norms over all elements instead. Over 12 variants of the videos (2 ranks, with and without
# micro-batches) and 25 of the GAN test below, the differences were at most 2.3e-6 of a kind's norm (weights,
# first or second moments) but once 1.2e-5, and at most 1e-3 of a tensor's own norm; a wrong gradient scale,
# a missed all-reduce or other data give 1e-1 to 1e1 (the controls).
NORM_TOL = 1e-4  # of a kind's norm (:func:`_differences`)
TENSOR_TOL = 1e-2  # of a tensor's own norm
REL_TOL = 1e-5  # of per-step losses, the final loss and PSNR, LeCam's anchors (about 1e-7 apart)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two synthetic pattern videos (24 and 20 frames) and a tiny tokenizer config."""
    root = tmp_path_factory.mktemp("tokddp")
    write_two_videos(root)
    return root


@pytest.fixture(scope="module")
def runs(data):
    """The 1-rank and 2-rank runs with global batch 4 and the control run (1 rank, global batch 2)."""
    root, config = data, data / "small.yaml"

    def cli(name: str, global_batch: int = GLOBAL_BATCH, *extra: str) -> list[str]:
        # GAN, EMA and image steps off: the tokenizer's reconstruction loss alone (per-rank terms excluded);
        # no gradient clipping, which would hide a wrong gradient scale from the weights and Adam's moments
        return [LAUNCHER, "--config", str(config), "--data", str(root / "videos"), "--device", "cpu",
                "--output", str(root / name / "tok.safetensors"), "--resolution", "16", "--num-frames", "5",
                "--train-steps", str(STEPS), "--global-batch-size", str(global_batch), "--lr", "1e-3",
                "--warmup-steps", "2", "--seed", "3", "--log-interval", "1", "--eval-clips", "8",
                "--image-every", "0", "--disc-weight", "0", "--ema-decay", "0", "--holdout-fraction", "0.25",
                "--grad-clip", "0",
                "--save", str(root / name / "ckpt"), "--tensorboard-dir", str(root / name / "tb"), *extra]

    results = {"one": run(cli("one"), timeout=300), "two": torchrun(2, *cli("two"), timeout=300),
               "two_micro": torchrun(2, *cli("two_micro", GLOBAL_BATCH, "--micro-batch-size", "1"), timeout=300),
               "half": run(cli("half", global_batch=GLOBAL_BATCH // 2), timeout=300)}
    assert "4 clips per step (2 micro-batches of 1 per rank)" in results["two_micro"].stderr
    return root, {name: json.loads(proc.stdout.strip().splitlines()[-1]) for name, proc in results.items()}


def _checkpoint(root: Path, name: str, file: str = "state.pt") -> dict:
    return torch.load(root / name / "ckpt" / f"iter_{STEPS:07d}" / file, map_location="cpu", weights_only=True)


def _tensors(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The exported tokenizer's weights plus the checkpoint's model weights and Adam moments, by name."""
    from data_prep.tokenizer import load_tokenizer

    state = _checkpoint(root, name)
    out = {f"exported.{k}": v for k, v in load_tokenizer(root / name / "tok.safetensors").state_dict().items()}
    out.update({f"model.{k}": v for k, v in state["model"].items()})
    for index, moments in state["optimizer"]["state"].items():
        out.update({f"adam.{index}.{k}": v for k, v in moments.items() if k != "step"})
    return out


def _kind(key: str) -> str:
    """The kind a tensor is summed into by :func:`_differences`: exported weights, checkpoint weights, Adam's
    first or second moments."""
    head = key.split(".")[0]
    return head + (".exp_avg_sq" if key.endswith("exp_avg_sq") else "")


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, tuple[float, str]]:
    """The largest relative differences of ``b`` from ``a`` in L2 norm (float64 sums), with where each occurs:

    * ``"kind"``: ``||a - b|| / ||a||`` over all elements of all tensors of a kind (:func:`_kind`: exported
      weights, checkpoint weights, Adam's first or second moments, ...), the largest over the kinds;
    * ``"tensor"``: ``||a_t - b_t|| / ||a_t||`` per tensor, the largest over the tensors; the denominator is at
      least 1e-3 of the kind's root mean square times ``sqrt(numel)``, so a near-zero tensor is not judged by
      rounding alone."""
    assert set(a) == set(b) and a
    sums: dict[str, list[float]] = {}  # kind -> [sum of squares of a, of a - b, element count]
    tensors: dict[str, tuple[float, float]] = {}
    for key, value in a.items():
        assert value.dtype == b[key].dtype == torch.float32 and value.shape == b[key].shape, key
        assert torch.isfinite(value).all() and torch.isfinite(b[key]).all(), key  # a NaN would compare as 0
        norm, diff = float(value.double().norm()), float((value.double() - b[key].double()).norm())
        tensors[key] = (norm, diff)
        total = sums.setdefault(_kind(key), [0.0, 0.0, 0])
        total[0], total[1], total[2] = total[0] + norm ** 2, total[1] + diff ** 2, total[2] + value.numel()
    worst = {"kind": (0.0, ""), "tensor": (0.0, "")}
    for kind, (norm2, diff2, _) in sums.items():
        worst["kind"] = max(worst["kind"], ((diff2 / max(norm2, 1e-60)) ** 0.5, kind))
    for key, (norm, diff) in tensors.items():
        norm2, _, count = sums[_kind(key)]
        floor = 1e-3 * (norm2 / count) ** 0.5 * a[key].numel() ** 0.5
        worst["tensor"] = max(worst["tensor"], (diff / max(norm, floor, 1e-30), key))
    return worst


def _report(label: str, worst: dict[str, tuple[float, str]]) -> str:
    return (f"{label}: worst difference {worst['kind'][0]:.3e} of a kind's norm ({worst['kind'][1]}), "
            f"{worst['tensor'][0]:.3e} of a tensor's own ({worst['tensor'][1]})")


def _losses(root: Path, name: str) -> dict[int, float]:
    """Per-step ``train/loss`` TensorBoard scalars of a run (what it logged every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / name / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.mark.parametrize("name, label", [("two", "2 ranks x 2"), ("two_micro", "2 ranks x 2 micro-batches of 1")])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs, name, label):
    root, results = runs
    one, two = _tensors(root, "one"), _tensors(root, name)
    worst = _differences(one, two)
    print("\n" + _report(f"{label} vs 1 rank x 4", worst) + f" (tolerances {NORM_TOL}, {TENSOR_TOL})")
    assert worst["kind"][0] <= NORM_TOL and worst["tensor"][0] <= TENSOR_TOL, worst

    losses_one, losses_two = _losses(root, "one"), _losses(root, name)
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
    loss_rel = max(abs(losses_one[s] - losses_two[s]) / abs(losses_one[s]) for s in losses_one)
    print(f"per-step losses {losses_one} vs {losses_two}: worst relative difference {loss_rel:.3e}")
    assert loss_rel <= REL_TOL, (losses_one, losses_two)
    for key in ("final_loss", "psnr"):  # the result JSON: means over the ranks / over every rank's eval clips
        assert results[name][key] == pytest.approx(results["one"][key], rel=REL_TOL), key
    assert results["one"]["eval_clips"] == results[name]["eval_clips"] > 1  # each rank evaluated its share

    # the data order: one generator state for every rank, the same as the 1-rank run's after as many draws
    generator = _checkpoint(root, "one", "rng_rank0.pt")["generator"]
    for rank in (0, 1):
        assert torch.equal(_checkpoint(root, name, f"rng_rank{rank}.pt")["generator"], generator), rank


def test_a_run_with_other_data_is_far_outside_the_tolerance(runs):
    """The control of the test above: rank 0's half of the global batch alone trains to other weights and
    losses, by over 100 times the tolerance."""
    root, _ = runs
    one, half = _tensors(root, "one"), _tensors(root, "half")
    losses_one, losses_half = _losses(root, "one"), _losses(root, "half")

    control = _differences(one, half)
    control_loss = max(abs(losses_one[s] - losses_half[s]) / abs(losses_one[s]) for s in losses_one)
    print("\n" + _report("control (1 rank x 2)", control) + f", losses {control_loss:.3e}")
    assert control["kind"][0] > 100 * NORM_TOL and control["tensor"][0] > 10 * TENSOR_TOL, control
    assert control_loss > 100 * REL_TOL, control_loss


def test_ranks_draw_their_rows_of_one_global_batch(data):
    """ClipBank alone: per rank, rows [r*b, (r+1)*b) of the clips (and image frames, and flips) that one
    process draws for the global batch, with the generators left in the same state."""
    from data_prep.tokenizer.clips import load_clip_bank

    videos = data / "videos"
    for method, b, extra in (("sample_clips", 2, {}), ("sample_images", 3, {}), ("sample_clips", 2, {"crop": 8})):
        whole_gen = torch.Generator().manual_seed(5)
        whole = getattr(load_clip_bank(videos, 16, 5, holdout_fraction=0.25), method)(2 * b, whole_gen, **extra)
        for rank in (0, 1):
            bank = load_clip_bank(videos, 16, 5, rank=rank, world_size=2, holdout_fraction=0.25)
            gen = torch.Generator().manual_seed(5)
            part = getattr(bank, method)(b, gen, **extra)
            assert torch.equal(part, whole[rank * b:(rank + 1) * b]), (method, rank)
            assert torch.equal(gen.get_state(), whole_gen.get_state()), (method, rank)
    one = load_clip_bank(videos, 16, 5, holdout_fraction=0.25)
    ranks = [load_clip_bank(videos, 16, 5, rank=r, world_size=2, holdout_fraction=0.25) for r in (0, 1)]
    assert ranks[0].windows == ranks[1].windows == one.windows  # every rank holds all training windows
    assert sorted(ranks[0].eval_windows + ranks[1].eval_windows) == sorted(one.eval_windows)
    assert not set(ranks[0].eval_windows) & set(ranks[1].eval_windows)  # evaluation stays split
    with pytest.raises(ValueError, match="rank 2 is not in"):
        load_clip_bank(videos, 16, 5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        one.sample_clips(0, torch.Generator())


def test_training_crops_are_squares_of_the_clips_drawn_without_them(data, tmp_path):
    """``crop``: the same window picks and flips as a draw without it, then a random square per clip from
    the next draws of the generator; whole frames when unset; bad sizes refused in one line, before any
    training (``--crop-size`` must fit the resolution and the tokenizer's spatial stride)."""
    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.config import TrainOptions
    from data_prep.tokenizer.train import _checked_config

    bank = load_clip_bank(data / "videos", 16, 5, holdout_fraction=0.25)
    plain_gen, crop_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    whole = bank.sample_clips(4, plain_gen)
    cropped = bank.sample_clips(4, crop_gen, crop=8)
    corners = torch.randint(16 - 8 + 1, (4, 2), generator=plain_gen).tolist()
    assert cropped.shape == (4, 3, 5, 8, 8) and len({tuple(c) for c in corners}) > 1
    for row, (y, x) in enumerate(corners):
        assert torch.equal(cropped[row], whole[row, ..., y:y + 8, x:x + 8]), row
    assert torch.equal(plain_gen.get_state(), crop_gen.get_state())
    assert torch.equal(bank.sample_clips(2, torch.Generator().manual_seed(1), crop=16),
                       bank.sample_clips(2, torch.Generator().manual_seed(1)))  # a full-size crop is the frame
    for bad in (0, 17):
        with pytest.raises(ValueError, match=rf"crop must be in \[1, 16\] \(the frames' size\), got {bad}"):
            bank.sample_clips(2, torch.Generator(), crop=bad)

    def options(crop):
        return TrainOptions(config=str(data / "small.yaml"), data=str(data / "videos"), output=str(tmp_path / "t"),
                            resolution=32, num_frames=5, crop_size=crop)

    assert _checked_config(options(16)) is not None
    with pytest.raises(ValueError, match="--crop-size 48 is larger than --resolution 32"):
        _checked_config(options(48))
    with pytest.raises(ValueError, match="--crop-size 12: .*multiple of the spatial stride 8"):
        _checked_config(options(12))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_clips_are_the_in_memory_banks(data, tmp_path, workers):
    """clip_source "stream" (frame counts only, every drawn clip decoded from its file, in ``workers``
    processes): the same windows, the same clips, image frames, flips and crops, bitwise, as the bank that
    holds the decoded frames, and the same per-rank rows; an unreadable file is skipped in both; with
    workers, the next clip draw is decoded ahead and used."""
    import shutil

    from data_prep.tokenizer.clips import load_clip_bank

    videos = tmp_path / "videos"
    shutil.copytree(data / "videos", videos)
    (videos / "broken.mp4").write_bytes(b"not a video")
    for rank, world in ((0, 1), (1, 2)):
        memory = load_clip_bank(videos, 16, 5, rank=rank, world_size=world, holdout_fraction=0.25)
        stream = load_clip_bank(videos, 16, 5, rank=rank, world_size=world, holdout_fraction=0.25,
                                clip_source="stream", num_workers=workers)
        assert stream.videos is None and stream.names == memory.names == ["a.mp4", "b.mp4"]
        assert stream.windows == memory.windows and stream.eval_windows == memory.eval_windows
        for method, b, extra in (("sample_clips", 3, {}), ("sample_images", 3, {}), ("sample_clips", 2, {"crop": 8})):
            gens = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
            for _ in range(2):
                expected = getattr(memory, method)(b, gens[0], **extra)
                assert torch.equal(getattr(stream, method)(b, gens[1], **extra), expected), (method, rank)
        for window in memory.eval_windows:
            assert torch.equal(stream.clip(*window), memory.clip(*window))
        if workers:  # consecutive clip draws: the second one's clips were decoded ahead, during the "step"
            gens = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
            stream.sample_clips(2, gens[1]), memory.sample_clips(2, gens[0])
            decoded = []
            frames = stream._frames
            stream._frames = lambda requests: decoded.append(requests) or frames(requests)
            assert torch.equal(stream.sample_clips(2, gens[1]), memory.sample_clips(2, gens[0]))
            assert decoded == [], decoded  # nothing decoded on demand: the prefetched clips were used
            del stream._frames
    with pytest.raises(ValueError, match="clip_source must be one of"):
        load_clip_bank(videos, 16, 5, clip_source="disk")


def test_training_from_streamed_clips_equals_training_from_memory(data, tmp_path):
    """--clip-source stream through the trainer: the same weights, bitwise, after the same steps."""
    from data_prep.tokenizer import load_tokenizer
    from data_prep.tokenizer.config import TrainOptions
    from data_prep.tokenizer.train import train_tokenizer

    weights = {}
    for source in ("memory", "stream"):
        opts = TrainOptions(config=str(data / "small.yaml"), data=str(data / "videos"),
                            output=str(tmp_path / source / "tok.safetensors"), resolution=16, num_frames=5,
                            train_steps=3, batch_size=2, lr=1e-3, warmup_steps=1, seed=3, log_interval=100,
                            eval_clips=2, image_every=2, image_batch_size=2, holdout_fraction=0.25,
                            clip_source=source, device="cpu")
        train_tokenizer(opts)
        weights[source] = load_tokenizer(opts.output).state_dict()
    for key, value in weights["memory"].items():
        assert torch.equal(value, weights["stream"][key]), key


def test_decode_processes_ignore_the_signals_a_scheduler_sends_to_the_job(data):
    """SLURM and torchrun signal a training process's whole process group: the stream bank's decode processes
    ignore SIGTERM / SIGUSR1 / SIGINT, so a step waiting for their clips (prefetched ones included) still gets
    them and can be saved; close() ends them."""
    import os
    import signal
    import time

    from data_prep.tokenizer.clips import load_clip_bank

    bank = load_clip_bank(data / "videos", 16, 5, clip_source="stream", num_workers=2)
    memory = load_clip_bank(data / "videos", 16, 5)
    processes = list(bank._workers()._processes.values())  # all started; still booting, perhaps
    assert len(processes) == 2

    def signal_all():
        for process in processes:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                os.kill(process.pid, sig)

    signal_all()  # while they boot: blocked until their initializer ignores the signals
    generator, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(bank.sample_clips(3, generator), memory.sample_clips(3, reference), rtol=0, atol=0)
    signal_all()  # while they decode the next batch ahead
    time.sleep(0.5)
    assert all(process.is_alive() for process in processes)
    torch.testing.assert_close(bank.sample_clips(3, generator), memory.sample_clips(3, reference), rtol=0, atol=0)
    bank.close()
    assert bank._pool is None and not any(process.is_alive() for process in processes)


def test_a_window_past_the_decodable_frames_repeats_the_last_one(data, caplog):
    """A container may count more frames than decode (seen: a VP9 AVI, 300 vs 295): a streamed window past the
    end repeats the last decodable frame, logged, instead of ending the run."""
    from data_prep import video_io
    from data_prep.tokenizer.clips import _decode_window

    path = str(data / "videos" / "b.mp4")  # 20 frames
    frames, _ = video_io.decode_video(path, size=16)
    window = _decode_window(path, 18, 23, 1, 16)
    assert window.shape == (5, 16, 16, 3)
    assert np.array_equal(window[:2], frames[18:20]) and all(np.array_equal(f, frames[19]) for f in window[2:])
    assert "repeating the last frame" in caplog.text
    assert np.array_equal(_decode_window(path, 3, 8, 2, 16), frames[3:8:2])


def _trained_state(opts) -> tuple[dict[str, torch.Tensor], dict]:
    """Train in this process; returns the final checkpoint's float32 tensors by name (tokenizer, discriminator,
    EMA, both optimizers' moments) and its float64 LeCam anchors."""
    from data_prep.tokenizer.train import train_tokenizer

    train_tokenizer(opts)
    state = torch.load(Path(opts.save) / f"iter_{opts.train_steps:07d}" / "state.pt", weights_only=True)
    out = {}
    for part in ("model", "discriminator", "ema"):
        out.update({f"{part}.{k}": v for k, v in state[part].items() if v.dtype == torch.float32})
    for part in ("optimizer", "disc_optimizer"):
        for index, moments in state[part]["state"].items():
            out.update({f"{part}.{index}.{k}": v for k, v in moments.items() if k != "step"})
    return out, state["lecam"]


def test_micro_batches_with_the_gan_on_equal_one_pass(data):
    """One process, 4 clips per step, the GAN (from the first step), LeCam and EMA on: as 4 micro-batches of 1
    a run ends with the same tokenizer, discriminator, EMA, Adam moments of both and LeCam anchors as in one
    pass, within the fp32 tolerances above (the same sums in another order; 2 steps); a run on other clips (2
    per step) lands far outside. Off: the adaptive GAN weight (a gradient-norm ratio, taken per micro-batch)
    and gradient clipping (it would hide a wrong gradient scale, which Adam's moments show without it)."""
    from tests.distributed.test_tokenizer_recipe import _opts

    config = data / "small.yaml"
    common = dict(batch_size=4, train_steps=2, adaptive_weight=False, eval_clips=2, grad_clip=0.0, disc_start=0,
                  image_every=0)
    whole, lecam_whole = _trained_state(_opts(data, config, "gan_whole", **common))
    micro, lecam_micro = _trained_state(_opts(data, config, "gan_micro", micro_batch_size=1, **common))
    other, _ = _trained_state(_opts(data, config, "gan_other", **{**common, "batch_size": 2}))
    assert any(k.startswith("discriminator.") for k in whole)
    assert any(k.startswith("disc_optimizer.") for k in whole)

    worst = _differences(whole, micro)
    print("\n" + _report("4 micro-batches of 1 vs 1 x 4, GAN on", worst) + f" (tolerances {NORM_TOL}, {TENSOR_TOL})")
    assert worst["kind"][0] <= NORM_TOL and worst["tensor"][0] <= TENSOR_TOL, worst
    for key in ("ema_real", "ema_fake"):  # moved once per step, by the means over all 4 clips
        assert float(lecam_whole[key]) != 0.0
        assert float(lecam_micro[key]) == pytest.approx(float(lecam_whole[key]), rel=REL_TOL, abs=1e-9), key
    control = _differences(whole, other)
    print(_report("control (2 clips per step)", control))
    assert control["kind"][0] > 100 * NORM_TOL and control["tensor"][0] > 10 * TENSOR_TOL, control


def test_ddp_all_reduces_once_per_step_however_many_micro_batches(data, tmp_path):
    """DDP in this process (a 1-rank gloo group; the trainer wraps the tokenizer and the discriminator as for
    any world size > 1): a step in 4 micro-batches all-reduces each gradient bucket once, as a step in one
    pass does (DDP's no_sync on all but the last micro-batch), not 4 times."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from data_prep.tokenizer.clips import load_clip_bank
    from data_prep.tokenizer.train import _checked_config, _train_step, _Trainables
    from tests.distributed.test_tokenizer_recipe import _opts

    opts = _opts(data, data / "small.yaml", "hooks", batch_size=4, disc_start=0, image_every=0, save=None,
                 device="cpu")
    bank = load_clip_bank(opts.data, opts.resolution, opts.num_frames)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = {}

        def counted(name):
            def hook(state, bucket):
                calls[name] = calls.get(name, 0) + 1
                return allreduce_hook(state, bucket)
            return hook

        counts = {}
        for micro in (None, 1):
            t = _Trainables.build(opts, _checked_config(opts), 2)
            assert isinstance(t.ddp, torch.nn.parallel.DistributedDataParallel) and t.disc_ddp is not t.disc
            t.ddp.register_comm_hook(None, counted("tokenizer"))
            t.disc_ddp.register_comm_hook(None, counted("discriminator"))
            calls.clear()
            _train_step(opts, t, bank, torch.Generator().manual_seed(0), 0, 0.0, 4, micro)
            counts[micro] = dict(calls)
        print(f"\nbucket all-reduces in one step: one pass {counts[None]}, 4 micro-batches {counts[1]}")
        assert counts[None]["tokenizer"] >= 1 and counts[None]["discriminator"] >= 1
        assert counts[1] == counts[None]
    finally:
        dist.destroy_process_group()
