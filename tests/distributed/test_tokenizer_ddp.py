"""Tokenizer DDP equals one process with the same global batch: ``torchrun --nproc-per-node 2`` with 2 clips per
rank and plain ``python`` with 4 clips per step, both through launchers/train_tokenizer.py, end with the same
weights, optimizer moments and per-step losses within an fp32 tolerance; a run that differs only in its
data (rank 0's half of the global batch alone) lands far outside that tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run, torchrun
from tests.distributed.test_tokenizer_recipe import _write_pattern

LAUNCHER = "launchers/train_tokenizer.py"
SMALL_MODEL = ("model:\n  base_channels: 4\n  channel_multipliers: [1, 1, 2, 2]\n  num_res_blocks: 1\n"
               "  num_mid_blocks: 0\n  temporal_downsample: [true, true, false]\n  norm_groups: 2\n")
STEPS = 4
GLOBAL_BATCH = 4
# fp32: the two runs sum the same per-clip terms in another order (a mean over 4 clips vs the all-reduced
# mean of two means over 2); after 4 Adam steps that leaves differences of about 2e-6 of the weight scale
# (the largest magnitude of each kind: weights, first and second moments) and, for the small tensors that
# Adam's first steps grow from near zero, up to about 6e-5 of a tensor's own largest magnitude (the
# synthetic videos' encoding varies a little from run to run, so these move between runs).
REL_TOL = 1e-5  # of the weight scale; losses: of the loss
TENSOR_TOL = 1e-3  # of each tensor's own largest magnitude


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two synthetic pattern videos (24 and 20 frames) and a tiny tokenizer config."""
    root = tmp_path_factory.mktemp("tokddp")
    _write_pattern(root / "videos" / "a.mp4")
    _write_pattern(root / "videos" / "b.mp4", frames=20)
    (root / "small.yaml").write_text(SMALL_MODEL)
    return root


@pytest.fixture(scope="module")
def runs(data):
    """The 1-rank and 2-rank runs with global batch 4 and the control run (1 rank, global batch 2)."""
    root, config = data, data / "small.yaml"

    def cli(name: str, global_batch: int = GLOBAL_BATCH) -> list[str]:
        # GAN, EMA and image steps off: the tokenizer's reconstruction loss alone (per-rank terms excluded)
        return [LAUNCHER, "--config", str(config), "--data", str(root / "videos"), "--device", "cpu",
                "--output", str(root / name / "tok.safetensors"), "--resolution", "16", "--num-frames", "5",
                "--train-steps", str(STEPS), "--global-batch-size", str(global_batch), "--lr", "1e-3",
                "--warmup-steps", "2", "--seed", "3", "--log-interval", "1", "--eval-clips", "8",
                "--image-every", "0", "--disc-weight", "0", "--ema-decay", "0", "--holdout-fraction", "0.25",
                "--save", str(root / name / "ckpt"), "--tensorboard-dir", str(root / name / "tb")]

    results = {"one": run(cli("one"), timeout=300), "two": torchrun(2, *cli("two"), timeout=300),
               "half": run(cli("half", global_batch=GLOBAL_BATCH // 2), timeout=300)}
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
    """Which scale a tensor is judged against: exported weights, checkpoint weights, Adam's first or second
    moments."""
    head = key.split(".")[0]
    return head + (".exp_avg_sq" if key.endswith("exp_avg_sq") else "")


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, tuple[float, str]]:
    """The largest differences of ``b`` from ``a``, with the tensor where each occurs:

    * ``"scale"``: ``max |a - b|`` over the weight scale, the largest magnitude of the tensor's kind (all
      model weights, all first moments, ...);
    * ``"tensor"``: ``max |a - b|`` over the tensor's own largest magnitude (at least 1e-3 of its kind's, so
      a near-zero tensor is not judged by rounding alone)."""
    assert set(a) == set(b) and a
    scales: dict[str, float] = {}
    for key, value in a.items():
        scales[_kind(key)] = max(scales.get(_kind(key), 0.0), float(value.abs().max()))
    worst = {"scale": (0.0, ""), "tensor": (0.0, "")}
    for key, value in a.items():
        assert value.dtype == b[key].dtype == torch.float32 and value.shape == b[key].shape, key
        diff, scale = float((value - b[key]).abs().max()), max(scales[_kind(key)], 1e-30)
        for name, rel in (("scale", diff / scale), ("tensor", diff / max(float(value.abs().max()), 1e-3 * scale))):
            if rel > worst[name][0]:
                worst[name] = (rel, key)
    return worst


def _losses(root: Path, name: str) -> dict[int, float]:
    """Per-step ``train/loss`` TensorBoard scalars of a run (what it logged every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / name / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def test_two_ranks_equal_one_rank_with_the_same_global_batch(runs):
    root, results = runs
    one, two, half = (_tensors(root, name) for name in ("one", "two", "half"))
    worst = _worst(one, two)
    print(f"\n2 ranks x 2 vs 1 rank x 4: worst difference {worst['scale'][0]:.3e} of the weight scale "
          f"({worst['scale'][1]}; tolerance {REL_TOL}), {worst['tensor'][0]:.3e} of a tensor's own scale "
          f"({worst['tensor'][1]}; tolerance {TENSOR_TOL})")
    assert worst["scale"][0] <= REL_TOL and worst["tensor"][0] <= TENSOR_TOL, worst

    losses_one, losses_two, losses_half = (_losses(root, name) for name in ("one", "two", "half"))
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
    loss_rel = max(abs(losses_one[s] - losses_two[s]) / abs(losses_one[s]) for s in losses_one)
    print(f"per-step losses {losses_one} vs {losses_two}: worst relative difference {loss_rel:.3e}")
    assert loss_rel <= REL_TOL, (losses_one, losses_two)
    for key in ("final_loss", "psnr"):  # the result JSON: means over the ranks / over every rank's eval clips
        assert results["two"][key] == pytest.approx(results["one"][key], rel=REL_TOL), key
    assert results["one"]["eval_clips"] == results["two"]["eval_clips"] > 1  # each rank evaluated its share

    # the data order: one generator state for every rank, the same as the 1-rank run's after as many draws
    generator = _checkpoint(root, "one", "rng_rank0.pt")["generator"]
    for rank in (0, 1):
        assert torch.equal(_checkpoint(root, "two", f"rng_rank{rank}.pt")["generator"], generator), rank

    # control: rank 0's half of the global batch alone trains to other weights and losses
    control = _worst(one, half)["scale"]
    control_loss = max(abs(losses_one[s] - losses_half[s]) / abs(losses_one[s]) for s in losses_one)
    print(f"control (1 rank x 2): worst difference {control[0]:.3e} of the weight scale ({control[1]}), "
          f"losses {control_loss:.3e}")
    assert control[0] > 100 * REL_TOL and control_loss > 100 * REL_TOL, (control, control_loss)

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
