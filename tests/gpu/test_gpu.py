"""GPU-only checks (skipped without CUDA; CI has no GPU): the project's compiled FlexAttention core
attention against the dense one in fp32 and bf16, a bf16 and an fp32 training step on the GPU, the
Transformer Engine layer spec against the local spec, and CUDA-graph block decoding against the full
forward pass and eager decoding, profiling a training window, the sync-free gradient norm. Run by
bench/gpu_check.sh."""

import re

import pytest
import torch

from megatron_nbp.layouts import frame_prediction_block_ids, hybrid_block_ids
from megatron_nbp.model.spec import transformer_engine_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _core(cls, heads=16, head_dim=96):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            attention_dropout=0.0, hidden_dropout=0.0)
    return cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["frame_prediction", "hybrid"])
def test_the_projects_compiled_flex_attention_matches_dense(dtype, tol, layout):
    """The project's flex core attention (compiled kernel, tuned kernel options, the BlockMask reached
    through the training step's mask handle) against the dense core attention in float64, forward and
    backward. Paper shape: nbp-xl heads (16 x 96), seq 1264 (frame prediction) / 1281 (hybrid), batch 2
    with a batch-1 mask (shared by the batch, as in training)."""
    from megatron_nbp.model.attention import ATTENTION_BACKENDS, BlockCausalFlexAttention, BlockCausalSDPAttention

    ids = frame_prediction_block_ids(1264, 16) if layout == "frame_prediction" else hybrid_block_ids(1, 1280, 16)
    ids = ids.unsqueeze(0)
    seq = ids.shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(seq, 2, 16, 96, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3))
    dense_mask = ATTENTION_BACKENDS["dense"][1](ids, device="cuda")
    ref = _core(BlockCausalSDPAttention)(q.double(), k.double(), v.double(), dense_mask)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    handle = ATTENTION_BACKENDS["flex"][1](ids, device=torch.device("cuda", torch.cuda.current_device()))
    out = _core(BlockCausalFlexAttention)(q, k, v, handle)
    out.float().square().sum().backward()
    assert out.dtype == dtype and rel(out, ref) <= tol
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads):
        assert rel(got, want) <= tol


def _tiny_state(precision, backend="flex"):
    from megatron_nbp.config import NBPConfig
    from megatron_nbp.training import build_training_state

    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {"train.precision": precision,
                                                              "model.attention_backend": backend,
                                                              "train.lr_warmup_iters": 0})
    return cfg, build_training_state(cfg)


def test_training_runs_on_the_gpu_in_bf16_and_matches_fp32():
    """One process on the GPU: the model is built on the current CUDA device (no parameter or buffer left
    on the host), host batches are moved by the forward step, and a bf16 step from the same weights
    gives the fp32 loss within bf16 tolerance."""
    from megatron_nbp.checkpointing import unwrap
    from megatron_nbp.parallel import destroy_parallel, initialize_parallel, set_seed
    from megatron_nbp.training import train_step
    from tests.workers.tp_pp_worker import micro_batches

    plan = initialize_parallel(1, 1, seed=0)
    try:
        assert plan.is_cuda and plan.distributed_backend == "nccl" and plan.resolve_precision("auto") == "bf16"
        losses = {}
        for precision in ("fp32", "bf16"):
            set_seed(0)
            cfg, state = _tiny_state(precision)
            module = unwrap(state.model)
            assert all(t.is_cuda for t in list(module.parameters()) + list(module.buffers()))
            assert {p.dtype for p in module.parameters()} == {torch.float32 if precision == "fp32" else torch.bfloat16}
            batches = micro_batches(cfg)
            assert not batches[0].tokens.is_cuda  # the step moves them
            result = train_step(state, iter(batches), cfg, 4)
            assert result.applied and result.grad_norm > 0
            losses[precision] = result.loss
        assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] <= 1e-2, losses
    finally:
        destroy_parallel()


def by_checkpoint_key(model):
    """Parameters by (global checkpoint key, offset): the identity dist_checkpointing uses."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return {(v.key, tuple(v.global_offset)): v.data for v in model.sharded_state_dict().values()
            if isinstance(v, ShardedTensor)}


@pytest.mark.skipif(not transformer_engine_available(), reason="needs transformer-engine")
def test_transformer_engine_spec_matches_local_spec():
    """The same weights in the TE spec (norm fused into QKV / fc1) and the local spec give the same
    logits (fp32); the local spec's checkpoint keys are the TE ones, so weights are copied by
    sharded key."""
    from megatron_nbp.config import ModelConfig
    from megatron_nbp.layouts import frame_prediction_batch
    from megatron_nbp.model.builder import build_gpt_model
    from megatron_nbp.parallel import destroy_parallel, initialize_parallel
    from megatron_nbp.training import MaskCache

    cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=1000,
                      latent_shape=(5, 8, 8), block_shape=(1, 1, 8))
    initialize_parallel(1, 1, seed=0)
    try:
        local = build_gpt_model(cfg).cuda().eval()
        cfg.transformer_impl = "transformer_engine"
        te = build_gpt_model(cfg).cuda().eval()
        local_sd, te_sd = by_checkpoint_key(local), by_checkpoint_key(te)
        assert set(local_sd) == set(te_sd) and len(local_sd) > 10
        with torch.no_grad():
            for key, tensor in local_sd.items():
                te_sd[key].copy_(tensor)
        batch = frame_prediction_batch(torch.randint(0, 1000, (2, 320)), 8, (5, 8, 8), (1, 1, 8))
        mask = MaskCache("dense")(batch.block_ids.cuda())
        with torch.no_grad():
            a = local(batch.tokens.cuda(), batch.position_ids.cuda(), mask)
            b = te(batch.tokens.cuda(), batch.position_ids.cuda(), mask)
        assert rel(b, a) <= 1e-4
    finally:
        destroy_parallel()


def test_generation_timing_waits_for_the_queued_gpu_work():
    """Generation reports times after a CUDA synchronise (GenerationResult.seconds / prefill_seconds): a
    kernel queued before the clock is read must be inside the measured time."""
    import time

    from megatron_nbp.inference.generate import _elapsed

    start = time.perf_counter()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU clock cycles, queued asynchronously
    assert _elapsed(start, torch.device("cuda", torch.cuda.current_device())) >= 0.2


# --- CUDA-graph block decoding (megatron_nbp.inference.static_decode) -----------------------------------


@pytest.mark.parametrize("layout", ["frame_prediction", "hybrid"])
def test_cuda_graph_generation_equals_the_full_forward_pass(layout):
    """decode_mode "cuda_graph" (every block step a replayed graph; the hybrid's first block token by token
    through a graph of its own), fp32: the teacher-forced logits of tests/unit/test_generation_e2e.py against
    the full forward pass within 1e-5, for every case there (class and padded text conditions, guidance,
    3D RoPE, non-identity block orders)."""
    from tests.unit import test_generation_e2e as e2e

    if layout == "frame_prediction":
        for case in sorted(e2e.FRAME_CASES):
            e2e.test_frame_prediction_generation_equals_full_forward(case, "cuda_graph")
    else:
        for case in sorted(e2e.HYBRID_CASES):
            e2e.test_hybrid_generation_equals_full_forward(case, "cuda_graph")


def test_cuda_graph_greedy_tokens_equal_eager_decoding():
    """Greedy decoding (the real sampler) gives the tokens of eager decoding on the same GPU, for frame
    prediction and the hybrid layout (class and padded text), two clips each; the graphs are captured once."""
    from tests.unit import test_generation_e2e as e2e

    for name in sorted(e2e.GREEDY_CASES):
        e2e.test_greedy_decoding_gives_the_same_tokens_in_every_decode_mode(name, "cuda_graph")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_graph_decoding_of_a_model_on_another_gpu_than_the_current_one():
    """A model on cuda:1 while cuda:0 is current: the graphs are captured and replayed on cuda:1's stream (a
    capture on the current device's stream would record nothing and replay stale logits)."""
    from megatron_nbp.inference.generate import generate_frame_prediction
    from megatron_nbp.inference.sampling import SamplingConfig
    from tests.unit.test_kv_cache import tiny_model

    greedy = SamplingConfig(temperature=0)
    torch.cuda.set_device(0)
    model = tiny_model().to("cuda:1")
    prompt = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0)).to("cuda:1")
    graph = generate_frame_prediction(model, prompt, greedy, decode_mode="cuda_graph")
    eager = generate_frame_prediction(model, prompt, greedy, decode_mode="eager")
    assert torch.equal(graph.tokens, eager.tokens)


def test_one_graph_per_batch_and_step_length_is_reused_across_clips():
    """Frame prediction captures one graph for (batch, L) and replays it for every block of every clip
    (different prompts give eager decoding's different clips); the hybrid layout captures two, (batch, 1)
    for its first block and (batch, L), and no more for a second clip. A new batch size captures its own."""
    from megatron_nbp.inference.generate import generate_frame_prediction, generate_hybrid
    from megatron_nbp.inference.sampling import SamplingConfig
    from megatron_nbp.inference.static_decode import static_step_runner
    from tests.unit.test_generation import hybrid_model
    from tests.unit.test_kv_cache import tiny_model

    greedy = SamplingConfig(temperature=0)
    model = tiny_model().cuda()
    seq = model.config.token_layout.seq_length
    clips = []
    for seed in (0, 1):
        prompt = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(seed)).cuda()
        graph = generate_frame_prediction(model, prompt, greedy, decode_mode="cuda_graph")
        eager = generate_frame_prediction(model, prompt, greedy, decode_mode="eager")
        assert graph.steps == 12 and torch.equal(graph.tokens, eager.tokens)
        clips.append(graph.tokens)
    assert not torch.equal(clips[0], clips[1])
    assert static_step_runner(model, 2, seq, create=False).captures == 1
    generate_frame_prediction(model, clips[0][:1, :32], greedy, decode_mode="cuda_graph")
    assert static_step_runner(model, 1, seq, create=False).captures == 1

    model = hybrid_model().cuda()
    seq = model.config.token_layout.seq_length
    for condition in ([[0], [2]], [[1], [1]]):
        condition = torch.tensor(condition, device="cuda")
        graph = generate_hybrid(model, condition, sampling=greedy, decode_mode="cuda_graph")
        assert torch.equal(graph.tokens, generate_hybrid(model, condition, sampling=greedy, decode_mode="eager").tokens)
        assert static_step_runner(model, 2, seq, create=False).captures == 2


def test_cuda_graph_decoding_in_bf16_matches_eager_bf16():
    """The bf16 model: the graph's teacher-forced logits against eager decoding's in bf16 (the two attend
    over different key lengths, so bf16 rounding differs), and the default decode mode on a GPU is the graph."""
    from megatron_nbp.inference.generate import BlockDecoder, generate_frame_prediction
    from megatron_nbp.inference.sampling import SamplingConfig
    from tests.unit.test_generation_e2e import TeacherForcing
    from tests.unit.test_kv_cache import tiny_model

    model = tiny_model(latent=(3, 2, 12), block=(1, 2, 4), position="rope3d").cuda().to(torch.bfloat16)
    assert BlockDecoder(model, 2).decode_mode == "cuda_graph"
    video = torch.randint(0, 500, (2, 72), generator=torch.Generator().manual_seed(4)).cuda()
    logits = {}
    for mode in ("eager", "cuda_graph"):
        teacher = TeacherForcing(video[:, 24:])
        generate_frame_prediction(model, video[:, :24], SamplingConfig(), sampler=teacher, decode_mode=mode)
        logits[mode] = teacher.logits().float()
    assert rel(logits["cuda_graph"], logits["eager"]) <= 2e-2


def test_profiling_a_training_window_on_the_gpu(tmp_path):
    """``--profile --use-pytorch-profiler`` records GPU kernels (the summary's device-busy figure is a
    percentage and its table is sorted by device time); ``--profile`` alone opens and closes a CUDA profiler
    capture range (a no-op without nsys) and training goes on."""
    from data_prep.synthetic import write_synthetic_shards
    from tests.dist_utils import torchrun

    write_synthetic_shards(tmp_path / "data", num_clips=16, clips_per_shard=8, latent_shape=(5, 4, 4), seed=0,
                           vocab=64)
    common = ["--config", "tests/configs/tiny_test.yaml", "--data", str(tmp_path / "data"), "--vocab-size", "64",
              "--train-iters", "4", "--attention-backend", "dense", "--bf16", "--profile",
              "--profile-step-start", "1", "--profile-step-end", "3"]
    out = torchrun(1, "launchers/pretrain_nbp.py", *common, "--use-pytorch-profiler",
                   "--tensorboard-dir", str(tmp_path / "tb")).stdout
    summary = (tmp_path / "tb" / "profile_rank0_iters2-3.txt").read_text()
    head = summary.splitlines()[0]
    print(head)
    assert re.match(r"2 iteration\(s\), [\d.]+ ms each \(wall, profiler on\), device busy [\d.]+%$", head), head
    assert "Self CUDA" in summary and "iteration        4/" in out
    nsys = torchrun(1, "launchers/pretrain_nbp.py", *common).stdout
    assert "> profile: rank 0, iterations 2-3 in the CUDA profiler capture range (nsys)" in nsys
    assert "iteration        4/" in nsys


def test_gradient_norm_reads_nothing_back_on_the_gpu():
    """megatron_nbp.sync_free_grad_norm on CUDA: no host synchronisation (torch's sync debug mode raises on
    one), the float64 norm; megatron-core's local fallback, which it replaces, does synchronise."""
    from megatron.core.utils import local_multi_tensor_l2_norm

    from megatron_nbp.sync_free_grad_norm import sync_free_l2_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, device="cuda", generator=g) for s in [(1536, 6144), (6144,), (64000, 1536)]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm, _ = sync_free_l2_norm(0, None, [grads], False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            local_multi_tensor_l2_norm(0, None, [grads], False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    reference = torch.cat([t.double().ravel() for t in grads]).norm()
    assert norm.shape == (1,) and norm.is_cuda and rel(norm[0], reference) < 1e-6
