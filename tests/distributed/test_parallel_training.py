"""Several real training iterations under TP2 x PP2 (4 gloo ranks, 1F1B) against one process (TP1 x PP1):
the same initial weights, the same data, ``megatron_nbp.training.build_training_state`` and ``train_step``
(optimizer step, gradient clipping, LR schedule, tied-embedding gradient sync across pipeline stages).

Compared after each iteration: loss, gradient norm (megatron's, before clipping) and LR; after the last
iteration: every parameter on every rank, i.e. every tensor-parallel shard, every tensor-parallel replica
of the unsplit parameters (norms, row-parallel biases, position tables) and the last stage's copy of the
tied word embedding (``output_layer.weight``), each against the single-process weights (sliced to the
rank's shard), plus the tied copy against the first stage's embedding.

Tolerances (fp32). Measured on this config: losses agree to <= 1e-7 relative, gradient norms to ~1e-6,
final weights to <= 2e-6 relative (per-tensor norm), and the weight *updates* (final - initial) to
<= 7e-6 relative. Asserted: losses and grad norms <= 1e-5, weights <= 1e-5, updates <= 1e-4 (the update
check is the sensitive one for parameters that move little relative to their size, e.g. norm weights
near 1). The worker uses ``adam_eps`` 1e-6 instead of 1e-8: Adam divides each gradient element by its
own running RMS, so an element whose gradient is near zero (a key bias, whose gradient is exactly zero
in exact arithmetic, or an element crossing zero) turns round-off of ~1e-10 into an O(lr) difference;
with eps 1e-8 single elements reach 1e-2 of their update and tensors 8e-5 relative, with 1e-6 the
amplification is bounded by noise / eps ~ 1e-4 of one element's update. The tied copy must equal the
first stage's embedding exactly: both start from the same values and receive the same all-reduced
gradient, clip coefficient and Adam step.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import torchrun
from tests.workers.parallel_training_worker import CLIP_GRAD, ITERATIONS

WORKER = "tests/workers/parallel_training_worker.py"
LOSS_RTOL = GRAD_NORM_RTOL = 1e-5
WEIGHT_RTOL = 1e-5
UPDATE_RTOL = 1e-4
EMBEDDING = "embedding.word_embeddings.weight"
TIED_COPY = "output_layer.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference result, [rank 0..3 results]) of the single-process and the TP2 x PP2 run."""
    work = tmp_path_factory.mktemp("parallel_training")
    torchrun(1, WORKER, "--mode", "reference", "--workdir", str(work))
    torchrun(4, WORKER, "--mode", "parallel", "--workdir", str(work))
    ref = torch.load(work / "reference.pt", weights_only=False)
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(4)]
    return ref, ranks


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_losses_grad_norms_and_lr_match_single_process_with_clipping_active(runs):
    ref, ranks = runs
    assert len(ref["steps"]) == ITERATIONS and ref["clip_grad"] == CLIP_GRAD
    assert all(s["ok"] for s in ref["steps"]), ref["steps"]
    # clipping is active in every iteration: megatron reports the norm before clipping
    assert all(s["grad_norm"] > 1.5 * CLIP_GRAD for s in ref["steps"]), ref["steps"]
    assert len({s["lr"] for s in ref["steps"]}) == ITERATIONS  # the LR schedule moves
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        assert len(r["steps"]) == ITERATIONS
        for i, (got, want) in enumerate(zip(r["steps"], ref["steps"])):
            where = f"iteration {i + 1}, tp {r['tp_rank']} pp {r['pp_rank']}: {got} vs {want}"
            assert got["ok"] and got["grad_norm"] > CLIP_GRAD, where
            assert rel(got["loss"], want["loss"]) <= LOSS_RTOL, where
            assert rel(got["grad_norm"], want["grad_norm"]) <= GRAD_NORM_RTOL, where
            assert got["lr"] == want["lr"], where


def reference_shard(ref_tensor: torch.Tensor, entry: dict, rank: dict) -> torch.Tensor:
    """The part of a single-process tensor that ``rank`` holds: megatron splits a tensor-parallel
    parameter into tp_size contiguous chunks along ``partition_dim`` (stride 1), others are whole."""
    if not entry["tensor_parallel"]:
        return ref_tensor
    assert entry["partition_stride"] == 1, entry["name"]
    return ref_tensor.chunk(rank["tp_size"], entry["partition_dim"])[rank["tp_rank"]]


def test_every_parameter_on_every_rank_matches_single_process(runs):
    ref, ranks = runs
    final = {e["global_name"]: e["tensor"] for e in ref["params"]}
    initial = ref["initial"]
    assert ref["tied_embeddings"] and all(r["tied_embeddings"] for r in ranks)
    assert TIED_COPY not in final and EMBEDDING in final  # one process: a single shared tensor
    failures, compared = [], 0
    for r in ranks:
        where = f"rank tp {r['tp_rank']} pp {r['pp_rank']}"
        names = [e["global_name"] for e in r["params"]]
        if r["pp_rank"] == r["pp_size"] - 1:
            assert TIED_COPY in names, f"{where}: no tied copy of the word embedding"
        for e in r["params"]:
            name = EMBEDDING if e["global_name"] == TIED_COPY else e["global_name"]
            want = reference_shard(final[name], e, r)
            start = reference_shard(initial[name], e, r)
            got = e["tensor"]
            label = f"{where} {e['name']} (= {name}{' shard ' + str(r['tp_rank']) if e['tensor_parallel'] else ''})"
            if got.shape != want.shape:
                failures.append(f"{label}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
                continue
            assert (want - start).norm() > 0, f"{label}: the reference did not move; the check would be vacuous"
            w_err, u_err = rel_err(got, want), rel_err(got - start, want - start)
            if w_err > WEIGHT_RTOL or u_err > UPDATE_RTOL:
                failures.append(f"{label}: weights rel. err {w_err:.2e} (<= {WEIGHT_RTOL:g}), "
                                f"update rel. err {u_err:.2e} (<= {UPDATE_RTOL:g})")
            compared += 1
    # every single-process parameter is held, whole or as shards, by both TP ranks (across the stages)
    for tp in (0, 1):
        held = {e["global_name"] for r in ranks if r["tp_rank"] == tp for e in r["params"]} - {TIED_COPY}
        assert held == set(final), (tp, sorted(held ^ set(final)))
    assert compared == sum(len(r["params"]) for r in ranks) == 2 * (len(final) + 1)
    assert not failures, "\n".join([f"{len(failures)} of {compared} rank parameters differ:"] + failures)


def test_tied_output_layer_copy_equals_first_stage_embedding(runs):
    ref, ranks = runs
    by_place = {(r["tp_rank"], r["pp_rank"]): {e["name"]: e["tensor"] for e in r["params"]} for r in ranks}
    for tp in (0, 1):
        first, last = by_place[(tp, 0)][EMBEDDING], by_place[(tp, 1)][TIED_COPY]
        start = ref["initial"][EMBEDDING].chunk(2, 0)[tp]
        assert (first - start).norm() > 0, "the embedding did not train"
        assert torch.equal(first, last), (
            f"tp {tp}: last stage's {TIED_COPY} differs from the first stage's {EMBEDDING} "
            f"(max abs diff {(first - last).abs().max():.3e}, first stage moved {(first - start).norm():.3e})")
