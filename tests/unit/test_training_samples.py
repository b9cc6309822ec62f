"""Training-time samples (``--sample-interval``) leave the logging rank's random generators as they were: its
tensor-parallel partners, which log nothing, must keep drawing the same numbers (e.g. the input-token
corruption of ``pkeep`` < 1)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_nbp.config import NBPConfig
from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.training import samples as samples_module


def test_a_sample_does_not_move_the_global_generator(monkeypatch, tmp_path):
    cfg = NBPConfig.from_yaml("tests/configs/tiny_test.yaml", {"data": str(tmp_path), "train.sample_interval": 1})
    torch.manual_seed(0)
    weights = NBPDecoder(cfg.model).state_dict()
    tokens = torch.zeros(4, dtype=torch.int64)  # generation and the image are stubbed: only the weights matter
    monkeypatch.setattr(samples_module, "generate_sample", lambda model, cfg, clip, condition: tokens)
    monkeypatch.setattr(samples_module, "latent_ids_image", lambda *args: None)
    logged = []
    samples = samples_module.TrainingSamples(cfg)
    samples._prompt = (tokens, None)
    backend = SimpleNamespace(gather_weights=lambda dst: weights, plan=None)
    logger = SimpleNamespace(log_image=lambda *a: logged.append(a[0]), log_video=lambda *a: logged.append(a[0]))
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    assert samples.run(backend, 1, logger) is tokens and logged == ["samples/latent-ids"]
    assert torch.equal(torch.random.get_rng_state(), before)
    # the check can fail: building the decoder without the fork moves the generator
    NBPDecoder(cfg.model)
    assert not torch.equal(torch.random.get_rng_state(), before)
