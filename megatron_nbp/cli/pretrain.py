"""NBP pretraining entry point (megatron-core, tensor + pipeline + data parallel).

    torchrun --nproc-per-node 4 launchers/pretrain_nbp.py --tp 2 --pp 2 \
        --config configs/tiny_frame_prediction.yaml --data runs/tokens --save runs/ckpt

    torchrun --nproc-per-node 4 launchers/pretrain_nbp.py --backend deepspeed --zero-stage 3 --tp 2 \
        --config configs/tiny_frame_prediction.yaml --data runs/tokens --save runs/ckpt_zero3

Every field of the config (megatron_nbp.config) is a flag named after it, with Megatron-LM's names
(``--micro-batch-size``, ``--lr``, ``--tensor-model-parallel-size`` / ``--tp``, ``--bf16``, ...); a flag
given overrides the YAML. ``--dry-run`` validates and prints the resolved config and the parameter count.
"""

from __future__ import annotations

import argparse
import os
import sys


from megatron_nbp.config import ConfigError, NBPConfig
from nbp_common.config import add_config_arguments, config_overrides, print_config

# Flags of the launcher itself, not config fields (every other flag is derived from an NBPConfig field).
LAUNCHER_FLAGS = {
    "--config": "YAML config files, layered in order",
    "--seq-length": "a check of the sequence length the layout implies (Megatron-LM's flag; derived here)",
}


def build_parser() -> argparse.ArgumentParser:
    """The launcher's parser: ``--config``, ``--seq-length`` and one flag per NBPConfig field
    (nbp_common.config.add_config_arguments: ``--micro-batch-size``, ``--tp``, ``--bf16``, ...)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append",
                        help="YAML config (model / parallel / train / deepspeed sections); repeat to layer files, "
                             "e.g. --config configs/model/nbp_xl.yaml --config configs/data/k600.yaml")
    parser.add_argument("--seq-length", type=int, help="checked against the layout (N - L); derived if omitted")
    add_config_arguments(parser, NBPConfig)
    return parser


def parse_args(argv=None) -> NBPConfig:
    """Parse the command line into an NBPConfig (the YAML files, then the flags given on top).

    Raises:
        ConfigError: an unknown key or a value of the wrong type in the files or flags (named by its
            dotted path); cross-field checks come later, in ``NBPConfig.validate``.
        SystemExit: a usage error, or ``--seq-length`` contradicting the layout.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = NBPConfig.from_yaml(args.config, config_overrides(args, NBPConfig))
    if args.seq_length is not None and args.seq_length != cfg.model.seq_length:
        m = cfg.model
        parser.error(f"--seq-length {args.seq_length} does not match the {m.layout} layout's sequence length "
                     f"{m.seq_length} (latent {m.latent_shape}, block {m.block_shape}, {m.num_prefix_tokens} "
                     f"condition tokens)")
    return cfg


def dry_run(cfg) -> None:
    """Validate, print every resolved config field and the model's size, without allocating anything.

    Raises:
        ConfigError: the config fails ``NBPConfig.validate`` for WORLD_SIZE (default TP x PP).
    """
    from megatron_nbp.model.params import count_parameters, format_count

    p = cfg.parallel
    cfg.validate(int(os.environ.get("WORLD_SIZE", p.tensor_model_parallel_size * p.pipeline_model_parallel_size)))
    print_config(cfg)
    c = count_parameters(cfg.model)
    m = cfg.model
    print(f"> model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
          f"ffn {m.ffn_hidden_size}, layout {m.layout}, seq {m.seq_length}, vocab {m.total_vocab_size} "
          f"(video {m.vocab_size} + special/condition {m.video_token_offset}; padded "
          f"{m.padded_vocab_size})")
    print(f"> parameters: transformer {format_count(c.transformer)} ({c.transformer:,}) | "
          f"embeddings {format_count(c.word_embeddings + c.position_embeddings)} | "
          f"output layer {format_count(c.output_layer)} "
          f"({'tied to the word embedding' if m.share_embeddings_and_output_weights else 'untied'}) | "
          f"total {format_count(c.total)} ({c.total:,})")
    if cfg.train.backend == "deepspeed":
        for line in cfg.deepspeed.file_warnings():
            print(f"> warning: {line}")
        world = int(os.environ.get("WORLD_SIZE", p.tensor_model_parallel_size))
        dp = world // p.tensor_model_parallel_size
        print(f"> backend: DeepSpeed ZeRO-{cfg.deepspeed.stage} (optimizer offload: {cfg.deepspeed.offload}) | "
              f"TP={p.tensor_model_parallel_size} DP={dp} | global batch {cfg.train.global_batch_size} = micro "
              f"{cfg.train.micro_batch_size} x DP {dp} x accumulation "
              f"{cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)}")


def main(argv=None) -> None:
    """Parse, then dry-run or train. A refused config (or a missing config file) exits with one
    ``pretrain_nbp.py [rank R]: ConfigError: ...`` message naming the offending fields, before any process
    group exists."""
    rank = os.environ.get("RANK", "0")
    try:
        cfg = parse_args(argv)
        if cfg.dry_run:
            dry_run(cfg)
            return
    except (ConfigError, FileNotFoundError) as err:  # a refused config is a message, not a traceback
        sys.exit(f"pretrain_nbp.py [rank {rank}]: {type(err).__name__}: {err}")
    from megatron_nbp.parallel import destroy_parallel

    from megatron_nbp.training import pretrain
    from megatron_nbp.checkpointing import CheckpointError
    from megatron_nbp.data import DataError

    try:
        pretrain(cfg)
    except (ConfigError, CheckpointError, DataError) as err:  # a user error: one clear line per rank
        rank = os.environ.get("RANK", "0")
        sys.exit(f"pretrain_nbp.py [rank {rank}]: {type(err).__name__}: {err}")
    destroy_parallel()


if __name__ == "__main__":
    main()
