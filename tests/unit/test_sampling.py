"""The sampler without host synchronisation and with one random stream per batch row: a batch of different
prompts generated together equals each prompt generated alone with its seed (frame prediction and hybrid,
guidance on); a list of generators equals per-row calls; no host read or data-dependent shape in
``sample_tokens``; its nucleus and its draws against the release's sorted filter."""

import contextlib
import math

import pytest
import torch

from megatron_nbp.inference.generate import generate_frame_prediction, generate_hybrid
from megatron_nbp.inference.sampling import (
    SamplingConfig,
    _nucleus_threshold,
    _order_keys,
    row_generators,
    sample_tokens,
)
from tests.unit.test_generation import DISTINCT, TIES, hybrid_model, official_top_k_top_p
from tests.unit.test_kv_cache import tiny_model

SEEDS = [3, 14, 159]


class Recording:
    """``sample_tokens`` that also keeps the logits of every call (float [B, s, V])."""

    def __init__(self):
        self.logits = []

    def __call__(self, logits, vocab_size, sampling, generator):
        self.logits.append(logits.clone())
        return sample_tokens(logits, vocab_size, sampling, generator)


def assert_batch_equals_alone(generate, inputs):
    """``generate(inputs, sampler, **kw)`` on the batch with SEEDS, then on each row alone with its seed
    (as a one-entry seed list, and as one generator): identical tokens, and the logits the sampler got
    (guided, where guidance is on) within 1e-5, at every forward pass."""
    batch_sampler = Recording()
    batch = generate(inputs, batch_sampler, seeds=SEEDS)
    assert len({tuple(row.tolist()) for row in batch.tokens}) == len(SEEDS)          # the rows do differ
    for i, seed in enumerate(SEEDS):
        row = tuple(x[i:i + 1] if x is not None else None for x in inputs)
        alone_sampler = Recording()
        alone = generate(row, alone_sampler, seeds=[seed])
        assert torch.equal(alone.tokens, batch.tokens[i:i + 1]), f"row {i} differs from its generation alone"
        for got, want in zip(batch_sampler.logits, alone_sampler.logits, strict=True):
            assert float((got[i:i + 1] - want).abs().max()) <= 1e-5
        one = generate(row, Recording(), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(one.tokens, alone.tokens)        # one generator = a list of one


@pytest.mark.parametrize("position", ["learned_absolute", "rope3d"])
def test_frame_prediction_batch_of_different_prompts_equals_each_alone(position):
    model = tiny_model(latent=(3, 4, 4), block=(1, 1, 4), position=position)
    prompts = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(top_k=50, top_p=0.9)

    def generate(inputs, sampler, **kw):
        return generate_frame_prediction(model, inputs[0], sampling, sampler=sampler, **kw)

    assert_batch_equals_alone(generate, (prompts,))


def test_hybrid_batch_of_different_classes_equals_each_alone_with_guidance():
    model = hybrid_model(C=4, null=True)
    sampling = SamplingConfig(top_k=40, top_p=0.8, cfg_scale=2.0)

    def generate(inputs, sampler, **kw):
        return generate_hybrid(model, inputs[0], None, sampling, sampler=sampler, **kw)

    assert_batch_equals_alone(generate, (torch.tensor([[0], [3], [1]]),))


def test_hybrid_batch_of_text_rows_of_different_lengths_equals_each_alone_with_guidance():
    model = hybrid_model(P=4, C=20, condition_type="text", position="rope3d", null=True)
    text = torch.tensor([[5, 9, 0, 0], [1, 2, 3, 4], [17, 0, 0, 0]])
    padding = torch.tensor([[False, False, True, True], [False] * 4, [False, True, True, True]])
    sampling = SamplingConfig(top_k=40, top_p=0.8, cfg_scale=2.0)

    def generate(inputs, sampler, **kw):
        return generate_hybrid(model, inputs[0], inputs[1], sampling, sampler=sampler, **kw)

    assert_batch_equals_alone(generate, (text, padding))


def test_seeds_and_generator_lists_are_checked():
    model = tiny_model(latent=(2, 4, 4))
    prompts = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        generate_frame_prediction(model, prompts, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="either seeds or generator"):
        generate_frame_prediction(model, prompts, generator=torch.Generator(), seeds=[1, 2])
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        generate_frame_prediction(model, prompts, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        sample_tokens(torch.zeros(2, 3, 10), 10, SamplingConfig(), [torch.Generator()])
    with pytest.raises(ValueError, match="seeds is empty"):
        row_generators([])


@pytest.mark.parametrize("top_k,top_p", [(6, 0.9), (None, 0.7), (4, None), (None, None)])
def test_a_list_of_generators_equals_per_row_calls(top_k, top_p):
    """logits [B = 3, s = 5, V]: row i drawn with generator i in the batch = row i drawn alone with it."""
    logits = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0)) * 2
    sampling = SamplingConfig(top_k=top_k, top_p=top_p)
    batch = sample_tokens(logits, 10, sampling, row_generators(SEEDS))
    for i, seed in enumerate(SEEDS):
        alone = sample_tokens(logits[i:i + 1], 10, sampling, torch.Generator().manual_seed(seed))
        assert torch.equal(batch[i:i + 1], alone)
        assert int(batch.max()) < 10


def test_rows_share_one_stream_with_one_generator_and_not_with_a_list():
    """With one generator the rows share one stream (row 1's ids depend on row 0 being drawn first); with
    a list they do not. Both are reproducible."""
    logits = torch.tensor([DISTINCT]).expand(2, 10)
    sampling = SamplingConfig(top_k=8, top_p=0.9)
    shared = [sample_tokens(logits.unsqueeze(1).expand(2, 200, 10), 10, sampling, torch.Generator().manual_seed(0))
              for _ in range(2)]
    assert torch.equal(shared[0], shared[1])
    assert not torch.equal(shared[0][0], shared[0][1])          # one stream: the rows draw different numbers
    per_row = sample_tokens(logits.unsqueeze(1).expand(2, 200, 10), 10, sampling, row_generators([0, 0]))
    assert torch.equal(per_row[0], per_row[1])                 # the same seed per row: the same ids


# --- no host synchronisation ---------------------------------------------------------------------------

def _raise(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"sample_tokens read a tensor on the host ({name})")
    return refuse


class _NoMaskIndexing(torch.overrides.TorchFunctionMode):
    """Refuses indexing a tensor with a boolean mask (a data-dependent shape). A function mode rather than
    a patched ``torch.Tensor.__getitem__``: once a Python ``__getitem__`` has been set on the class,
    deleting it leaves CPython's sequence slot behind, and ``torch.tensor([0-d tensors])`` fails for the
    rest of the process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            keys = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(k, torch.Tensor) and k.dtype in (torch.bool, torch.uint8) for k in keys):
                raise AssertionError("sample_tokens indexed with a boolean mask (a data-dependent shape)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_refused():
    """Inside the block, reading a tensor's value on the host (.item, bool, int, float, index, .tolist,
    .nonzero, ...) or indexing with a boolean mask (a data-dependent shape) raises AssertionError."""
    with pytest.MonkeyPatch.context() as patch, _NoMaskIndexing():
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select"):
            patch.setattr(torch.Tensor, name, _raise(name))
        for name in ("nonzero", "masked_select", "unique", "argwhere"):
            patch.setattr(torch, name, _raise(name))
        yield


def test_the_guard_catches_host_reads():
    x = torch.ones(3)
    with host_reads_refused():
        for read in (lambda: x.item(), lambda: bool(x.any()), lambda: x.tolist(), lambda: x[x > 0],
                     lambda: x.nonzero(), lambda: int(x.sum())):
            with pytest.raises(AssertionError):
                read()
    assert x.tolist() == [1.0, 1.0, 1.0]                                       # restored after the block
    assert torch.tensor([x[0], x[1]]).tolist() == [1.0, 1.0]                  # tensors are no sequences again


@pytest.mark.parametrize("top_k,top_p", [(16, 0.9), (None, 0.9), (16, None), (200, 0.5)])
def test_sample_tokens_reads_nothing_on_the_host(top_k, top_p):
    """The paper's path (top-k + top-p), each filter alone, ties at the k-th value (bf16 logits), one
    generator and a list of them: no value is read on the host and no shape depends on the data.
    (The previous implementation fails here: it read ``bool(...any())`` for the tie check and indexed the
    rows still rejected with a mask.)"""
    logits = (torch.randn(2, 8, 1000, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    sampling = SamplingConfig(top_k=top_k, top_p=top_p)
    generators = [torch.Generator().manual_seed(0), row_generators(SEEDS[:2])]
    want = [sample_tokens(logits, 990, sampling, g) for g in generators]
    generators = [torch.Generator().manual_seed(0), row_generators(SEEDS[:2])]
    with host_reads_refused():
        got = [sample_tokens(logits, 990, sampling, g) for g in generators]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_row", [False, True])
def test_sample_tokens_does_not_synchronise_the_gpu(per_row):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call during the draw, at
    the paper's setting (bf16 logits, 64K vocabulary, k = 16000, p = 0.9, batch 8 x 16 positions)."""
    logits = (torch.randn(8, 16, 64000, device="cuda") * 3).bfloat16()
    sampling = SamplingConfig()
    generator = row_generators(range(8), "cuda") if per_row else torch.Generator("cuda").manual_seed(0)
    sample_tokens(logits, 64000, sampling, generator)              # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = sample_tokens(logits, 64000, sampling, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (8, 16) and int(ids.max()) < 64000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_list_of_cuda_generators_equals_per_row_calls():
    logits = (torch.randn(4, 16, 64000, device="cuda") * 3).bfloat16()
    batch = sample_tokens(logits, 64000, SamplingConfig(), row_generators(SEEDS + [7], "cuda"))
    for i, seed in enumerate(SEEDS + [7]):
        alone = sample_tokens(logits[i:i + 1], 64000, SamplingConfig(), torch.Generator("cuda").manual_seed(seed))
        assert torch.equal(batch[i:i + 1], alone)


# --- the distribution against the release's sorted filter ---------------------------------------------

def sorted_nucleus(logits, probs, top_p):
    """bool [R, V]: the ids the sorted top-p rule keeps (mass strictly ahead <= p, summed in fp64; a tie
    keeps all its members), of logits [R, V] with probabilities probs [R, V]."""
    values, order = torch.sort(logits, descending=True, dim=-1)
    probs = probs.gather(1, order).double()
    first_of_tie = torch.searchsorted(-values, -values)
    ahead = (probs.cumsum(-1) - probs).gather(1, first_of_tie)
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, ahead <= top_p)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_the_radix_nucleus_equals_the_sorted_nucleus(top_p):
    """400 rows of bf16-rounded logits (many ties), some rows nearly flat, some peaked, some with -inf:
    the radix threshold keeps exactly the ids the sorted rule keeps, on every row."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 0.5, 3.0, 20.0]).repeat_interleave(100)[:, None]
    logits = (torch.randn(400, 3000, generator=g) * scale).bfloat16().float()
    logits[::7, ::3] = float("-inf")
    logits[1::7, :] = -0.0                                      # -0.0 and +0.0 tie
    logits[1::7, ::2] = 0.0
    probs = logits.softmax(-1)
    keys = _order_keys(logits)
    kept = keys >= _nucleus_threshold(keys, probs, top_p)
    want = sorted_nucleus(logits, probs, top_p)
    positive = probs > 0                                        # ids of zero probability are never drawn
    assert torch.equal(kept & positive, want & positive)


def chi_square_bound(dof, z=3.29):
    """The chi-square quantile at about 1 - 5e-4 (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("values,k,p", [(DISTINCT, 8, 0.9), (TIES, 3, 0.95), (TIES, 2, None), (None, 40, 0.8),
                                        (None, None, 0.5)])
def test_draws_pass_a_chi_square_test_against_the_official_filter(values, k, p):
    """200000 draws (fixed seed) against the release's ``top_k_top_p_filtering``: the same support, and the
    chi-square statistic below its 1 - 5e-4 quantile. values None: 64 bf16-rounded random logits."""
    if values is None:
        logits = (torch.randn(1, 64, generator=torch.Generator().manual_seed(1)) * 2).bfloat16().float()
    else:
        logits = torch.tensor([values])
    vocab = logits.shape[-1]
    want = official_top_k_top_p(logits, k or 0, p or 1.0)[0].double()
    n = 200_000
    draws = sample_tokens(logits.expand(n, vocab), vocab, SamplingConfig(top_k=k, top_p=p),
                          torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=vocab).double()
    assert torch.equal(counts > 0, want > 0)
    support = want > 0
    expected = want[support] * n
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    assert statistic < chi_square_bound(max(int(support.sum()) - 1, 1))
