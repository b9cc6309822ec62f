"""DeepSpeed ZeRO backend (TP=2 x DP=2, gloo, fp32) against the megatron backend on the same data, seed
and weights: per-iteration losses, learning rates and gradient norms; ZeRO-3 save / resume against an
uninterrupted ZeRO-3 run; ZeRO-1 and ZeRO-3 checkpoints converted to the inference format against the
megatron backend's converted checkpoint (logits); the TP merge against megatron's own TP split; and
the invalid combinations refused by config validation before any process group starts; a ZeRO-3 run
SIGKILLed at a random point and resumed against the uninterrupted one.

The torchrun runs happen once, in the module fixtures (about 2.5 minutes on 2 busy CPU cores, plus the
killed and resumed ZeRO-3 runs)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.deepspeed_checkpointing import LATEST_TAG_FILE
from megatron_nbp.inference.model import load_inference_model
from megatron_nbp.masks import block_causal_allowed
from tests.dist_utils import REPO, run, torchrun
from data_prep.synthetic import write_synthetic_shards
from tests.workers.tp_pp_worker import micro_batches, model_positions

CONFIG = "tests/configs/tiny_test.yaml"
LAUNCHER = "launchers/pretrain_nbp.py"
ITERS = 6
ZERO_RUNS = {"zero1": {"deepspeed.zero_stage": 1}, "zero2": {"deepspeed.zero_stage": 2},
             "zero2_offload": {"deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": "cpu"},
             "zero3": {"deepspeed.config_file": "configs/deepspeed/zero3.json"}}
# dropout on (the RNG streams must match too); clipping at 0.5, below every gradient norm here, so a
# backend that ignored train.clip_grad (DeepSpeed's default is 1.0) would show
COMMON = {"parallel.tensor_model_parallel_size": 2, "train.train_iters": ITERS, "train.clip_grad": 0.5,
          "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}
UNTIED = {"model.untie_embeddings_and_output_weights": True}


def scalars(logdir, tag="lm-loss") -> dict[int, float]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}  # e.g. a resumed run that had nothing left to train
    return {e.step: e.value for e in acc.Scalars(tag)}


def zero3_args(data, tensorboard_dir, *extra) -> list[str]:
    """Launcher arguments: ZeRO-3 with the same settings as COMMON."""
    return [LAUNCHER, "--config", CONFIG, "--data", str(data), "--tp", "2",
            "--train-iters", str(ITERS), "--clip-grad", "0.5", "--hidden-dropout", "0.1",
            "--attention-dropout", "0.1", "--backend", "deepspeed",
            "--deepspeed-config", "configs/deepspeed/zero3.json",
            "--tensorboard-dir", str(tensorboard_dir), *extra]


def launch_zero3(root, name, *extra):
    """The launcher itself (command line, exit and resume), ZeRO-3 with the same settings as COMMON."""
    return torchrun(4, *zero3_args(root / "data", root / f"tb_{name}", *extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    # an op compilation (if DeepSpeed ever needs one here) is cached across test runs
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron-nbp/torch_extensions"))
    plan = {"megatron": {"train.backend": "megatron"}}
    plan.update({name: {"train.backend": "deepspeed", **o} for name, o in ZERO_RUNS.items()})
    # the untied output layer (the paper configs' head) under ZeRO-3 vs the megatron backend
    plan.update({name: {**o, **UNTIED} for name, o in (("megatron_untied", plan["megatron"]),
                                                          ("zero3_untied", plan["zero3"]))})
    for name, overrides in plan.items():
        overrides.update(COMMON, data=str(root / "data"), tensorboard_dir=str(root / f"tb_{name}"))
        if name in ("megatron", "zero1", "zero3", "megatron_untied", "zero3_untied"):
            overrides["save"] = str(root / f"ckpt_{name}")
    # loading flags, each backend from its own checkpoint of the runs above (megatron_nbp.restore):
    # --finetune (2 iterations from iteration 0) and --no-load-optim (2 more iterations at 7 and 8)
    for backend, ckpt in (("megatron", "megatron"), ("deepspeed", "zero1")):
        extra = {"deepspeed.zero_stage": 1} if backend == "deepspeed" else {}
        for kind, flags in (("finetune", {"train.finetune": True, "train.exit_interval": 2}),
                            ("no_load_optim", {"train.no_load_optim": True, "train.train_iters": ITERS + 2})):
            plan[f"{ckpt}_{kind}"] = {"train.backend": backend, **extra, **COMMON, **flags, "data": str(root / "data"),
                                      "load": str(root / f"ckpt_{ckpt}"),
                                      "tensorboard_dir": str(root / f"tb_{ckpt}_{kind}")}
    torchrun(4, "tests/workers/backends_worker.py", "--config", CONFIG, "--runs", json.dumps(plan))
    # ZeRO-3 "interrupted" after iteration 3 (--exit-interval saves and exits), then resumed
    launch_zero3(root, "zero3_first", "--save", str(root / "ckpt_resume"), "--exit-interval", "3")
    resumed = launch_zero3(root, "zero3_resumed", "--save", str(root / "ckpt_resume"), "--load", str(root / "ckpt_resume"))
    conversions = [(str(root / f"ckpt_{n}"), str(root / f"converted_{n}"))
                   for n in ("megatron", "zero1", "zero3", "megatron_untied", "zero3_untied")]
    run(["-c", "from megatron_nbp.inference.convert import convert_checkpoint\n"
               f"for a, b in {conversions!r}: convert_checkpoint(a, b)"])
    torchrun(2, "tests/workers/tp_merge_worker.py", "--config", CONFIG, "--config", "tests/configs/tiny_test_llama.yaml",
             "--output", str(root / "merge.json"))
    return root, resumed.stdout


@pytest.mark.parametrize("name", sorted(ZERO_RUNS))
def test_zero_losses_match_megatron_backend(runs, name):
    root, _ = runs
    ref, ours = scalars(root / "tb_megatron"), scalars(root / f"tb_{name}")
    assert sorted(ref) == sorted(ours) == list(range(1, ITERS + 1))
    diffs = [abs(ours[i] - ref[i]) for i in ref]
    assert max(diffs) <= 1e-5, (name, ref, ours)
    assert ref[ITERS] < ref[1]  # it trains: a comparison of two flat curves would prove little
    lr_ref, lr = scalars(root / "tb_megatron", "learning-rate"), scalars(root / f"tb_{name}", "learning-rate")
    assert all(abs(lr[i] - lr_ref[i]) <= 1e-12 for i in lr_ref), (lr_ref, lr)
    gn_ref, gn = scalars(root / "tb_megatron", "grad-norm"), scalars(root / f"tb_{name}", "grad-norm")
    assert all(abs(gn[i] - gn_ref[i]) <= 1e-4 * gn_ref[i] for i in gn_ref), (gn_ref, gn)
    assert min(gn_ref.values()) > 0.5  # clipping (clip_grad 0.5) was active in every iteration


def test_untied_head_zero3_matches_megatron_backend(runs):
    """The untied output layer under ZeRO-3 (its own partitioned weight, no external-parameter hook) against
    the megatron backend with the same head: losses <= 1e-5 per iteration, and the converted checkpoints'
    logits <= 1e-5 with an output layer of its own that differs from the word embedding."""
    root, _ = runs
    ref, ours = scalars(root / "tb_megatron_untied"), scalars(root / "tb_zero3_untied")
    assert sorted(ref) == sorted(ours) == list(range(1, ITERS + 1))
    assert max(abs(ours[i] - ref[i]) for i in ref) <= 1e-5, (ref, ours)
    assert max(abs(ref[i] - scalars(root / "tb_megatron")[i]) for i in ref) > 1e-4  # the head is really untied
    assert rel_err(logits(root / "converted_zero3_untied"), logits(root / "converted_megatron_untied")) <= 1e-5
    weights = load_inference_model(root / "converted_zero3_untied").state_dict()
    assert not torch.equal(weights["output_layer.weight"], weights["embedding.word_embeddings.weight"])


@pytest.mark.parametrize("kind", ["finetune", "no_load_optim"])
def test_zero_loading_flags_match_megatron_backend(runs, kind):
    """--finetune and --no-load-optim on ZeRO-1 (DeepSpeed's load_module_only / load_optimizer_states=False)
    against the megatron backend doing the same from its own checkpoint (weights equal to <= 1e-5, see
    above): losses and lr of the iterations after the load."""
    root, _ = runs
    ref, ours = scalars(root / f"tb_megatron_{kind}"), scalars(root / f"tb_zero1_{kind}")
    steps = [1, 2] if kind == "finetune" else [ITERS + 1, ITERS + 2]
    assert sorted(ref) == sorted(ours) == steps
    assert max(abs(ours[i] - ref[i]) for i in steps) <= 1e-5, (kind, ref, ours)
    lr_ref, lr = scalars(root / f"tb_megatron_{kind}", "learning-rate"), scalars(root / f"tb_zero1_{kind}", "learning-rate")
    assert all(abs(lr[i] - lr_ref[i]) <= 1e-12 for i in steps), (lr_ref, lr)
    full = scalars(root / "tb_megatron")
    if kind == "finetune":  # the trained weights, a fresh LR schedule from iteration 0
        assert abs(ours[1] - full[1]) > 0.05 and lr == {1: scalars(root / "tb_megatron", "learning-rate")[1],
                                                        2: scalars(root / "tb_megatron", "learning-rate")[2]}


def test_zero3_resume_equals_uninterrupted(runs):
    root, stdout = runs
    assert "loaded checkpoint" in stdout and "iteration 3" in stdout
    full, first, resumed = (scalars(root / f"tb_{n}") for n in ("zero3", "zero3_first", "zero3_resumed"))
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == full[step]
    for step in (4, 5, 6):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


@pytest.fixture(scope="module")
def killed_zero3(runs, tmp_path_factory):
    """The ZeRO-3 launcher run (TP2 x DP2, 4 ranks, settings of the uninterrupted ``zero3`` run) saving
    every iteration, SIGKILLed as a whole process tree (like a node failure) at a random moment after a
    random number of published checkpoints and before its last one (a try that ended first is thrown away
    and repeated with an earlier kill: tests.dist_utils.kill_before_the_end), then restarted with --load
    until the end.

    Returns:
        (work dir, seed, the Kill, tag named by ``latest`` after the kill, ``.tmp`` directories left by the
        kill, mtimes of ``latest`` and of the newest file of the checkpoint it names (read before the
        restart), stdout of the resumed run)
    """
    import random
    import shutil
    import time

    from tests.dist_utils import free_port, kill_before_the_end

    root, _ = runs
    work = tmp_path_factory.mktemp("zero3_killed")
    seed = int(os.environ.get("RESUME_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    ckpt = work / "ckpt"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def start() -> subprocess.Popen:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(work / "tb_killed", ignore_errors=True)
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                                 f"--master-port={free_port()}",
                                 *zero3_args(root / "data", work / "tb_killed", "--save", str(ckpt),
                                             "--save-interval", "1")],
                                cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    latest_file = ckpt / LATEST_TAG_FILE

    def published() -> int | None:
        tag = latest_file.read_text().strip() if latest_file.exists() else ""
        return int(tag.removeprefix("global_step")) if tag else None

    # the agent and every worker at once, inside a later iteration or inside its save
    kill = kill_before_the_end(start, published, last=ITERS, kill_after=rng.randint(1, 4),
                               delay=rng.uniform(0.0, 0.8))
    tag = latest_file.read_text().strip()
    left_tmp = sorted(p.name for p in ckpt.glob("*.tmp"))
    written = (latest_file.stat().st_mtime, max(f.stat().st_mtime for f in (ckpt / tag).rglob("*")))
    resumed = torchrun(4, *zero3_args(root / "data", work / "tb_resumed", "--save", str(ckpt),
                                      "--save-interval", "1", "--load", str(ckpt)))
    return work, seed, kill, tag, left_tmp, written, resumed.stdout


def test_zero3_sigkill_at_a_random_point_then_resume_equals_uninterrupted(runs, killed_zero3):
    root, _ = runs
    work, seed, kill, tag, left_tmp, written, stdout = killed_zero3
    info = (seed, kill, tag, left_tmp)
    assert tag.startswith("global_step") and not tag.endswith(".tmp"), info  # only published ones are named
    assert (work / "ckpt" / tag / "nbp_checkpoint.json").is_file(), info
    latest = int(tag.removeprefix("global_step"))
    assert latest == kill.latest and 1 <= latest < ITERS, info  # killed before the last checkpoint
    assert max(written) <= kill.killed_at, (info, written)  # what --load takes was written by the killed run
    assert f"loaded checkpoint from {work / 'ckpt'} at iteration {latest}" in stdout, (info, stdout[-2000:])
    full, resumed = scalars(root / "tb_zero3"), scalars(work / "tb_resumed")
    assert sorted(resumed) == list(range(latest + 1, ITERS + 1)), (info, sorted(resumed))
    compared = 0
    for step in resumed:
        assert resumed[step] == full[step], (info, step, resumed[step], full[step])  # bitwise on CPU
        compared += 1
    assert compared >= 1, info
    assert (work / "ckpt" / LATEST_TAG_FILE).read_text().strip() == f"global_step{ITERS}", info


def test_checkpoint_layout_is_published_atomically(runs):
    root, _ = runs
    ckpt = root / "ckpt_resume"
    assert (ckpt / LATEST_TAG_FILE).read_text().strip() == "global_step6"
    assert (ckpt / "global_step3" / "nbp_checkpoint.json").is_file() and (ckpt / "global_step6").is_dir()
    meta = json.loads((ckpt / "global_step6" / "nbp_checkpoint.json").read_text())
    assert (meta["iteration"], meta["consumed_samples"], meta["zero_stage"]) == (6, 48, 3)
    assert (meta["tensor_model_parallel_size"], meta["data_parallel_size"]) == (2, 2)
    assert len(list((ckpt / "global_step6").glob("rng_state_*.pt"))) == 4
    assert not list(ckpt.glob("*.tmp"))
    # the run record: the launcher's resolved config reads back from config.yaml and the metadata holds it
    record = NBPConfig.from_yaml(ckpt / "global_step6" / "config.yaml")
    assert (record.train.backend, record.deepspeed.config_file, record.load) == (
        "deepspeed", "configs/deepspeed/zero3.json", str(ckpt))
    assert meta["run_record"]["config"] == record.to_dict() and meta["run_record"]["versions"]["deepspeed"]
    assert (ckpt / "global_step3" / "versions.json").is_file()


def test_a_checkpoint_of_the_other_backend_is_refused_not_ignored(runs):
    from megatron_nbp.checkpointing import CheckpointError, load_checkpoint
    from megatron_nbp.deepspeed_checkpointing import load_deepspeed_checkpoint

    root, _ = runs
    with pytest.raises(CheckpointError, match="holds a megatron-backend checkpoint"):
        load_deepspeed_checkpoint(root / "ckpt_megatron", None, None, {})
    with pytest.raises(CheckpointError, match="holds a DeepSpeed checkpoint"):
        load_checkpoint(root / "ckpt_zero3", None, None, None, {})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def logits(model_dir):
    cfg = NBPConfig.from_yaml(CONFIG)
    model = load_inference_model(model_dir)
    batches = micro_batches(cfg)
    tokens = torch.cat([b.tokens for b in batches])
    positions = torch.cat([model_positions(cfg, b) for b in batches], dim=-2)
    allowed = block_causal_allowed(torch.cat([b.block_ids for b in batches]))
    with torch.no_grad():
        return model(tokens, positions, allowed)


@pytest.mark.parametrize("name", ["zero1", "zero3"])
def test_converted_zero_checkpoint_logits_match_megatron_backend(runs, name):
    root, _ = runs
    ref, ours = logits(root / "converted_megatron"), logits(root / f"converted_{name}")
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)
    assert json.loads((root / f"converted_{name}" / "config.json").read_text())["extra"]["iteration"] == ITERS


def test_tensor_parallel_merge_inverts_megatron_split(runs):
    root, _ = runs
    results = json.loads((root / "merge.json").read_text())
    assert len(results) == 2
    for config, r in results.items():
        assert r["same_keys"] and r["max_abs_diff"] == 0.0, (config, r)
        assert r["num_split"] >= 8 and r["shards_differ_from_reference"] == r["num_split"], (config, r)
    assert results["tests/configs/tiny_test_llama.yaml"]["num_stride2"] == 4  # SwiGLU fc1 per layer


@pytest.mark.parametrize("overrides,world,message", [
    ({"deepspeed.zero_stage": 3, "parallel.pipeline_model_parallel_size": 2}, 4,
     "ZeRO-3 partitions parameters across the data-parallel group"),
    ({"deepspeed.zero_stage": 2, "parallel.pipeline_model_parallel_size": 2}, 4, "ZeRO-2 partitions gradients"),
    ({"deepspeed.zero_stage": 1, "parallel.pipeline_model_parallel_size": 2}, 4, "ZeRO-1 + PP would need"),
    ({"parallel.tensor_model_parallel_size": 3}, 6, "num_attention_heads=4 not divisible by tensor parallel size 3"),
    ({"parallel.tensor_model_parallel_size": 2}, 3, "world size 3 not divisible by TP x PP = 2 x 1"),
    ({"deepspeed.zero_stage": 4}, 4, "deepspeed.zero_stage=4 not in (1, 2, 3)"),
    ({"deepspeed.offload_optimizer": "nvme"}, 4, "offload_optimizer='nvme' not in"),
    ({"deepspeed.config_file": "configs/deepspeed/zero3.json", "deepspeed.zero_stage": 2}, 4,
     "zero_stage=2 contradicts stage 3"),
])
def test_invalid_deepspeed_combinations_are_refused(overrides, world, message):
    with pytest.raises(ConfigError) as err:  # a value outside a field's choices is refused on reading
        NBPConfig.from_yaml(CONFIG, {"train.backend": "deepspeed", **overrides}).validate(world)
    assert message in str(err.value)


def test_repo_deepspeed_configs_are_valid():
    for stage, path in ((1, "zero1"), (2, "zero2"), (3, "zero3"), (3, "zero3_offload")):
        cfg = NBPConfig.from_yaml(CONFIG, {"train.backend": "deepspeed",
                                           "deepspeed.config_file": f"configs/deepspeed/{path}.json"})
        cfg.validate(4)
        assert cfg.deepspeed.stage == stage
    assert cfg.deepspeed.offload == "cpu"
    paper = NBPConfig.from_yaml(["configs/model/nbp_3b.yaml", "configs/data/k600.yaml",
                                 "configs/deepspeed/nbp_3b_zero2.yaml"])
    paper.validate(16)
    assert paper.train.backend == "deepspeed" and paper.train.global_batch_size == 64


def test_launcher_refuses_pp_with_zero3_before_any_process_group():
    """--dry-run validates exactly as training does; the error names the combination."""
    env = dict(os.environ, WORLD_SIZE="4", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, LAUNCHER, "--config", CONFIG, "--backend", "deepspeed", "--zero-stage", "3",
                           "--pp", "2", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pipeline parallel size 2 with the DeepSpeed backend" in proc.stderr
