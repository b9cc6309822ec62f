"""The token layout objects (megatron_nbp.layouts): their batches against the reference functions, their sizes,
ids and generation plans against hand-computed values of the paper's shapes, NTP as frame prediction with L = 1,
the registry, and a scan of the source tree for layout-name branches outside the layouts package."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from megatron_nbp.config import ModelConfig, NBPConfig
from megatron_nbp.layouts import (LAYOUTS, FramePredictionLayout, HybridLayout, LayoutBatch, frame_prediction_batch,
                                  hybrid_batch, layout_class, token_layout)
from megatron_nbp.masks import block_causal_allowed

REPO = Path(__file__).resolve().parents[2]


def assert_same_batch(got: LayoutBatch, want: LayoutBatch) -> None:
    for field in dataclasses.fields(LayoutBatch):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if b is None:
            assert a is None, field.name
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), field.name


def assert_positions_match_batch(layout, batch: LayoutBatch) -> None:
    """The layout's own block ids / positions are those of every sample of its batches."""
    assert batch.tokens.shape[1] == layout.seq_length
    assert torch.equal(layout.block_ids(), batch.block_ids[0])
    assert torch.equal(layout.position_ids(), batch.position_ids[0])
    assert torch.equal(layout.grid_position_ids(), batch.grid_position_ids[:, 0])
    assert torch.equal(layout.positions(rope=True), batch.grid_position_ids[:, 0])
    assert torch.equal(layout.positions(rope=False), batch.position_ids[0])


FRAME_SHAPES = [((2, 4, 4), (1, 1, 4)), ((2, 4, 4), (1, 2, 2)), ((4, 4, 8), (2, 1, 8)), ((3, 2, 12), (1, 2, 4)),
                ((2, 4, 4), (1, 4, 4)), ((1, 4, 4), (1, 1, 1)), ((5, 16, 16), (1, 4, 4))]


@pytest.mark.parametrize("latent,block", FRAME_SHAPES)
def test_frame_prediction_batch_equals_the_reference_function(latent, block):
    layout = FramePredictionLayout(latent, block, vocab_size=300)
    n, L = layout.num_video_tokens, layout.block_size
    video = torch.randint(0, 300, (3, n), generator=torch.Generator().manual_seed(n + L))
    batch = layout.batch(video)
    assert_same_batch(batch, frame_prediction_batch(video, L, latent, block))
    assert_positions_match_batch(layout, batch)
    with pytest.raises(ValueError, match="takes no condition"):
        layout.batch(video, torch.zeros(3, 1, dtype=torch.long))


HYBRID_CASES = [  # latent, block, condition type, P, condition vocabulary (real), null condition
    ((2, 4, 4), (1, 1, 4), "class", 1, 3, False),
    ((2, 4, 4), (1, 2, 2), "class", 1, 5, True),
    ((4, 4, 8), (2, 1, 8), "text", 4, 20, True),
    ((2, 2, 12), (1, 2, 4), "text", 3, 11, False),
    ((1, 4, 4), (1, 1, 1), "class", 1, 2, False),
]


@pytest.mark.parametrize("latent,block,kind,P,C,null", HYBRID_CASES)
def test_hybrid_batch_equals_the_reference_function(latent, block, kind, P, C, null):
    labels = tuple(f"c{i}" for i in range(C)) if kind == "class" else None
    layout = HybridLayout(latent, block, 300, kind, labels, C if kind == "text" else None, P, null)
    n, L = layout.num_video_tokens, layout.block_size
    assert layout.condition_vocab_size == C + null and layout.video_token_offset == L + C + null
    g = torch.Generator().manual_seed(n + P)
    video = torch.randint(0, 300, (3, n), generator=g)
    condition = torch.randint(0, C, (3, P), generator=g)
    padding = None
    if kind == "text":                                   # first sample: its last P - 1 ids are padding
        padding = torch.zeros(3, P, dtype=torch.bool)
        padding[0, 1:] = True
    batch = layout.batch(video, condition, padding)
    assert_same_batch(batch, hybrid_batch(video, condition, L, C + null, padding, latent, block))
    assert_positions_match_batch(layout, batch)
    assert (batch.key_padding is None) == (padding is None)
    with pytest.raises(ValueError, match="needs a condition"):
        layout.batch(video)


def test_k600_frame_prediction_paper_shape():
    """5x16x16 latents, 1x1x16 blocks: S = N - L = 1280 - 16 = 1264, no prefix, video ids are the codes;
    A = 16^2 x 79 x 80 / 2 block-causal pairs; a 2-frame prompt (512 tokens) leaves 48 passes."""
    cfg = NBPConfig.from_yaml(["configs/model/nbp_xl.yaml", "configs/data/k600.yaml"])
    layout = cfg.model.token_layout
    assert type(layout) is FramePredictionLayout and layout == FramePredictionLayout((5, 16, 16), (1, 1, 16), 64000)
    assert (layout.num_video_tokens, layout.block_size, layout.seq_length) == (1280, 16, 1264)
    assert (layout.num_prefix_tokens, layout.condition_vocab_size, layout.null_condition_id) == (0, 0, None)
    assert (layout.video_token_offset, layout.total_vocab_size, layout.condition_key) == (0, 64000, None)
    assert layout.attention_pairs() == 16 * 16 * 79 * 80 // 2 == 808960
    assert layout.block_ids()[-1] == 78 and layout.block_ids().shape == (1264,)
    plan = layout.generation_plan(2 * 16 * 16)
    assert plan.num_passes == 48 and plan.num_generated == 1280 - 512
    assert plan.prefill.length == 512 and plan.prefill.num_logits == 16
    assert [s.length for s in plan.steps[1:]] == [16] * 47 and plan.steps[-1].end == 1264
    m = cfg.model                                        # the config's properties are the layout's
    assert (m.seq_length, m.num_prefix_tokens, m.video_token_offset, m.total_vocab_size) == (1264, 0, 0, 64000)


def test_ucf101_hybrid_class_paper_shape():
    """101 classes, P = 1: S = P + N = 1281; ids: L = 16 specials (BOV = 0, MBOS_i = i), 101 condition ids
    from 16, video codes from 16 + 101 = 117; 16 + 79 = 95 passes. A null condition adds id 101 and moves
    the video codes to 118."""
    cfg = NBPConfig.from_yaml(["configs/model/nbp_xl.yaml", "configs/data/ucf101.yaml"])
    layout = cfg.model.token_layout
    assert type(layout) is HybridLayout and layout.condition_type == "class"
    assert (layout.seq_length, layout.num_prefix_tokens, layout.condition_vocab_size) == (1281, 1, 101)
    assert (layout.video_token_offset, layout.total_vocab_size, layout.null_condition_id) == (117, 64117, None)
    assert layout.condition_key == "label" and layout.conditional
    ids = layout.block_ids()
    assert ids[:18].tolist() == [0] + list(range(1, 17)) + [17] and ids[-1] == 16 + 79
    plan = layout.generation_plan()
    assert plan.num_passes == 95 and plan.num_generated == 1280
    assert (plan.prefill.given, plan.prefill.special_ids, plan.prefill.num_logits) == (1, (0,), 1)
    assert plan.steps[16].special_ids == tuple(range(1, 16)) and plan.steps[16].fed == 1
    m = cfg.model
    assert (m.seq_length, m.condition_vocab_size, m.video_token_offset) == (1281, 101, 117)
    cfg.set("model.null_condition", True)
    null = cfg.model.token_layout
    assert (null.condition_vocab_size, null.null_condition_id, null.video_token_offset) == (102, 101, 118)
    assert cfg.model.null_condition_id == 101


def test_text_hybrid_paper_shape():
    """Text conditions of up to P = 32 ids from a 32,000-id vocabulary: S = 1312, video codes from 16 + 32000."""
    cfg = NBPConfig.from_yaml(["configs/model/nbp_xl.yaml", "configs/data/text_conditional.yaml"])
    layout = cfg.model.token_layout
    assert (layout.seq_length, layout.num_prefix_tokens, layout.video_token_offset) == (1312, 32, 32016)
    assert layout.condition_key == "text_ids" and layout.generation_plan().prefill.length == 33


def test_ntp_is_frame_prediction_with_one_token_blocks():
    """NTP: block shape 1x1x1 of the frame-prediction layout, S = N - 1, block id = position (a causal mask),
    one token per pass."""
    m = ModelConfig(latent_shape=(2, 4, 4), block_shape=(1, 1, 1), vocab_size=300)
    layout = m.token_layout
    assert type(layout) is FramePredictionLayout and set(LAYOUTS) == {"frame_prediction", "hybrid"}
    assert layout.seq_length == 31 and torch.equal(layout.block_ids(), torch.arange(31))
    assert torch.equal(block_causal_allowed(layout.block_ids()), torch.ones(31, 31, dtype=torch.bool).tril())
    assert layout.attention_pairs() == 31 * 32 // 2
    plan = layout.generation_plan(16)
    assert plan.num_passes == 16 and all(s.length == 1 and s.num_logits == 1 for s in plan.steps[1:])
    video = torch.randint(0, 300, (2, 32))
    b = layout.batch(video)
    assert torch.equal(b.tokens, video[:, :-1]) and torch.equal(b.labels, video[:, 1:])


@pytest.mark.parametrize("layout", [
    FramePredictionLayout((3, 4, 4), (1, 1, 4), 50), FramePredictionLayout((4, 4, 8), (2, 1, 8), 50),
    HybridLayout((2, 4, 4), (1, 2, 2), 50, "class", ("a", "b")),
    HybridLayout((2, 4, 8), (2, 1, 8), 50, "text", None, 20, 4, True),
    HybridLayout((1, 4, 4), (1, 1, 1), 50, "class", ("a",)),
], ids=["rows", "2x1x8", "class_1x2x2", "text_2x1x8", "class_ntp"])
def test_generation_plan_walks_the_sequence_one_newest_block_at_a_time(layout):
    """The passes cover positions 0 .. S-1 in order; after the prefill each pass is exactly one block, later
    than everything in the cache (what a cached step without a mask relies on); every video token is
    predicted once."""
    prompt = None if layout.conditional else 2 * layout.block_size
    plan = layout.generation_plan(prompt)
    assert plan.steps[-1].end == plan.seq_length == layout.seq_length
    assert sum(s.length for s in plan.steps) == layout.seq_length
    assert plan.num_generated == layout.num_video_tokens - (prompt or 0)
    for step in plan.steps[1:]:
        ids = plan.step_block_ids(step)
        assert bool((ids == ids[0]).all()) and int(ids[0]) > int(plan.block_ids[:step.start].max())
        assert plan.step_positions(step, rope=True).shape == (3, step.length)
    with pytest.raises(ValueError):
        layout.generation_plan(layout.block_size + 1)


def test_frame_prediction_refuses_prompts_that_are_not_whole_blocks():
    layout = FramePredictionLayout((3, 4, 4), (1, 1, 4), 50)
    for bad in (None, 0, 6, 48, 52):                    # none, empty, not a multiple of L, beyond S = 44
        with pytest.raises(ValueError, match="must be a positive multiple of the block size 4"):
            layout.generation_plan(bad)
    assert layout.generation_plan(44).num_passes == 1                 # all but the last block: one pass
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        FramePredictionLayout((4, 4, 8), (2, 1, 8), 50).prompt_in_block_order(torch.zeros(1, 32, dtype=torch.long))


def test_conditions_of_shard_samples():
    """What a sample must carry, and how a micro-batch's conditions become ids and padding."""
    klass = HybridLayout((2, 4, 4), (1, 1, 4), 50, "class", ("cat", "dog"))
    assert [klass.sample_condition(x) for x in ("dog", "cat")] == [1, 0]
    with pytest.raises(ValueError, match="clip label 'cow' is not in model.condition_labels"):
        klass.sample_condition("cow")
    ids, pad = klass.condition_batch([1, 0])
    assert ids.tolist() == [[1], [0]] and not pad.any()
    assert klass.manifest_problems({"labels": ["cat", "cow"]}) == [
        "clip labels ['cow'] are not in model.condition_labels (2 classes)"]
    text = HybridLayout((2, 4, 4), (1, 1, 4), 50, "text", None, 10, 3)
    ids, pad = text.condition_batch([[4, 5], [1, 2, 3, 9]])
    assert ids.tolist() == [[4, 5, 0], [1, 2, 3]] and pad.tolist() == [[False, False, True], [False] * 3]
    with pytest.raises(ValueError, match=r"text_ids must be a list of ints in \[0, 10\)"):
        text.condition_batch([[10]])
    assert text.manifest_problems({"labels": ["anything"]}) == []
    frame = FramePredictionLayout((2, 4, 4), (1, 1, 4), 50)
    assert frame.sample_condition("cat") is None and frame.condition_batch([None]) is None
    assert frame.condition_key is None and not frame.conditional


def test_configuration_problems():
    assert HybridLayout((2, 4, 4), (1, 1, 4), 50, "class", ("a", "a")).config_problems() == [
        "hybrid class conditioning needs distinct model.condition_labels, got ['a', 'a']"]
    assert HybridLayout((2, 4, 4), (1, 1, 4), 50, "speech").config_problems() == [
        "model.condition_type='speech' not in ('class', 'text')"]
    assert HybridLayout((2, 4, 4), (1, 1, 4), 50, "text", None, 0, 0).config_problems() == [
        "hybrid text conditioning needs model.text_vocab_size >= 1, got 0",
        "num_condition_tokens=0 must be >= 1 for text"]
    assert FramePredictionLayout((4, 4, 8), (2, 1, 8), 50).prompt_problems(1) == [
        "condition_frames=1 must be a multiple of the block's 2 frames (block_shape (2, 1, 8))"]
    assert FramePredictionLayout((4, 4, 8), (2, 1, 8), 50).prompt_problems(2) == []


def test_random_batches_are_seeded_and_valid():
    for layout in (FramePredictionLayout((2, 4, 4), (1, 2, 2), 50),
                   HybridLayout((2, 4, 4), (1, 1, 4), 50, "text", None, 10, 3, True)):
        a = layout.random_batch(2, torch.Generator().manual_seed(0))
        b = layout.random_batch(2, torch.Generator().manual_seed(0))
        assert_same_batch(a, b)
        assert a.tokens.shape == (2, layout.seq_length) and int(a.tokens.max()) < layout.total_vocab_size


def test_converted_config_gives_the_training_layout(tmp_path):
    """The inference side reads the same ModelConfig: config.json written by the converter gives back the
    training layout (sizes, offsets, null condition)."""
    import json

    from megatron_nbp.inference.model import converted_config, load_converted_config

    m = ModelConfig(latent_shape=(2, 4, 8), block_shape=(2, 1, 8), vocab_size=300, layout="hybrid",
                    condition_type="text", text_vocab_size=20, num_condition_tokens=4, null_condition=True)
    (tmp_path / "config.json").write_text(json.dumps(converted_config(m, {"iteration": 3})))
    back = load_converted_config(tmp_path / "config.json")
    assert back.token_layout == m.token_layout
    assert back.token_layout.video_token_offset == back.video_token_offset == 16 + 21


def test_unknown_layout_names_are_refused():
    with pytest.raises(ValueError, match=r"model.layout='ntp' not in \('frame_prediction', 'hybrid'\)"):
        NBPConfig.from_dict({"model": {"layout": "ntp"}})      # refused when the config is read
    with pytest.raises(ValueError, match=r"layout='ntp' not in \('frame_prediction', 'hybrid'\)"):
        token_layout(ModelConfig(layout="ntp"))
    with pytest.raises(ValueError, match="model.layout='prefix' not in"):
        layout_class("prefix")
    with pytest.raises(ValueError, match="model.layout=None not in"):
        layout_class(None)
    assert layout_class("hybrid") is HybridLayout


LAYOUT_BRANCH = re.compile(r"layout\s*[!=]=")


def test_no_layout_name_branches_outside_the_layouts_package():
    """Layout-specific behaviour lives in the layout classes: no ``layout ==`` / ``layout !=`` anywhere in
    megatron_nbp (outside megatron_nbp/layouts/), data_prep or launchers."""
    hits = []
    for top in ("megatron_nbp", "data_prep", "launchers"):
        for path in sorted((REPO / top).rglob("*")):
            rel = path.relative_to(REPO).as_posix()
            if not path.is_file() or rel.startswith("megatron_nbp/layouts/") or "__pycache__" in rel:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            hits += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                     if LAYOUT_BRANCH.search(line)]
    assert (REPO / "megatron_nbp" / "layouts" / "registry.py").is_file()     # the scan looks at the real tree
    assert not hits, "layout-name branches outside megatron_nbp/layouts/:\n" + "\n".join(hits)
