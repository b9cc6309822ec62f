"""The optional Weights & Biases writer of the training logger (``--wandb-project``), against a stub
``wandb`` module injected in sys.modules (CI has no wandb): it must receive the same scalars, tags, steps
and values as TensorBoard, the run's name / folder, the samples, and be finished; without the package the
flag is one clear error. Also the config checks of the validation / sample flags."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest

from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.training_log import TrainingLogger, WandbWriter, read_scalars

CONFIG = "tests/configs/tiny_test.yaml"


class WandbStub(types.ModuleType):
    """Records wandb.init / log / finish and the media objects built."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0
        stub = self

        class Media:
            def __init__(self, data, **kwargs):
                self.data, self.kwargs = data, kwargs

        self.Video = type("Video", (Media,), {})
        self.Image = type("Image", (Media,), {})
        self.finish = lambda: setattr(stub, "finished", stub.finished + 1)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return object()

    def log(self, data, step):
        self.logs.append((step, dict(data)))


def config(tmp_path, **fields) -> NBPConfig:
    cfg = NBPConfig.from_yaml(CONFIG)
    cfg.set("tensorboard_dir", str(tmp_path / "tb"))
    for name, value in fields.items():
        cfg.set(name, value)
    return cfg


def test_wandb_gets_the_tensorboard_scalars(tmp_path, monkeypatch):
    stub = WandbStub()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    cfg = config(tmp_path, wandb_project="nbp", wandb_exp_name="tiny", wandb_save_dir=str(tmp_path / "wandb"))
    cfg.set("train.train_iters", 3)
    logger = TrainingLogger(cfg, enabled=True)
    for it, (loss, lr, norm) in enumerate([(7.5, 1e-3, 2.0), (7.25, 9e-4, 1.5), (6.75, 8e-4, 1.25)], start=1):
        logger.log(it, loss, lr, norm, True, 0.1 * it, 8 * it)
    logger.log_validation(2, 7.0, math.exp(7.0))
    logger.log_video("samples/video", np.zeros((3, 8, 8, 3), np.uint8), 3)
    logger.log_image("samples/latent-ids", np.full((8, 16, 3), 9, np.uint8), 3)
    logger.close()

    assert stub.inits == [{"project": "nbp", "name": "tiny", "dir": str(tmp_path / "wandb"),
                           "config": cfg.to_dict()}]
    assert (tmp_path / "wandb").is_dir() and stub.finished == 1
    scalars: dict[str, dict[int, float]] = {}
    media = {}
    for step, data in stub.logs:
        for tag, value in data.items():
            if isinstance(value, (stub.Video, stub.Image)):
                media[tag] = (step, value)
            else:
                scalars.setdefault(tag, {})[step] = value
    assert {"lm-loss", "learning-rate", "grad-norm", "lm loss validation", "lm loss validation ppl"} <= set(scalars)
    for tag, values in scalars.items():
        tb = read_scalars(tmp_path / "tb", tag)
        assert tb.keys() == values.keys(), tag
        for step, value in values.items():
            assert tb[step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard stores float32
    assert scalars["lm-loss"] == {1: 7.5, 2: 7.25, 3: 6.75}
    assert scalars["lm loss validation"] == {2: 7.0}
    step, video = media["samples/video"]
    assert step == 3 and video.data.shape == (3, 3, 8, 8) and isinstance(video, stub.Video)
    step, image = media["samples/latent-ids"]
    assert step == 3 and isinstance(image, stub.Image) and image.data.shape == (8, 16, 3)


def test_wandb_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, find_spec finds nothing
    cfg = config(tmp_path, wandb_project="nbp")
    with pytest.raises(ConfigError, match=r"--wandb-project nbp needs the wandb package: pip install "
                                          r"'megatron-nbp\[wandb\]'"):
        cfg.validate(1)
    with pytest.raises(ConfigError, match="needs the wandb package"):
        WandbWriter(cfg)


@pytest.mark.parametrize("fields, message", [
    ({"train.eval_interval": 5}, "--eval-interval 5 needs --valid-data"),
    ({"train.sample_interval": 5}, "--sample-interval 5 needs --valid-data"),
    ({"valid_data": "v", "train.eval_iters": 0}, "train.eval_iters=0 must be >= 1"),
    ({"valid_data": "v", "train.eval_interval": 0}, "train.eval_interval=0 must be >= 1"),
    ({"sample_tokenizer": "tok.safetensors"}, "--sample-tokenizer tok.safetensors needs --sample-interval"),
    ({"wandb_exp_name": "x"}, "--wandb-exp-name / --wandb-save-dir need --wandb-project"),
])
def test_validation_and_sample_flags_are_checked(tmp_path, fields, message):
    cfg = config(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        cfg.validate(1)
