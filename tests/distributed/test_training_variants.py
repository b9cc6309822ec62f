"""Megatron performance options against the plain run they must not change (tests/workers/variants_worker.py:
3 real training iterations, data-parallel size 2, fp32, hidden dropout on, the same data and weights):

* the distributed optimizer (with and without overlapped gradient reduce-scatter and parameter
  all-gather) and overlapped gradient all-reduce: losses and grad norms equal to 1e-6 (relative), final
  weights to 1e-6 (absolute, every element; Adam turns a last-bit difference in a near-zero gradient
  into a difference of up to lr per step, and the data-parallel reduction order differs);
* activation recomputation, full (uniform / block) and selective: identical losses, gradients and
  weights (recomputation replays the same RNG states, so fp32 results are bitwise equal), for the dense
  kernel and for FlexAttention (whose BlockMask reaches megatron's checkpointing through a handle).
"""

import pytest
import torch

from tests.dist_utils import torchrun

SAME_ARITHMETIC = ["recompute_full_uniform", "recompute_full_block", "recompute_selective"]
REORDERED = ["distributed_optimizer", "distributed_optimizer_overlap", "overlap_grad_reduce"]
FLEX = ["flex", "flex_recompute_full", "flex_recompute_selective"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("variants")
    variants = ["plain", *REORDERED, *SAME_ARITHMETIC, *FLEX]
    torchrun(2, "tests/workers/variants_worker.py", "--workdir", str(work),
             *[arg for v in variants for arg in ("--variant", v)])
    return {v: torch.load(work / f"{v}.pt", weights_only=True) for v in variants}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_the_plain_run_trains(results):
    plain = results["plain"]
    assert plain["ok"] == [True, True, True]
    assert plain["loss"][2] < plain["loss"][0]
    assert all(g.norm() > 0 for g in plain["grads"].values())


@pytest.mark.parametrize("variant", REORDERED)
def test_distributed_optimizer_and_overlap_equal_the_plain_optimizer(results, variant):
    plain, other = results["plain"], results[variant]
    assert other["ok"] == [True, True, True]
    for a, b in zip(other["loss"], plain["loss"]):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    for a, b in zip(other["grad_norm"], plain["grad_norm"]):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    assert set(other["weights"]) == set(plain["weights"])
    for name, w in plain["weights"].items():  # summation order differs (reduce-scatter vs all-reduce)
        assert (other["weights"][name] - w).abs().max() <= 1e-6, (variant, name)


@pytest.mark.parametrize("variant", SAME_ARITHMETIC)
def test_recompute_gives_identical_losses_gradients_and_weights(results, variant):
    plain, other = results["plain"], results[variant]
    assert other["loss"] == plain["loss"] and other["grad_norm"] == plain["grad_norm"]
    for name in plain["grads"]:
        assert torch.equal(other["grads"][name], plain["grads"][name]), (variant, name)
        assert torch.equal(other["weights"][name], plain["weights"][name]), (variant, name)


@pytest.mark.parametrize("variant", ["flex_recompute_full", "flex_recompute_selective"])
def test_recompute_with_flex_attention_gives_identical_results(results, variant):
    flex, other = results["flex"], results[variant]
    assert other["loss"] == flex["loss"] and other["grad_norm"] == flex["grad_norm"]
    for name in flex["grads"]:
        assert torch.equal(other["grads"][name], flex["grads"][name]), (variant, name)


def test_flex_training_matches_dense_training(results):
    flex, dense = results["flex"], results["plain"]
    for a, b in zip(flex["loss"], dense["loss"]):
        assert a == pytest.approx(b, rel=1e-5)
    worst = max(rel(flex["grads"][n], dense["grads"][n]) for n in dense["grads"])
    assert worst <= 1e-4, worst
