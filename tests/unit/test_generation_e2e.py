"""The real generation loops (``generate_frame_prediction``, ``generate_hybrid``) end to end against a single
full forward pass of the same model (two with guidance) over the whole clip laid out by megatron_nbp.layouts
under the dense block-causal mask.

A teacher-forcing sampler stands in for ``sample_tokens``: it returns the tokens of a known clip, in block
order as written out below (not megatron_nbp's permutation), in the order generation asks for them, and
records every logits tensor it is given. The recorded logits must equal the full forward's (fp32, each
row within 1e-5 relative), with classifier-free guidance ``u + s (c - u)`` from two full passes (the
condition and the model's null condition) at every generated position; the returned clip must equal the
given one, which checks the mapping of block order back to (t, h, w). The block shapes 2x1x8 and 1x2x4 are
chosen so that their block-major order is not its own inverse (asserted), so a permutation applied the
wrong way round changes the result.

Every comparison runs in every decode mode of the machine (megatron_nbp.inference.static_decode): "eager",
"static" (the static-shape step a CUDA graph captures, run eagerly), "compile" (torch.compile; on a subset of
the cases that still covers class and padded text conditions, guidance, 3D RoPE and non-identity block
orders, as each case compiles anew) and, with CUDA, "cuda_graph" (the model moved to the GPU, fp32). Greedy
decoding with the real sampler must give the same tokens in every mode.
"""

import functools

import pytest
import torch

from megatron_nbp.inference.generate import DECODE_MODES, generate_frame_prediction, generate_hybrid
from megatron_nbp.inference.sampling import SamplingConfig
from megatron_nbp.inference.static_decode import static_step_runner
from megatron_nbp.layouts import frame_prediction_batch, hybrid_batch
from megatron_nbp.masks import block_causal_allowed
from tests.unit.test_generation import hybrid_model
from tests.unit.test_kv_cache import tiny_model


def reference_block_major_order(latent, block):
    """Block-major order written out: blocks in (t, h, w) order over the block grid, and inside a block its
    tokens in (t, h, w) order. Entry j is the (t, h, w)-major index of the j-th token: int64 [N]."""
    (T, H, W), (bt, bh, bw) = latent, block
    order = []
    for tb in range(T // bt):
        for hb in range(H // bh):
            for wb in range(W // bw):
                for t in range(tb * bt, (tb + 1) * bt):
                    for h in range(hb * bh, (hb + 1) * bh):
                        for w in range(wb * bw, (wb + 1) * bw):
                            order.append((t * H + h) * W + w)
    return torch.tensor(order)


MODES = [mode for mode in DECODE_MODES if mode != "cuda_graph" or torch.cuda.is_available()]
COMPILED_CASES = {"1x2x4_rope3d", "class_1x2x4_cfg", "text_padded_2x1x8_rope3d_cfg"}


def case_modes(cases):
    """(case, decode mode) pairs: every available mode for every case, "compile" for COMPILED_CASES only."""
    return [(case, mode) for case in sorted(cases) for mode in MODES if mode != "compile" or case in COMPILED_CASES]


def mode_device(mode):
    return torch.device("cuda" if mode == "cuda_graph" else "cpu")


@functools.cache
def frame_model(case, device="cpu"):
    """The FRAME_CASES model of ``case`` (built once per device: a compiled step is kept with its model)."""
    latent, block, position, _ = FRAME_CASES[case]
    return tiny_model(latent=latent, block=block, position=position).to(device)


@functools.cache
def hybrid_case_model(case, device="cpu"):
    """The HYBRID_CASES model of ``case``, built once per device."""
    return hybrid_model(**HYBRID_CASES[case][0]).to(device)


def is_involution(perm):
    return torch.equal(perm[perm], torch.arange(perm.numel()))


class TeacherForcing:
    """A sampler with ``sample_tokens``' signature that returns the next columns of ``tokens`` [B, M]
    (as many as the logits have positions) and records each call's arguments."""

    def __init__(self, tokens):
        self.tokens, self.used, self.calls = tokens, 0, []

    def __call__(self, logits, vocab_size, sampling, generator):
        assert not logits.requires_grad                     # generation builds no autograd graph
        self.calls.append((logits.clone(), vocab_size, sampling, generator))
        s = logits.shape[1]
        out = self.tokens[:, self.used:self.used + s]
        self.used += s
        return out.clone()

    def logits(self):
        return torch.cat([c[0] for c in self.calls], dim=1)


def row_relative_error(got, want):
    """Largest relative error over the rows (one per sample and position) of logits [B, S, V]."""
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())


def misplaced(tokens, video):
    return f"{int((tokens != video).sum())} of {video.numel()} returned tokens differ from the given clip"


FRAME_CASES = {                      # latent, block, position embedding, prompt frames
    "rows": ((3, 4, 4), (1, 1, 4), "learned_absolute", 1),
    "2x1x8": ((4, 4, 8), (2, 1, 8), "learned_absolute", 2),
    "1x2x4_rope3d": ((3, 2, 12), (1, 2, 4), "rope3d", 1),
}


@pytest.mark.parametrize("case,mode", case_modes(FRAME_CASES))
def test_frame_prediction_generation_equals_full_forward(case, mode):
    latent, block, position, frames = FRAME_CASES[case]
    device = mode_device(mode)
    model = frame_model(case, device)
    cfg = model.config
    N, L = cfg.num_video_tokens, cfg.block_size
    plen = frames * latent[1] * latent[2]
    order = reference_block_major_order(latent, block)
    if case != "rows":               # the whole order and the prompt's part of it are not their own inverse
        assert not is_involution(order) and not is_involution(order[:plen])
    video = torch.randint(0, cfg.vocab_size, (2, N), generator=torch.Generator().manual_seed(1)).to(device)
    teacher = TeacherForcing(video[:, order.to(device)][:, plen:])
    sampling = SamplingConfig()
    out = generate_frame_prediction(model, video[:, :plen], sampling, sampler=teacher, decode_mode=mode)

    b = frame_prediction_batch(video.cpu(), L, latent, block)   # built on the CPU, run on the model's device
    with torch.no_grad():
        full = model(b.tokens.to(device), (b.grid_position_ids if position == "rope3d" else b.position_ids).to(device),
                     block_causal_allowed(b.block_ids).to(device))
    assert out.steps == len(teacher.calls) == (N - plen) // L
    assert all(c[0].shape == (2, L, cfg.padded_vocab_size) and c[1:] == (cfg.vocab_size, sampling, None)
               for c in teacher.calls)
    err = row_relative_error(teacher.logits(), full[:, plen - L:])
    assert err <= 1e-5, f"generation's logits vs the full forward: relative error {err:.3g}"
    assert torch.equal(out.tokens, video), misplaced(out.tokens, video)


HYBRID_CASES = {                     # hybrid_model keywords, guidance scale
    "class_1x2x4": (dict(latent=(2, 2, 12), block=(1, 2, 4), null=True), 1.0),
    "class_1x2x4_cfg": (dict(latent=(2, 2, 12), block=(1, 2, 4), null=True), 3.0),
    "class_1x2x4_cfg_below_1": (dict(latent=(2, 2, 12), block=(1, 2, 4), null=True), 0.5),
    "text_padded_2x1x8_rope3d_cfg": (dict(P=4, C=20, condition_type="text", position="rope3d", latent=(2, 4, 8),
                                          block=(2, 1, 8), null=True), 2.5),
    "text_padded_rows": (dict(P=4, C=20, condition_type="text", latent=(2, 4, 4), block=(1, 1, 4)), 1.0),
}


@pytest.mark.parametrize("case,mode", case_modes(HYBRID_CASES))
def test_hybrid_generation_equals_full_forward(case, mode):
    _, scale = HYBRID_CASES[case]
    device = mode_device(mode)
    model = hybrid_case_model(case, device)
    cfg = model.config
    P, N, L, off = cfg.num_condition_tokens, cfg.num_video_tokens, cfg.block_size, cfg.video_token_offset
    latent, block = tuple(cfg.latent_shape), tuple(cfg.block_shape)
    order = reference_block_major_order(latent, block)
    if "rows" not in case:
        assert not is_involution(order)
    g = torch.Generator().manual_seed(2)
    video = torch.randint(0, cfg.vocab_size, (2, N), generator=g)
    if cfg.condition_type == "text":
        condition = torch.randint(0, 20, (2, P), generator=g)
        padding = torch.tensor([[False, False, True, True], [False] * 4])
    else:
        condition, padding = torch.tensor([[0], [2]]), None
    video, condition = video.to(device), condition.to(device)
    padding = None if padding is None else padding.to(device)
    teacher = TeacherForcing(video[:, order.to(device)])
    sampling = SamplingConfig(cfg_scale=scale)
    out = generate_hybrid(model, condition, padding, sampling, sampler=teacher, decode_mode=mode)

    num_conditions = off - L                                  # the null condition is the last id
    rope = cfg.position_embedding_type == "rope3d"

    def full_video_logits(cond, pad):
        b = hybrid_batch(video.cpu(), cond.cpu(), L, num_conditions, None if pad is None else pad.cpu(), latent, block)
        with torch.no_grad():
            logits = model(b.tokens.to(device), (b.grid_position_ids if rope else b.position_ids).to(device),
                           block_causal_allowed(b.block_ids, key_padding=b.key_padding).to(device))
        return logits[:, P:, off:]                            # predictions of z_0 .. z_{N-1}, video codes

    cond = full_video_logits(condition, padding)
    want = cond
    if scale != 1.0:
        uncond = full_video_logits(torch.full_like(condition, num_conditions - 1), None)
        assert row_relative_error(uncond, cond) > 1e-2        # guidance changes every position
        want = uncond + scale * (cond - uncond)
    assert out.steps == len(teacher.calls) == L + N // L - 1
    assert [c[0].shape[1] for c in teacher.calls] == [1] * L + [L] * (N // L - 1)
    assert all(c[0].shape == (2, c[0].shape[1], cfg.padded_vocab_size - off)
               and c[1:] == (cfg.vocab_size, sampling, None) for c in teacher.calls)
    err = row_relative_error(teacher.logits(), want)
    assert err <= 1e-5, f"generation's (guided) logits vs the full forward: relative error {err:.3g}"
    assert torch.equal(out.tokens, video), misplaced(out.tokens, video)


GREEDY_CASES = {"frame_1x2x4_rope3d": (frame_model, "1x2x4_rope3d"),
                "hybrid_text_padded_2x1x8_rope3d_cfg": (hybrid_case_model, "text_padded_2x1x8_rope3d_cfg"),
                "hybrid_class_1x2x4_cfg": (hybrid_case_model, "class_1x2x4_cfg")}


def greedy_clip(name, mode, device):
    """Greedy generation (the real sampler, temperature 0) of GREEDY_CASES[name] in ``mode`` on ``device``:
    (int64 [2, N] tokens, the model)."""
    build, case = GREEDY_CASES[name]
    model = build(case, device)
    cfg = model.config
    greedy = SamplingConfig(temperature=0)
    g = torch.Generator().manual_seed(3)
    if build is frame_model:
        plen = FRAME_CASES[case][3] * cfg.latent_shape[1] * cfg.latent_shape[2]
        prompt = torch.randint(0, cfg.vocab_size, (2, plen), generator=g).to(device)
        return generate_frame_prediction(model, prompt, greedy, decode_mode=mode).tokens.cpu(), model
    P = cfg.num_condition_tokens
    if cfg.condition_type == "text":
        condition = torch.randint(0, 20, (2, P), generator=g).to(device)
        padding = torch.tensor([[False, False, True, True], [False] * 4], device=device)
    else:
        condition, padding = torch.tensor([[0], [2]], device=device), None
    sampling = SamplingConfig(temperature=0, cfg_scale=HYBRID_CASES[case][1])
    return generate_hybrid(model, condition, padding, sampling, decode_mode=mode).tokens.cpu(), model


@pytest.mark.parametrize("name,mode", [(name, mode) for name in sorted(GREEDY_CASES) for mode in MODES
                                       if mode != "eager"])
def test_greedy_decoding_gives_the_same_tokens_in_every_decode_mode(name, mode):
    """Greedy tokens of each decode mode equal eager decoding's (two clips in a row: the second reuses the
    static mode's cache and its one compiled step or its graphs, one per step length)."""
    device = mode_device(mode)
    want, _ = greedy_clip(name, "eager", device)              # eager on the same device
    for _ in range(2):
        got, model = greedy_clip(name, mode, device)
        assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} greedy tokens differ"
    batch = 4 if "cfg" in name else 2                        # guidance decodes the null-condition rows too
    runner = static_step_runner(model, batch, model.config.token_layout.seq_length, create=False)
    step_lengths = 1 if name.startswith("frame") else 2     # L; the hybrid's first block adds 1
    if mode == "compile":                       # the runner is the model's (the teacher test's clips too)
        assert runner.compiles == 1
    if mode == "cuda_graph":
        assert runner.captures == step_lengths


def test_reference_block_major_order_is_the_written_out_example():
    """2x1x2 blocks on a 2x2x4 latent, by hand: block (h=0, w=0..1) holds t=0 (0, 1) then t=1 (8, 9)."""
    assert reference_block_major_order((2, 2, 4), (2, 1, 2)).tolist() == [
        0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
