"""The untied output layer (``model.untie_embeddings_and_output_weights``, the official release's head) with
the release's weight-decay groups (``train.no_weight_decay release``) through the launcher under TP2 x PP2
(megatron backend, 1F1B, gloo): it trains, a run resumed from iteration 2 is bitwise the uninterrupted run
(losses and every converted tensor at iteration 4), the conversion keeps the head apart from the word
embedding, and the converted model's KV-cache block decoding equals its full forward pass.

The converted model's logits against the TP2 x PP2 megatron model's, its gradients against one process and
its parameter count are tests/distributed/test_parallel_equivalence.py's layout "untied" (same config)."""

import json
import shutil

import pytest
import torch

from data_prep.synthetic import synthetic_clips, write_synthetic_shards
from megatron_nbp.checkpointing import LATEST_FILE
from megatron_nbp.training_log import read_scalars
from tests.dist_utils import run, torchrun

CONFIG = "tests/configs/tiny_test_untied.yaml"
HEAD, EMBEDDING = "output_layer.weight", "embedding.word_embeddings.weight"


def train(root, name, *extra):
    return torchrun(4, "launchers/pretrain_nbp.py", "--tp", "2", "--pp", "2", "--config", CONFIG,
                    "--data", str(root / "data"), "--train-iters", "4", "--save-interval", "2",
                    "--tensorboard-dir", str(root / f"tb_{name}"), *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Work dir after the uninterrupted run (saves at 2 and 4), the run resumed from its iteration-2
    checkpoint, and the conversion of full@2, full@4 and resumed@4."""
    root = tmp_path_factory.mktemp("untied")
    write_synthetic_shards(root / "data", num_clips=40, clips_per_shard=8, latent_shape=(5, 4, 4), vocab=2048)
    train(root, "full", "--save", str(root / "full"))
    shutil.copytree(root / "full", root / "resumed")
    shutil.rmtree(root / "resumed" / "iter_0000004")
    (root / "resumed" / LATEST_FILE).write_text("2")
    out = train(root, "resumed", "--save", str(root / "resumed"), "--load", str(root / "resumed"))
    conversions = [(str(root / "full"), str(root / "full_2"), 2), (str(root / "full"), str(root / "full_4"), 4),
                   (str(root / "resumed"), str(root / "resumed_4"), 4)]
    run(["-c", "from megatron_nbp.inference.convert import convert_checkpoint\n"
               f"for a, b, i in {conversions!r}: convert_checkpoint(a, b, i)"])
    return root, out.stdout


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resumed_run_is_bitwise_the_uninterrupted_one(runs):
    root, stdout = runs
    assert "loaded checkpoint" in stdout
    full, resumed = read_scalars(root / "tb_full"), read_scalars(root / "tb_resumed")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert all(resumed[i] == full[i] for i in (3, 4)), (full, resumed)
    a, b = weights(root / "full_4"), weights(root / "resumed_4")
    assert set(a) == set(b) and HEAD in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_untied_head_trains_apart_from_the_word_embedding(runs):
    root, _ = runs
    config = json.loads((root / "full_4" / "config.json").read_text())["model"]
    assert config["untie_embeddings_and_output_weights"] is True
    before, after = weights(root / "full_2"), weights(root / "full_4")
    assert after[HEAD].shape == after[EMBEDDING].shape == (2048, 64)
    assert not torch.equal(after[HEAD], after[EMBEDDING])
    for name in (HEAD, EMBEDDING):  # both move between iterations 2 and 4, each by its own gradient
        assert (after[name] - before[name]).norm() > 0, name
    assert not torch.allclose(after[HEAD] - before[HEAD], after[EMBEDDING] - before[EMBEDDING])


def test_kv_cache_decoding_of_the_trained_untied_model_equals_its_full_forward(runs):
    from megatron_nbp.inference.generate import BlockDecoder
    from megatron_nbp.inference.model import load_inference_model
    from megatron_nbp.layouts import frame_prediction_batch
    from megatron_nbp.masks import block_causal_allowed

    root, _ = runs
    model = load_inference_model(root / "full_4")
    cfg = model.config
    assert hasattr(model, "output_layer") and model.output_weight() is model.output_layer.weight
    L, prompt = cfg.block_size, 2 * 16  # two latent frames of 4x4
    video = torch.from_numpy(synthetic_clips(2, cfg.latent_shape, vocab=cfg.vocab_size, seed=3).reshape(2, -1)).long()
    batch = frame_prediction_batch(video, L, cfg.latent_shape, cfg.block_shape)
    with torch.no_grad():
        full = model(batch.tokens, batch.position_ids, block_causal_allowed(batch.block_ids))
        decoder = BlockDecoder(model, 2)
        cached = [decoder.prefill(video[:, :prompt])]
        for start in range(prompt, video.shape[1] - L, L):
            cached.append(decoder.step(video[:, start:start + L]))
    cached, reference = torch.cat(cached, dim=1), full[:, prompt - L:]
    assert float((cached - reference).norm() / reference.norm()) <= 1e-5
