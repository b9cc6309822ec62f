"""A crash at each step of publishing a checkpoint, for every checkpoint writer: the megatron backend
(megatron_nbp.checkpointing.save_checkpoint), the DeepSpeed backend (megatron_nbp.deepspeed_checkpointing)
and the tokenizer trainer (data_prep.tokenizer.checkpoint).

tests/workers/crash_publish.py runs each writer's real launcher (2 ranks) and makes rank 0 exit hard
(``os._exit``) at one step of publishing iteration 2: data written / DeepSpeed's metadata / tokenizer
manifest not yet written, before the rename of the staging directory, after it, with the new pointer's
temporary file written but not in place, after the pointer; and once more before the rename while an
orphan of the same iteration (published, never named by the pointer) is in the way. Each crash is
restarted with ``--load``, which runs into the next crash; a last run trains to the end.

Compared against: the order of the steps this file states (ORDER, not read from the writers); the
pointer and the checkpoint that ``--load`` and the converter pick after each crash against the one
published before it; the restarted runs' losses against an uninterrupted run's (the logged iteration 2,
and the final iteration bitwise from TensorBoard); the final weights (converted, or the tokenizer's
whole training state) bitwise against the uninterrupted run's. The worker takes about half a minute on
2 CPU cores (forked ranks: the imports are paid once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.dist_utils import CRASH_EXIT, run

WRITERS = ("megatron", "deepspeed", "tokenizer")
ITERS, CRASH_AT = 3, 2  # the worker's runs: ITERS iterations, a save after each; crashes while publishing CRASH_AT
# Publishing, in the order each writer must do it (nbp_common.files.publish_directory for all three; "aside":
# moving an orphan of the same iteration out of the way, only when there is one, right before the rename).
ORDER = {
    "megatron": ["before_rename", "after_rename", "before_pointer", "after_pointer"],
    "deepspeed": ["before_meta", "after_meta", "before_rename", "after_rename", "before_pointer", "after_pointer"],
    "tokenizer": ["before_publish", "before_rename", "after_rename", "before_pointer", "after_pointer"],
}
FINAL_NAME = {"megatron": f"iter_{CRASH_AT:07d}", "deepspeed": f"global_step{CRASH_AT}",
              "tokenizer": f"iter_{CRASH_AT:07d}"}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    from data_prep.synthetic import write_synthetic_shards
    from tests.tokenizer_data import SMALL_MODEL, write_pattern

    root = tmp_path_factory.mktemp("publish_crash")
    write_synthetic_shards(root / "tokens", num_clips=16, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    write_pattern(root / "videos" / "a.mp4")
    write_pattern(root / "videos" / "b.mp4", frames=20)
    (root / "tokenizer.yaml").write_text(SMALL_MODEL)
    run(["tests/workers/crash_publish.py", "--writers", ",".join(WRITERS), "--work", str(root / "work"),
         "--tokens", str(root / "tokens"), "--videos", str(root / "videos"),
         "--tokenizer-config", str(root / "tokenizer.yaml")], timeout=1200)
    return root / "work", json.loads((root / "work" / "results.json").read_text())


def expected_latest(point: str) -> int:
    """The iteration the pointer must name after a crash at ``point``: only a crash after the pointer was
    replaced has published CRASH_AT."""
    return CRASH_AT if point == "after_pointer" else CRASH_AT - 1


def read_pointer(writer: str, ckpt: Path) -> int:
    """The iteration the writer's own loader picks in ``ckpt`` (raises if the pointer names a missing or
    incomplete directory)."""
    if writer == "megatron":
        from megatron_nbp.checkpointing import read_latest_iteration

        return read_latest_iteration(ckpt)
    if writer == "deepspeed":
        from megatron_nbp.deepspeed_checkpointing import read_latest_tag

        return int(read_latest_tag(ckpt).removeprefix("global_step"))
    from data_prep.tokenizer.checkpoint import read_latest_training_iteration

    return read_latest_training_iteration(ckpt)


def picked_by_loader(writer: str, ckpt: Path, out: Path) -> int:
    """The iteration the non-training loader reads from ``ckpt``: the converter (launchers/convert_checkpoint.py)
    for the training backends, the tokenizer's checkpoint loader (manifest, sizes, hashes, settings) for the
    tokenizer."""
    if writer == "tokenizer":
        from data_prep.tokenizer.checkpoint import load_training_checkpoint, verify_training_checkpoint

        step = read_pointer(writer, ckpt)
        settings = verify_training_checkpoint(ckpt / f"iter_{step:07d}")["settings"]
        return load_training_checkpoint(ckpt, 1, settings)[0]
    from megatron_nbp.inference.convert import convert_checkpoint

    convert_checkpoint(str(ckpt), str(out))
    return int(json.loads((out / "config.json").read_text())["extra"]["iteration"])


def logs(work: Path, name: str) -> str:
    """Everything the ranks of run ``name`` printed."""
    return "".join(p.read_text(errors="replace") for p in sorted((work / name / "logs").glob("rank*.log")))


def loaded_line(writer: str, ckpt: Path, iteration: int) -> str:
    """The line a restarted run prints when it resumes from ``iteration`` in ``ckpt``."""
    if writer == "tokenizer":
        return f"resumed from {ckpt / f'iter_{iteration:07d}'} at step {iteration}"
    return f"> loaded checkpoint from {ckpt} at iteration {iteration}"


def logged_iteration(writer: str, text: str, iteration: int) -> tuple[str, str]:
    """The loss and grad norm (megatron, DeepSpeed) or loss and PSNR (tokenizer) a run logged for ``iteration``."""
    pattern = (rf"step\s+{iteration} \| loss (\S+) \| psnr (\S+)" if writer == "tokenizer"
               else rf"iteration\s+{iteration}/\s+{ITERS} \|.*?lm loss: (\S+) \| grad norm: (\S+)")
    found = re.findall(pattern, text)
    assert len(found) == 1, (iteration, found, text[-3000:])
    return found[0]


def tb_scalars(logdir: Path, tag: str) -> dict[int, float]:
    """TensorBoard scalar ``tag`` of a run, by iteration (float32 as logged; {} when absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags().get("scalars", []) else {}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_crash_at_each_publishing_step_leaves_the_previous_checkpoint_as_latest(chains, writer, tmp_path):
    """Per crash: the job died exactly at that step, after the steps ORDER puts before it (nothing more,
    nothing else); the pointer, the writer's reader and the converter (tokenizer: its checkpoint loader)
    all pick the checkpoint published before the crash (CRASH_AT only once the pointer was replaced), so
    nothing half-written or unnamed is taken as latest."""
    root, results = chains
    work, runs = root / writer, results[writer]
    crashed = [r for r in runs if r["point"]]
    assert [r["point"] for r in crashed] == [p for p in ["before_publish", "before_meta"] if p in ORDER[writer]] + [
        "before_rename", "after_rename", "orphan_before_rename", "before_pointer", "after_pointer"]
    had_orphan = False  # a published, unnamed directory of CRASH_AT before the run
    for r in crashed:
        point = r["point"]
        step = point.removeprefix("orphan_")
        info = (writer, point, r)
        assert r["status"][0] == CRASH_EXIT and all(s != 0 for s in r["status"]), info
        events = [line.split(" ", 1)[1] for line in (work / point / "events.txt").read_text().splitlines()]
        assert events[-1] == f"crash {point}", (info, events)  # it died where asked, not elsewhere
        steps = events[:-1]
        aside = [e for e in steps if e.endswith("_aside")]
        assert aside == (["before_aside", "after_aside"] if had_orphan else []), (info, steps)
        steps = [e for e in steps if not e.endswith("_aside")]
        assert steps == ORDER[writer][:ORDER[writer].index(step) + 1], (info, steps)

        snapshot = work / point / "after_crash"
        latest = expected_latest(point)
        assert read_pointer(writer, snapshot) == latest, info
        assert picked_by_loader(writer, snapshot, tmp_path / point) == latest, info
        if point in ("after_rename", "before_pointer"):
            assert (snapshot / FINAL_NAME[writer]).is_dir(), info  # published but not named: an orphan
        had_orphan = (snapshot / FINAL_NAME[writer]).is_dir() and latest < CRASH_AT


@pytest.mark.parametrize("writer", WRITERS)
def test_each_restart_resumes_from_the_checkpoint_published_before_the_crash(chains, writer):
    """Run k + 1 of the chain restarts from what crash k left: it names the expected checkpoint as loaded
    and, where it trains iteration CRASH_AT again, logs the uninterrupted run's loss for it."""
    root, results = chains
    work, runs = root / writer, results[writer]
    reference = logged_iteration(writer, logs(work, "reference"), CRASH_AT)
    for before, after in zip(runs[1:], runs[2:]):
        latest = expected_latest(before["point"])
        text = logs(work, after["name"])
        assert loaded_line(writer, work / "ckpt", latest) in text, (writer, before["point"], text[-3000:])
        if latest < CRASH_AT:
            assert logged_iteration(writer, text, CRASH_AT) == reference, (writer, after["name"])


@pytest.mark.parametrize("writer", WRITERS)
def test_the_run_after_the_crashes_ends_equal_to_an_uninterrupted_run(chains, writer, tmp_path):
    """The last run, after all the crashes, ends with the uninterrupted run's losses and weights (bitwise),
    and the next saves removed what the crashes left behind."""
    root, results = chains
    work, final = root / writer, results[writer][-1]
    assert final["name"] == "final" and final["status"] == [0, 0], final
    ckpt, ref_ckpt = work / "ckpt", work / "reference" / "ckpt"
    assert read_pointer(writer, ckpt) == read_pointer(writer, ref_ckpt) == ITERS
    tag = "train/loss" if writer == "tokenizer" else "lm-loss"
    full, resumed = tb_scalars(work / "reference" / "tb", tag), tb_scalars(work / "final" / "tb", tag)
    assert sorted(full) == list(range(1, ITERS + 1)) and sorted(resumed) == list(range(CRASH_AT + 1, ITERS + 1))
    for step in resumed:
        assert resumed[step] == full[step], (writer, step, resumed[step], full[step])  # bitwise on CPU
    if writer == "tokenizer":
        from data_prep.tokenizer import load_tokenizer
        from tests.distributed.test_tokenizer_recipe import _assert_same

        def load(folder: Path, name: str):
            return torch.load(folder / f"iter_{ITERS:07d}" / name, map_location="cpu", weights_only=True)

        for name in ("state.pt", "rng_rank0.pt", "rng_rank1.pt"):
            _assert_same(load(ref_ckpt, name), load(ckpt, name), name)
        _assert_same(load_tokenizer(work / "reference" / "tok.safetensors").state_dict(),
                     load_tokenizer(work / "tok.safetensors").state_dict(), "exported tokenizer")
    else:
        from safetensors.torch import load_file

        from megatron_nbp.inference.convert import convert_checkpoint

        convert_checkpoint(str(ref_ckpt), str(tmp_path / "reference"))
        convert_checkpoint(str(ckpt), str(tmp_path / "resumed"))
        a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("reference", "resumed"))
        assert sorted(a) == sorted(b) and len(a) > 10
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # whatever the crashes left (staging directories, orphans, pointer temporaries) is gone after the next saves
    leftovers = sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == [], (writer, leftovers)
