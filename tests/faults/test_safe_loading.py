"""Checkpoints are loaded without trusting pickle (megatron_nbp.safe_loading), for every file a loader
unpickles, found by walking real checkpoints rather than listed by hand.

tests/workers/crash_safe_loading.py writes real checkpoints with the launchers: megatron backend (TP2),
DeepSpeed ZeRO-2 and ZeRO-3 (DP2), tokenizer trainer (2 ranks). :func:`plant_payloads` walks them; every
file must match exactly one row of FILES, which says for each loader (training ``--load`` of that
backend, ``launchers/convert_checkpoint.py``) whether it unpickles the file or why it never does. A new
kind of file in a checkpoint fails :func:`test_every_file_of_a_real_checkpoint_is_classified` until
someone adds a row. Into a copy of the checkpoint, one at a time, a payload (``os.system("touch MARKER")``)
is planted in each unpickled file, and in each pickled item of the ``.distcp`` files (every bytes item;
for tensor items, the first model and the first optimizer item of each file: every tensor item is read by
the same code). Each loader must refuse it, naming the file (and the item) and the global, and the marker
must never appear; a loader that never reads the file must load the copy without running it; the intact
checkpoint loads. A control shows the hole is real: with our check switched off, torch.distributed.checkpoint
itself runs the payload."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_nbp.checkpointing import CheckpointError
from megatron_nbp.safe_loading import UnsafeCheckpointError, safe_torch_load
from tests.dist_utils import run

KINDS = ("megatron", "zero2", "zero3", "tokenizer")
LOADERS = {"megatron": ("train", "convert"), "zero2": ("train", "convert"), "zero3": ("train", "convert"),
           "tokenizer": ("train",)}
REFUSE = "refuse"
TEXT = "never unpickled: a text file (iteration number or tag)"
JSON = "never unpickled: JSON"
SCRIPT = ("never read: DeepSpeed copies its recovery scripts next to the checkpoints for people to run by "
          "hand; no loader opens them")
RNG_NOT_EXPORTED = "never read: RNG states are no part of the inference export"
RECORD = ("never read: the run record (resolved config as YAML, versions as JSON) is written for people and "
          "for --config; no loader opens it (the record inside the checkpoint is what a loader sees)")
ZERO = [
    (r"latest", None, {"train": TEXT, "convert": TEXT}),
    (r"zero_to_fp32\.py", None, {"train": SCRIPT, "convert": SCRIPT}),
    (r"zero_to_torch\.py", None, {"train": SCRIPT, "convert": SCRIPT}),
    (r"global_step\d+/nbp_checkpoint\.json", None, {"train": JSON, "convert": JSON}),
    (r"global_step\d+/config\.yaml", None, {"train": RECORD, "convert": RECORD}),
    (r"global_step\d+/versions\.json", None, {"train": RECORD, "convert": RECORD}),
    (r"global_step\d+/zero_pp_rank_\d+_mp_rank_\d{2}_optim_states\.pt", "torch", {"train": REFUSE, "convert": REFUSE}),
    (r"global_step\d+/rng_state_\d{5}\.pt", "torch", {"train": REFUSE, "convert": RNG_NOT_EXPORTED}),
]
# (path relative to the save directory, how it is pickled, what each loader does with it)
FILES = {
    "megatron": [
        (r"latest_checkpointed_iteration\.txt", None, {"train": TEXT, "convert": TEXT}),
        (r"iter_\d{7}/metadata\.json", None, {"train": JSON, "convert": JSON}),
        (r"iter_\d{7}/config\.yaml", None, {"train": RECORD, "convert": RECORD}),
        (r"iter_\d{7}/versions\.json", None, {"train": RECORD, "convert": RECORD}),
        (r"iter_\d{7}/\.metadata", "pickle", {"train": REFUSE, "convert": REFUSE}),
        (r"iter_\d{7}/common\.pt", "torch", {"train": REFUSE, "convert": REFUSE}),
        (r"iter_\d{7}/__\d+_\d+\.distcp", "distcp", {"train": REFUSE, "convert": REFUSE}),
    ],
    "zero2": ZERO + [(r"global_step\d+/mp_rank_\d{2}_model_states\.pt", "torch", {"train": REFUSE, "convert": REFUSE})],
    "zero3": ZERO + [(r"global_step\d+/zero_pp_rank_\d+_mp_rank_\d{2}_model_states\.pt", "torch",
                      {"train": REFUSE, "convert": REFUSE})],
    "tokenizer": [
        (r"latest_checkpointed_iteration\.txt", None, {"train": TEXT}),
        (r"iter_\d{7}/manifest\.json", None, {"train": JSON}),
        (r"iter_\d{7}/state\.pt", "torch", {"train": REFUSE}),
        (r"iter_\d{7}/rng_rank\d+\.pt", "torch", {"train": REFUSE}),
    ],
}
EXTRA_STATE = "decoder.layers.mlp.linear_fc1._extra_state/shard_0_4"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": _Evil(str(marker))}, buf)
    return buf.getvalue()


def classify(kind: str, relative: str) -> list[tuple]:
    """The rows of FILES[kind] whose pattern matches the whole relative path."""
    return [row for row in FILES[kind] if re.fullmatch(row[0], relative)]


def checkpoint_files(save_dir: Path) -> list[str]:
    """Every file under ``save_dir`` (hidden ones too), as sorted paths relative to it."""
    return sorted(str(p.relative_to(save_dir)) for p in save_dir.rglob("*") if p.is_file())


def distcp_items(ckpt_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Per ``.distcp`` file of a torch_dist checkpoint directory: its items as (fqn, "bytes" | "tensor")."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    with open(ckpt_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # written by the fixture: trusted
    items: dict[str, list[tuple[str, str]]] = {}
    for index, info in metadata.storage_data.items():
        md = metadata.state_dict_metadata[index.fqn]
        kind = ("bytes" if isinstance(md, BytesStorageMetadata) else
                "tensor" if isinstance(md, TensorStorageMetadata) else type(md).__name__)
        items.setdefault(info.relative_path, []).append((index.fqn, kind))
    return items


def _poison_item(ckpt: Path, fqn: str, payload: bytes, file: str | None = None) -> None:
    """Point the .metadata entry of item ``fqn`` (its first chunk stored in ``file``, if given: a sharded
    tensor has chunks in several files) at ``payload`` appended to its .distcp file."""
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if i.fqn == fqn and file in (None, s.relative_path))
    target = ckpt / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset, length=len(payload),
                                              transform_descriptors=getattr(info, "transform_descriptors", None))
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _copy(src: Path, dst: Path, own: list[Path]) -> Path:
    """Copy ``src`` to ``dst`` with hard links, except ``own`` (paths relative to src): real copies, safe to alter."""
    shutil.copytree(src, dst, copy_function=os.link)
    for rel in own:
        (dst / rel).unlink()
        shutil.copyfile(src / rel, dst / rel)
    return dst


def _refresh_manifest(folder: Path, name: str) -> None:
    """Record ``name``'s new size and SHA-256 in a tokenizer checkpoint's manifest (an attacker can), so
    that only the unpickling check stands between the payload and the loader."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def variant_plan(root: Path) -> list[dict]:
    """What :func:`plant_payloads` makes from the checkpoints in ``root/KIND`` (deterministic: files and items
    in sorted / stored order): each intact checkpoint, then one variant per unpickled file or item. Files
    FILES does not classify are left out (the classification test fails on them).

    Returns:
        dicts: ``id``, ``kind``, ``load_dir`` (``root/variants/ID`` or the intact checkpoint), ``file``
        (relative path; None when intact), ``how`` (FILES' pickling column), ``item`` (a .distcp item's fqn or
        None), ``marker`` (the file the payload would create), ``expect`` ({loader: REFUSE or a reason}).
    """
    variants = [{"id": f"{kind}-intact", "kind": kind, "load_dir": str(root / kind), "file": None, "how": None,
                 "item": None, "marker": None, "expect": {}} for kind in KINDS]
    for kind in KINDS:
        for rel in checkpoint_files(root / kind):
            rows = classify(kind, rel)
            if len(rows) != 1 or rows[0][1] is None:
                continue
            _, how, expect = rows[0]
            targets = [None]
            if how == "distcp":
                items = distcp_items(root / kind / Path(rel).parent)[Path(rel).name]
                model = [f for f, k in items if k == "tensor" and not f.startswith("optimizer.")][:1]
                optim = [f for f, k in items if k == "tensor" and f.startswith("optimizer.")][:1]
                targets = [f for f, k in items if k == "bytes"] + model + optim
            for item in targets:
                vid = f"{kind}-{len(variants):03d}"
                variants.append({"id": vid, "kind": kind, "load_dir": str(root / "variants" / vid), "file": rel,
                                 "how": how, "item": item, "marker": str(root / "markers" / vid), "expect": expect})
    return variants


def plant_payloads(root: Path) -> list[dict]:
    """Make the copies :func:`variant_plan` lists, each with its payload planted (the tokenizer's manifest
    updated to match, as an attacker could), and return the plan."""
    variants = variant_plan(root)
    (root / "markers").mkdir(exist_ok=True)
    for v in variants:
        if v["file"] is None:
            continue
        rel, save_dir, marker = v["file"], root / v["kind"], Path(v["marker"])
        own = [rel] + ([str(Path(rel).parent / ".metadata")] if v["item"] else [])
        if v["kind"] == "tokenizer":
            own.append(str(Path(rel).parent / "manifest.json"))
        target = _copy(save_dir, Path(v["load_dir"]), own) / rel
        if v["how"] == "pickle":
            target.write_bytes(pickle.dumps(_Evil(str(marker))))
        elif v["how"] == "torch":
            target.write_bytes(_payload(marker))
        else:
            _poison_item(target.parent, v["item"], _payload(marker), file=target.name)
        if v["kind"] == "tokenizer":
            _refresh_manifest(target.parent, target.name)
    return variants


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The worker's checkpoints, the variants (by id) and the result of each training ``--load`` (by id)."""
    from data_prep.synthetic import write_synthetic_shards
    from tests.tokenizer_data import SMALL_MODEL, write_pattern

    root = tmp_path_factory.mktemp("safe")
    write_synthetic_shards(root / "tokens", num_clips=16, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    write_pattern(root / "videos" / "a.mp4")
    write_pattern(root / "videos" / "b.mp4", frames=20)
    (root / "tokenizer.yaml").write_text(SMALL_MODEL)
    run(["tests/workers/crash_safe_loading.py", "--root", str(root)], timeout=1500)
    loads = json.loads((root / "loads.json").read_text())
    variants = {v["id"]: v for v in variant_plan(root)}
    assert list(variants) == list(loads)
    return root, variants, loads


def _convert(load_dir: Path, out: Path) -> None:
    """launchers/convert_checkpoint.py, in this process."""
    from megatron_nbp.cli.convert import main

    main(["--load", str(load_dir), "--output", str(out)])


def _names(v: dict) -> list[str]:
    """What a refusal of variant ``v`` must name: the file, the item (if any) and the global asked for."""
    return [Path(v["file"]).name] + ([v["item"]] if v["item"] else []) + ["posix.system"]


def test_every_file_of_a_real_checkpoint_is_classified(checkpoints):
    """Every file of every real checkpoint matches exactly one row of FILES (a new kind of file fails here
    until someone decides how each loader treats it), every row matches a file, and every item of the
    .distcp files is a bytes or a tensor item (the two kinds the variants cover)."""
    root, variants, _ = checkpoints
    for kind in KINDS:
        files = checkpoint_files(root / kind)
        unclassified = {rel: [row[0] for row in classify(kind, rel)] for rel in files if len(classify(kind, rel)) != 1}
        assert not unclassified, (kind, unclassified)
        unused = [row[0] for row in FILES[kind] if not any(re.fullmatch(row[0], rel) for rel in files)]
        assert not unused, (kind, unused)
        for rel in files:
            if classify(kind, rel)[0][1] == "distcp":
                kinds = {k for _, k in distcp_items(root / kind / Path(rel).parent)[Path(rel).name]}
                assert kinds <= {"bytes", "tensor"}, (kind, rel, kinds)
                planted = [v for v in variants.values() if v["kind"] == kind and v["file"] == rel]
                assert {v["item"] for v in planted} >= {f for f, k in distcp_items(
                    root / kind / Path(rel).parent)[Path(rel).name] if k == "bytes"}, (kind, rel)
    pickled = [v for v in variants.values() if v["file"]]
    assert {v["kind"] for v in pickled} == set(KINDS)
    assert sum(1 for v in pickled if v["item"] and "rng_state" in v["item"]) == 2  # one per rank
    assert sum(1 for v in pickled if v["file"].endswith(".pt") and "rng_state_" in v["file"]) == 4  # zero2, zero3


@pytest.mark.parametrize("kind", KINDS)
def test_training_load_refuses_every_planted_payload(checkpoints, kind):
    """Training --load of each poisoned copy (2 ranks, the layout that wrote it) stops with the launcher's
    one-line error naming the file, the item and ``posix.system``; the payload never runs. The intact
    checkpoint loads (so the refusals are the payloads' doing)."""
    root, variants, loads = checkpoints
    intact = loads[f"{kind}-intact"]
    assert intact["status"] == [0, 0], intact["output"][-3000:]
    where = root / kind
    resumed = (f"resumed from {where / 'iter_0000002'} at step 2" if kind == "tokenizer"
               else f"> loaded checkpoint from {where} at iteration 3")
    assert resumed in intact["output"], intact["output"][-3000:]
    tried = 0
    for v in (v for v in variants.values() if v["kind"] == kind and v["file"]):
        out, status = loads[v["id"]]["output"], loads[v["id"]]["status"]
        info = (v["id"], v["file"], v["item"], status, out[-3000:])
        assert not loads[v["id"]]["payload_ran"], info  # its marker never appeared
        if v["expect"]["train"] != REFUSE:
            assert status == [0, 0] and resumed.replace(str(where), v["load_dir"]) in out, info
            continue
        assert any(code != 0 for code in status), info
        prefix = "train_tokenizer.py: error: checkpoint" if kind == "tokenizer" else "pretrain_nbp.py [rank"
        error = next((line for line in out.splitlines() if line.startswith(prefix)), "")
        assert error and (kind == "tokenizer" or ": CheckpointError: " in error), info
        for name in _names(v):
            assert name in out, (name, info)
        tried += 1
    assert tried >= {"megatron": 20, "zero2": 5, "zero3": 6, "tokenizer": 3}[kind], tried


@pytest.mark.parametrize("kind", ["megatron", "zero2", "zero3"])
def test_converter_refuses_every_planted_payload_it_would_read(checkpoints, kind, tmp_path):
    """launchers/convert_checkpoint.py on each poisoned copy: refused with a CheckpointError naming the file,
    the item and ``posix.system`` where it reads the file; converted where it never reads it; the payload
    never runs. The intact checkpoint converts."""
    root, variants, _ = checkpoints
    _convert(root / kind, tmp_path / "intact")
    assert (tmp_path / "intact" / "model.safetensors").is_file()
    for v in (v for v in variants.values() if v["kind"] == kind and v["file"]):
        out = tmp_path / v["id"]
        if v["expect"]["convert"] == REFUSE:
            with pytest.raises(CheckpointError) as err:
                _convert(Path(v["load_dir"]), out)
            for name in _names(v):
                assert name in str(err.value), (name, v, str(err.value))
        else:
            _convert(Path(v["load_dir"]), out)
            assert (out / "model.safetensors").is_file(), v
        assert not Path(v["marker"]).exists(), v


def test_control_without_the_check_torch_runs_the_payload(checkpoints, tmp_path, monkeypatch):
    """The same kind of poisoned item with verify_megatron_checkpoint switched off: torch.distributed.checkpoint
    unpickles it with weights_only=False and the payload runs (so the tests above can fail)."""
    import megatron_nbp.checkpointing as checkpointing

    root, _, _ = checkpoints
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "megatron", ckpt)
    _poison_item(ckpt / "iter_0000003", EXTRA_STATE, _payload(marker))
    monkeypatch.setattr(checkpointing, "verify_megatron_checkpoint", lambda path: None)  # what verify_checkpoint calls
    try:
        _convert(ckpt, tmp_path / "out")
    except Exception:
        pass  # the payload's return value is no valid extra state; what matters is that it ran
    assert marker.exists()


def test_safe_torch_load_refuses_and_allows_exactly(tmp_path):
    """Unit level: DeepSpeed's plain records and numpy RNG states load; anything else does not."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # what ZeRO pickles into its optimizer states: a static scaler, or (fp16 with dynamic loss scaling, the
    # default) a DynamicLossScaler
    dynamic = CreateLossScaler(torch.float16, static_loss_scale=1.0, dynamic_scaling=True,
                               dynamic_loss_args=dict(init_scale=2.0**16, scale_window=1000, min_scale=1.0,
                                                      delayed_shift=2, consecutive_hysteresis=False))
    dynamic.cur_scale, dynamic.cur_iter = 1024.0, 37
    good = io.BytesIO()
    torch.save({"rng": np.random.get_state(), "stage": ZeroStageEnum(2), "scaler": LossScaler(1.0),
                "dynamic": dynamic, "t": torch.ones(2)}, good)
    good.seek(0)
    loaded = safe_torch_load(good)
    assert loaded["stage"] == ZeroStageEnum(2) and torch.equal(loaded["t"], torch.ones(2))
    assert type(loaded["dynamic"]).__name__ == "DynamicLossScaler"
    assert (loaded["dynamic"].cur_scale, loaded["dynamic"].cur_iter) == (1024.0, 37)
    bad = io.BytesIO(_payload(tmp_path / "pwned"))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        safe_torch_load(bad, what="bad.pt")
    assert not (tmp_path / "pwned").exists()
