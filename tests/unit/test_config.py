"""Invalid configurations are refused before any process group exists, naming the values; types are
checked on reading (nbp_common.config); the launchers' flags are the config fields."""

import re

import pytest

from megatron_nbp.config import ConfigError, NBPConfig

TINY = "configs/tiny_frame_prediction.yaml"


def test_tiny_config_is_valid_for_tp2_pp2():
    cfg = NBPConfig.from_yaml(TINY, {"parallel.tensor_model_parallel_size": 2,
                                     "parallel.pipeline_model_parallel_size": 2})
    cfg.validate(world_size=4)
    assert cfg.model.block_size == 8 and cfg.model.seq_length == 320 - 8
    assert cfg.model.padded_vocab_size == 64000  # already a multiple of 128: no padding, at any TP


@pytest.mark.parametrize("overrides,world,message", [
    ({"parallel.tensor_model_parallel_size": 3}, 3, "num_attention_heads=4 not divisible by tensor parallel size 3"),
    ({"parallel.pipeline_model_parallel_size": 3}, 3, "num_layers=4 not divisible by pipeline parallel size 3"),
    ({"parallel.tensor_model_parallel_size": 2}, 3, "world size 3 not divisible by TP x PP = 2 x 1"),
    ({"train.global_batch_size": 7}, 1, "global_batch_size=7 not divisible"),
    ({"model.block_shape": [1, 1, 3]}, 1, "does not tile latent_shape"),
    ({"model.block_shape": [2, 1, 8]}, 1, "does not tile latent_shape (5, 8, 8)"),
    ({"model.layout": "hybrid", "model.condition_type": "text"}, 1, "needs model.text_vocab_size >= 1"),
    ({"model.layout": "hybrid", "model.condition_type": "speech"}, 1, "condition_type='speech' not in"),
    ({"model.position_embedding_type": "alibi"}, 1, "position_embedding_type='alibi' not in"),
    ({"model.transformer_impl": "transformer_engine"}, 1, "needs transformer-engine on a CUDA machine"),
    ({"model.condition_frames": 5}, 1, "condition_frames=5"),
    ({"train.lr_warmup_iters": 500}, 1, "lr_warmup_iters=500"),
    ({"model.layout": "hybrid"}, 1, "class conditioning needs distinct model.condition_labels"),
    ({"model.layout": "prefix"}, 1, "model.layout='prefix' not in"),
    ({"model.attention_backend": "flex", "model.attention_dropout": 0.1}, 1, "has no attention dropout"),
])
def test_invalid_combinations_are_refused(overrides, world, message):
    # values outside a field's choices are refused on reading, combinations by validate()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NBPConfig.from_yaml(TINY, overrides).validate(world_size=world)


def test_unknown_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(ConfigError, match="num_layer"):
        NBPConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="unknown config key"):
        NBPConfig.from_yaml(TINY, {"train.learning_rate": 1.0})


def test_hybrid_vocabulary_and_sequence_follow_the_official_layout():
    cfg = NBPConfig.from_yaml(["configs/model/nbp_xl.yaml", "configs/data/ucf101.yaml"])
    cfg.validate(world_size=8)
    m = cfg.model
    assert m.condition_vocab_size == 101 and m.video_token_offset == 16 + 101
    assert m.total_vocab_size == 16 + 101 + 64000 and m.seq_length == 1 + 1280


# ------------------------------------------------------------------ types checked on reading (nbp_common.config)
def _yaml(tmp_path, text):
    path = tmp_path / "layer.yaml"
    path.write_text(text)
    return [TINY, str(path)]


def test_yaml_float_without_a_dot_is_read_as_a_float_and_reaches_the_optimizer(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; the config turns it into the float 0.001, and the
    optimizer config a run builds from the config uses that number."""
    import yaml

    from megatron_nbp.training import optimizer_config

    assert yaml.safe_load("lr: 1e-3\nmin_lr: 1e-5") == {"lr": "1e-3", "min_lr": "1e-5"}  # the gotcha itself
    cfg = NBPConfig.from_yaml(_yaml(tmp_path, "train:\n  lr: 1e-3\n  min_lr: 1e-5\n  clip_grad: 2\n"))
    cfg.validate(world_size=1)
    t = cfg.train
    assert type(t.lr) is float and t.lr == 0.001 and type(t.min_lr) is float and t.min_lr == 1e-5
    assert type(t.clip_grad) is float and t.clip_grad == 2.0  # an int where a float belongs is a float
    opt = optimizer_config(t, "fp32")  # the megatron-core OptimizerConfig a run builds
    assert opt.lr == 0.001 and opt.min_lr == 1e-5 and opt.clip_grad == 2.0


@pytest.mark.parametrize("text,message", [
    ("train:\n  micro_batch_size: \"2\"\n", "train.micro_batch_size: input should be a valid integer, got '2'"),
    ("train:\n  micro_batch_size: 2.0\n", "train.micro_batch_size: input should be a valid integer, got 2.0"),
    ("train:\n  lr: fast\n", "train.lr: input should be a valid number, got 'fast'"),
    ("train:\n  use_distributed_optimizer: \"true\"\n",
     "train.use_distributed_optimizer: input should be a valid boolean, got 'true'"),
    ("train:\n  use_distributed_optimizer: 1\n", "train.use_distributed_optimizer: input should be a valid boolean"),
    ("model:\n  latent_shape: [5, \"8\", 8]\n", "model.latent_shape[1]: input should be a valid integer, got '8'"),
    ("model:\n  latent_shape: [5, 8]\n", "model.latent_shape"),
    ("train:\n  foo: 1\n", "unknown config key 'train.foo'; known keys: micro_batch_size, global_batch_size"),
    ("trian:\n  lr: 0.1\n", "unknown config key 'trian'"),
    ("model:\n  normalization: layernorm\n", "model.normalization='layernorm' not in ('LayerNorm', 'RMSNorm')"),
    ("train:\n  recompute_method: blocks\n", "train.recompute_method='blocks' not in ('uniform', 'block')"),
    ("deepspeed:\n  offload_optimizer: nvme\n", "deepspeed.offload_optimizer='nvme' not in ('none', 'cpu')"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        NBPConfig.from_yaml(_yaml(tmp_path, text))
    assert message in str(err.value)
    assert str(err.value).startswith("invalid configuration: ") and "\n" not in str(err.value)  # one line


def test_every_type_problem_is_listed_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        NBPConfig.from_yaml(_yaml(tmp_path, "train:\n  micro_batch_size: '2'\n  foo: 1\nmodel:\n  layout: x\n"))
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration:" and len(lines) == 4
    assert "  - train.micro_batch_size: input should be a valid integer, got '2'" in lines
    assert "  - model.layout='x' not in ('frame_prediction', 'hybrid')" in lines
    assert any(line.startswith("  - unknown config key 'train.foo'; known keys: ") for line in lines)


def test_set_and_assignment_are_checked_like_a_file():
    cfg = NBPConfig.from_yaml(TINY)
    with pytest.raises(ConfigError, match="train.global_batch_size: input should be a valid integer, got '8'"):
        cfg.set("train.global_batch_size", "8")
    with pytest.raises(ConfigError, match="train.precision='fp8' not in"):
        cfg.set("train.precision", "fp8")
    with pytest.raises(ConfigError, match="unknown config key 'model.num_layer'"):
        cfg.set("model.num_layer", 2)
    with pytest.raises(ConfigError, match="lr: input should be a valid number"):
        cfg.train.lr = "fast"
    assert cfg.train.global_batch_size == 8 and cfg.train.precision == "auto" and cfg.train.lr == 0.001
    cfg.set("train.lr", "2e-3")
    cfg.set("model.block_shape", [1, 2, 4])
    assert cfg.train.lr == 0.002 and cfg.model.block_shape == (1, 2, 4)


def test_layered_files_and_overrides_merge_key_by_key(tmp_path):
    from nbp_common.config import apply_overrides, load_yaml_layers

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  num_layers: 2\n  hidden_size: 64\ndata: x\n")
    b.write_text("model:\n  num_layers: 3\ntrain:\n  lr: 0.1\n")
    raw = load_yaml_layers([a, b])
    assert raw == {"model": {"num_layers": 3, "hidden_size": 64}, "data": "x", "train": {"lr": 0.1}}
    out = apply_overrides(raw, {"model.hidden_size": 32, "save": "ckpt", "train.seed": None, "parallel.pp": 1})
    assert out["model"] == {"num_layers": 3, "hidden_size": 32} and out["save"] == "ckpt"
    assert "seed" not in out["train"] and out["parallel"] == {"pp": 1} and raw["model"]["hidden_size"] == 64
    with pytest.raises(ConfigError, match="unknown config key 'data.path'"):
        apply_overrides(raw, {"data.path": "y"})
    with pytest.raises(FileNotFoundError):
        load_yaml_layers([tmp_path / "missing.yaml"])


def test_ffn_width_follows_the_hidden_size_given_anywhere():
    """Megatron-LM's default MLP width 4 x hidden; a --hidden-size override counts (the file does not set
    the width), while set() after construction keeps the width already resolved."""
    cfg = NBPConfig.from_dict({"model": {"hidden_size": 64}}, {"model.hidden_size": 96})
    assert cfg.model.ffn_hidden_size == 384
    cfg.set("model.hidden_size", 32)
    assert cfg.model.ffn_hidden_size == 384


def test_checkpoint_model_dicts_round_trip():
    """Checkpoints store ``to_dict()["model"]`` (JSON-safe: lists) and rebuild it with ModelConfig(**d)."""
    import json

    from megatron_nbp.config import ModelConfig

    cfg = NBPConfig.from_yaml(["configs/model/nbp_xl.yaml", "configs/data/ucf101.yaml"])
    saved = json.loads(json.dumps(cfg.to_dict()["model"]))
    assert saved["latent_shape"] == list(cfg.model.latent_shape)
    assert ModelConfig(**saved) == cfg.model == ModelConfig.from_dict(saved)
    older = {k: v for k, v in saved.items() if k not in ("transformer_impl", "max_position_embeddings")}
    assert ModelConfig(**older).transformer_impl == "local"  # a field an older checkpoint lacks: its default
    with pytest.raises(ConfigError, match="unknown config key 'hidden'"):
        ModelConfig(**saved, hidden=3)


def test_converted_checkpoint_configs_of_the_old_format_are_read(tmp_path):
    """config.json of the earlier converters (format 2: a flat copy of some fields) gives the same model."""
    import json

    from megatron_nbp.config import ModelConfig
    from megatron_nbp.inference.model import converted_config, load_converted_config

    hybrid = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=300, latent_shape=(2, 4, 4),
                         block_shape=(1, 1, 4), layout="hybrid", condition_labels=["a", "b"], null_condition=True,
                         make_vocab_size_divisible_by=64, max_position_embeddings=40)
    old = dict(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=128, vocab_size=300,
               padded_vocab_size=320, max_seq_length=40, latent_shape=[2, 4, 4], block_shape=[1, 1, 4],
               layout="hybrid", condition_frames=2, condition_labels=["a", "b"], video_token_offset=7,
               layernorm_epsilon=1e-5, normalization="LayerNorm", activation="gelu", add_bias_linear=True,
               share_embeddings_and_output_weights=True, condition_type="class", text_vocab_size=None,
               num_condition_tokens=1, position_embedding_type="learned_absolute", rotary_base=10000,
               mrope_section=[4, 2, 2], null_condition=True, format_version=2, extra={"iteration": 3})
    (tmp_path / "old.json").write_text(json.dumps(old))
    read = load_converted_config(tmp_path / "old.json")
    for name in ("padded_vocab_size", "position_table_size", "video_token_offset", "num_prefix_tokens",
                 "mrope_section", "seq_length", "condition_vocab_size", "null_condition_id"):
        assert getattr(read, name) == getattr(hybrid, name), name
    frame = dict(old, layout="frame_prediction", num_condition_tokens=0, video_token_offset=0, max_seq_length=28,
                 padded_vocab_size=384, condition_labels=None, null_condition=False)
    (tmp_path / "frame.json").write_text(json.dumps(frame))
    read = load_converted_config(tmp_path / "frame.json")
    assert (read.num_prefix_tokens, read.position_table_size, read.padded_vocab_size) == (0, 28, 384)
    (tmp_path / "new.json").write_text(json.dumps(converted_config(hybrid, {"iteration": 3})))
    assert load_converted_config(tmp_path / "new.json") == hybrid


# ------------------------------------------------------------------ the launcher refuses before any process group
def test_launcher_refuses_a_mistyped_yaml_before_any_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    from megatron_nbp.cli import pretrain

    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append(a))
    monkeypatch.setenv("WORLD_SIZE", "1")
    for text, field in (("train:\n  micro_batch_size: \"2\"\n", "train.micro_batch_size"),
                        ("train:\n  lr: 1e-3x\n", "train.lr"),
                        ("model:\n  activation: relu\n", "model.activation='relu' not in ('gelu', 'swiglu')")):
        with pytest.raises(SystemExit) as exit_:
            pretrain.main(["--config", TINY, "--config", str(_yaml(tmp_path, text)[1]), "--data", str(tmp_path)])
        message = str(exit_.value.code)
        assert message.startswith("pretrain_nbp.py [rank 0]: ConfigError: invalid configuration: ") and field in message
        assert "\n" not in message
    with pytest.raises(SystemExit) as exit_:  # a mistyped flag the same way
        pretrain.main(["--config", TINY, "--data", str(tmp_path), "--precision", "fp8"])
    assert exit_.value.code == 2  # argparse: not one of the choices
    assert started == [] and not dist.is_initialized()


def test_dry_run_prints_every_resolved_field_and_the_parameter_count(capsys, monkeypatch):
    from nbp_common.config import leaf_fields

    from megatron_nbp.cli import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    pretrain.main(["--config", TINY, "--dry-run", "--tp", "2", "--lr", "2e-3", "--bf16", "--latent-shape", "5", "8",
                   "8", "--condition-labels", "a", "b"])
    out = capsys.readouterr().out
    values = dict(re.findall(r"^  (\S+) \.+ (.*)$", out, flags=re.MULTILINE))
    assert set(values) == set(leaf_fields(NBPConfig))
    assert values["parallel.tensor_model_parallel_size"] == "2" and values["train.lr"] == "0.002"
    assert values["train.precision"] == "'bf16'" and values["train.train_iters"] == "180"  # from the YAML
    assert values["model.latent_shape"] == "(5, 8, 8)" and values["model.condition_labels"] == "['a', 'b']"
    assert "> parameters: transformer" in out and "> model: 4 layers, hidden 128" in out
    assert "end of arguments" in out


# ------------------------------------------------------------------ command-line flags derived from the fields
# Every flag of the launchers before their flags were derived from the configs, with the field it set.
OLD_PRETRAIN_FLAGS = {
    "--config": None, "--seq-length": None,
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size", "--tp": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
    "--pp": "parallel.pipeline_model_parallel_size", "--backend": "train.backend",
    "--zero-stage": "deepspeed.zero_stage", "--offload-optimizer": "deepspeed.offload_optimizer",
    "--deepspeed-config": "deepspeed.config_file", "--bf16": "train.precision", "--fp16": "train.precision",
    "--fp32": "train.precision", "--loss-scale": "train.loss_scale", "--initial-loss-scale": "train.initial_loss_scale",
    "--min-loss-scale": "train.min_loss_scale", "--loss-scale-window": "train.loss_scale_window",
    "--hysteresis": "train.hysteresis", "--use-distributed-optimizer": "train.use_distributed_optimizer",
    "--overlap-grad-reduce": "train.overlap_grad_reduce", "--overlap-param-gather": "train.overlap_param_gather",
    "--recompute-granularity": "train.recompute_granularity", "--recompute-method": "train.recompute_method",
    "--recompute-num-layers": "train.recompute_num_layers", "--sequence-parallel": "parallel.sequence_parallel",
    "--transformer-impl": "model.transformer_impl", "--attention-backend": "model.attention_backend",
    "--peak-tflops": "train.peak_tflops", "--micro-batch-size": "train.micro_batch_size",
    "--global-batch-size": "train.global_batch_size", "--max-position-embeddings": "model.max_position_embeddings",
    "--train-iters": "train.train_iters", "--lr": "train.lr", "--min-lr": "train.min_lr",
    "--clip-grad": "train.clip_grad", "--lr-warmup-iters": "train.lr_warmup_iters", "--seed": "train.seed",
    "--pkeep": "train.pkeep", "--p-drop-cond": "train.p_drop_cond", "--tokenizer-sha256": "train.tokenizer_sha256",
    "--hidden-dropout": "model.hidden_dropout", "--attention-dropout": "model.attention_dropout", "--data": "data",
    "--save": "save", "--load": "load", "--no-load-optim": "train.no_load_optim", "--no-load-rng": "train.no_load_rng",
    "--save-interval": "train.save_interval", "--exit-interval": "train.exit_interval",
    "--log-interval": "train.log_interval", "--tensorboard-dir": "tensorboard_dir", "--dry-run": "dry_run",
}
OLD_TRAIN_TOKENIZER_FLAGS = {f"--{n.replace('_', '-')}": n for n in (
    "config", "data", "output", "resolution", "num_frames", "frame_stride", "train_steps", "max_minutes",
    "batch_size", "lr", "warmup_steps", "image_every", "image_batch_size", "seed", "log_interval", "tensorboard_dir",
    "eval_clips", "holdout_fraction", "disc_weight", "disc_start", "gan_loss", "disc_lr", "disc_channels",
    "disc_layers", "lecam_weight", "lecam_decay", "perceptual_weight", "perceptual_network", "ema_decay", "save",
    "save_interval", "load", "exit_interval", "image_log_interval")}
OLD_TRAIN_TOKENIZER_FLAGS.update({"--train-iters": "train_steps", "--no-adaptive-weight": "adaptive_weight",
                                  "--no-export-ema": "export_ema"})
OLD_TOKENIZE_FLAGS = {"--input": "input_dir", "--output": "output_dir", "--tokenizer": "tokenizer",
                      "--no-progress": "progress", **{f"--{n.replace('_', '-')}": n for n in (
                          "num_frames", "frame_stride", "clip_hop", "resolution", "max_clips_per_video",
                          "videos_per_shard", "batch_size", "label_from_dir", "media", "fps", "clip_placement")}}
OLD_EVAL_TOKENIZER_FLAGS = {"--json": "json_path", **{f"--{n.replace('_', '-')}": n for n in (
    "tokenizer", "official", "data", "resolution", "num_frames", "frame_stride", "holdout_fraction", "max_clips",
    "batch_size", "fvd", "png", "png_clips")}}


def _launchers():
    from data_prep.cli import tokenize_videos, train_tokenizer
    from megatron_nbp.cli import eval_tokenizer
    from data_prep.tokenize_job import TokenizeConfig
    from data_prep.tokenizer.config import TrainOptions
    from megatron_nbp.cli import pretrain

    return {"pretrain": (pretrain, NBPConfig, OLD_PRETRAIN_FLAGS),
            "train_tokenizer": (train_tokenizer, TrainOptions, OLD_TRAIN_TOKENIZER_FLAGS),
            "tokenize": (tokenize_videos, TokenizeConfig, OLD_TOKENIZE_FLAGS),
            "eval_tokenizer": (eval_tokenizer, eval_tokenizer.EvalOptions, OLD_EVAL_TOKENIZER_FLAGS)}


@pytest.mark.parametrize("name", ["pretrain", "train_tokenizer", "tokenize", "eval_tokenizer"])
def test_launcher_flags_are_the_config_fields_both_ways(name):
    """Every field has its flag (dest = the dotted field path, help = its description), and every flag
    sets a field or is one of the launcher's documented own flags; every flag of the launchers before
    the derivation still exists and sets the same field."""
    from nbp_common.config import field_flags, leaf_fields

    module, cls, old = _launchers()[name]
    parser = module.build_parser()
    fields = leaf_fields(cls)
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    for dotted, field in fields.items():
        flags = field_flags(dotted, field)
        assert all(by_flag[f].dest == dotted for f in flags), (dotted, flags)
        assert field.description and by_flag[flags[0]].help.startswith(field.description[:40]), dotted
    for flag, action in by_flag.items():
        if flag in ("-h", "--help"):
            continue
        assert action.dest in fields or flag in module.LAUNCHER_FLAGS, f"{name}: {flag} sets no field"
    for flag, dotted in old.items():
        assert flag in by_flag, f"{name}: the flag {flag} is gone"
        assert dotted is None and flag in module.LAUNCHER_FLAGS or by_flag[flag].dest == dotted, (flag, dotted)


def test_derived_flags_keep_their_meaning(tmp_path):
    from data_prep.cli import tokenize_videos, train_tokenizer
    from megatron_nbp.cli import eval_tokenizer
    from megatron_nbp.cli import pretrain

    cfg = pretrain.parse_args(["--config", TINY, "--tp", "2", "--pp", "2", "--fp16", "--zero-stage", "2",
                               "--offload-optimizer", "cpu", "--deepspeed-config", "x.json", "--no-load-optim",
                               "--use-distributed-optimizer", "--recompute-granularity", "selective", "--data", "d",
                               "--dry-run", "--seq-length", "312", "--lr", "1e-3", "--null-condition"])
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (2, 2)
    assert (cfg.train.precision, cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer) == ("fp16", 2, "cpu")
    assert cfg.deepspeed.config_file == "x.json" and cfg.train.no_load_optim and cfg.train.use_distributed_optimizer
    assert cfg.train.recompute_granularity == "selective" and cfg.data == "d" and cfg.dry_run
    assert cfg.model.null_condition and cfg.train.lr == 0.001
    untouched = pretrain.parse_args(["--config", TINY])
    assert untouched == NBPConfig.from_yaml(TINY)  # an absent flag never overrides the YAML
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", TINY, "--bf16", "--fp32"])  # one precision
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", TINY, "--seq-length", "320"])  # N - L = 312

    opts = train_tokenizer.parse_args(["--config", "configs/tokenizer/tiny.yaml", "--data", "v", "--output", "o",
                                       "--train-iters", "7", "--no-adaptive-weight", "--no-export-ema", "--lr", "3e-4"])
    assert (opts.train_steps, opts.adaptive_weight, opts.export_ema, opts.lr) == (7, False, False, 3e-4)
    assert opts.batch_size == 2 and opts.warmup_steps == 20  # from the YAML's train: section
    job = tokenize_videos.parse_args(["--input", "i", "--output", "o", "--tokenizer", "t", "--no-progress",
                                      "--label-from-dir", "--fps", "8", "--media", "video"])
    assert (str(job.input_dir), str(job.output_dir), str(job.tokenizer)) == ("i", "o", "t")
    assert (job.progress, job.label_from_dir, job.fps, job.num_frames) == (False, True, 8.0, 17)
    options = eval_tokenizer.build_parser().parse_args(["--tokenizer", "t", "--data", "d", "--json", "r.json"])
    assert vars(options) == {"tokenizer": "t", "data": "d", "json_path": "r.json"}
