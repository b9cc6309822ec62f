"""NBP pretraining entry point (megatron-core, tensor + pipeline + data parallel).

    torchrun --nproc-per-node 4 launchers/pretrain_nbp.py --tp 2 --pp 2 \
        --config configs/tiny_frame_prediction.yaml --data runs/tokens --save runs/ckpt

    torchrun --nproc-per-node 4 launchers/pretrain_nbp.py --backend deepspeed --zero-stage 3 --tp 2 \
        --config configs/tiny_frame_prediction.yaml --data runs/tokens --save runs/ckpt_zero3

Arguments use Megatron-LM's names; any of them overrides the YAML config.
"""

from __future__ import annotations

import argparse
import os
import sys


from megatron_nbp.config import NBPConfig

# command-line flag -> dotted config key
_OVERRIDES = {
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "train_iters": "train.train_iters",
    "lr": "train.lr",
    "min_lr": "train.min_lr",
    "clip_grad": "train.clip_grad",
    "lr_warmup_iters": "train.lr_warmup_iters",
    "seed": "train.seed",
    "log_interval": "train.log_interval",
    "save_interval": "train.save_interval",
    "exit_interval": "train.exit_interval",
    "pkeep": "train.pkeep",
    "p_drop_cond": "train.p_drop_cond",
    "tokenizer_sha256": "train.tokenizer_sha256",
    "backend": "train.backend",
    "zero_stage": "deepspeed.zero_stage",
    "offload_optimizer": "deepspeed.offload_optimizer",
    "deepspeed_config": "deepspeed.config_file",
    "hidden_dropout": "model.hidden_dropout",
    "attention_dropout": "model.attention_dropout",
    "max_position_embeddings": "model.max_position_embeddings",
    "precision": "train.precision",
    "loss_scale": "train.loss_scale",
    "initial_loss_scale": "train.initial_loss_scale",
    "min_loss_scale": "train.min_loss_scale",
    "loss_scale_window": "train.loss_scale_window",
    "hysteresis": "train.hysteresis",
    "use_distributed_optimizer": "train.use_distributed_optimizer",
    "overlap_grad_reduce": "train.overlap_grad_reduce",
    "overlap_param_gather": "train.overlap_param_gather",
    "recompute_granularity": "train.recompute_granularity",
    "recompute_method": "train.recompute_method",
    "recompute_num_layers": "train.recompute_num_layers",
    "sequence_parallel": "parallel.sequence_parallel",
    "transformer_impl": "model.transformer_impl",
    "attention_backend": "model.attention_backend",
    "peak_tflops": "train.peak_tflops",
    "no_load_optim": "train.no_load_optim",
    "no_load_rng": "train.no_load_rng",
    "data": "data",
    "save": "save",
    "load": "load",
    "tensorboard_dir": "tensorboard_dir",
}


def parse_args(argv=None) -> NBPConfig:
    """Parse the command line into a validated-later NBPConfig."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append",
                        help="YAML config (model / parallel / train sections); repeat to layer files, "
                             "e.g. --config configs/model/nbp_xl.yaml --config configs/data/k600.yaml")
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=int)
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=int)
    parser.add_argument("--backend", choices=["megatron", "deepspeed"],
                        help="megatron: DDP + 1F1B (TP x PP x DP); deepspeed: ZeRO over DP with megatron TP (no PP)")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="DeepSpeed ZeRO stage (--backend deepspeed)")
    parser.add_argument("--offload-optimizer", choices=["none", "cpu"], help="ZeRO optimizer offload (--backend deepspeed)")
    parser.add_argument("--deepspeed-config", help="DeepSpeed JSON whose zero_optimization tuning is merged in "
                                                   "(configs/deepspeed/*.json)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 mixed precision: bf16 weights and activations, fp32 main params and gradient "
                                "reduction (the default on GPU)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 mixed precision with dynamic loss scaling (megatron's grad scaler)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help="fp32 throughout (the default on CPU)")
    parser.add_argument("--loss-scale", type=float, help="fp16: static loss scale (default: dynamic)")
    parser.add_argument("--initial-loss-scale", type=float, help="fp16 dynamic scaling: first scale (default 2^32)")
    parser.add_argument("--min-loss-scale", type=float, help="fp16 dynamic scaling: lowest scale (default 1)")
    parser.add_argument("--loss-scale-window", type=int, help="fp16: iterations without overflow before the "
                                                              "scale doubles (default 1000)")
    parser.add_argument("--hysteresis", type=int, help="fp16: overflows tolerated before the scale halves (default 2)")
    parser.add_argument("--use-distributed-optimizer", action="store_true", default=None,
                        help="shard the optimizer state (fp32 main params, Adam moments) over data-parallel ranks")
    parser.add_argument("--overlap-grad-reduce", action="store_true", default=None,
                        help="overlap the data-parallel gradient reduction with the backward pass")
    parser.add_argument("--overlap-param-gather", action="store_true", default=None,
                        help="overlap the distributed optimizer's parameter all-gather with the forward pass")
    parser.add_argument("--recompute-granularity", choices=["full", "selective"],
                        help="activation recomputation: full (whole layers) or selective (core attention)")
    parser.add_argument("--recompute-method", choices=["uniform", "block"],
                        help="full recompute: uniform (every chunk of --recompute-num-layers layers) or block "
                             "(the first --recompute-num-layers layers of each pipeline stage)")
    parser.add_argument("--recompute-num-layers", type=int)
    parser.add_argument("--sequence-parallel", action="store_true", default=None,
                        help="megatron sequence parallelism (TP > 1, --transformer-impl transformer_engine)")
    parser.add_argument("--transformer-impl", choices=["local", "transformer_engine"],
                        help="layer spec: megatron's torch layers (local) or Transformer Engine's (GPU)")
    parser.add_argument("--attention-backend", choices=["flex", "dense"],
                        help="block-causal attention kernel: flex (fused FlexAttention, GPU) or dense (SDPA + mask)")
    parser.add_argument("--peak-tflops", type=float,
                        help="dense bf16 peak of one GPU for MFU (default: from the GPU's name)")
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--seq-length", type=int, help="checked against the layout (N - L); derived if omitted")
    parser.add_argument("--max-position-embeddings", type=int,
                        help="rows of the learned position tables (default: the layout's sequence length)")
    parser.add_argument("--train-iters", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--min-lr", type=float)
    parser.add_argument("--clip-grad", type=float, help="gradient clipping by global L2 norm")
    parser.add_argument("--lr-warmup-iters", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--pkeep", type=float, help="keep probability of input video tokens (NBP release option)")
    parser.add_argument("--p-drop-cond", type=float,
                        help="probability of replacing a sample's condition by the learned null condition "
                             "(classifier-free guidance; needs model.null_condition)")
    parser.add_argument("--tokenizer-sha256", help="sha256 of the tokenizer file the shards must have been made with "
                                                   "(checked against manifest.json before training)")
    parser.add_argument("--hidden-dropout", type=float)
    parser.add_argument("--attention-dropout", type=float)
    parser.add_argument("--data", help="directory of token shards with manifest.json")
    parser.add_argument("--save", help="checkpoint directory to write")
    parser.add_argument("--load", help="checkpoint directory to resume from")
    parser.add_argument("--no-load-optim", action="store_true", default=None,
                        help="with --load: restore the weights (the fp32 main copy of a bf16/fp16 checkpoint where "
                             "saved), iteration and data position, not the optimizer and LR schedule (needed to "
                             "change between fp32 and bf16/fp16)")
    parser.add_argument("--no-load-rng", action="store_true", default=None,
                        help="with --load: do not restore the RNG states (e.g. after changing the TP / PP layout)")
    parser.add_argument("--save-interval", type=int)
    parser.add_argument("--exit-interval", type=int, help="save (if --save) and exit after this iteration")
    parser.add_argument("--log-interval", type=int)
    parser.add_argument("--tensorboard-dir")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print the parameter count and exit (no weights, no process group)")
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, flag) for flag, key in _OVERRIDES.items()}
    cfg = NBPConfig.from_yaml(args.config, overrides)
    if args.seq_length is not None and args.seq_length != cfg.model.seq_length:
        parser.error(f"--seq-length {args.seq_length} does not match the layout: latent "
                     f"{cfg.model.latent_shape} minus one block of {cfg.model.block_size} = {cfg.model.seq_length}")
    cfg.dry_run = args.dry_run
    return cfg


def dry_run(cfg) -> None:
    """Validate and print the model's size without allocating anything."""
    from megatron_nbp.model.params import count_parameters, format_count

    p = cfg.parallel
    cfg.validate(int(os.environ.get("WORLD_SIZE", p.tensor_model_parallel_size * p.pipeline_model_parallel_size)))
    c = count_parameters(cfg.model)
    m = cfg.model
    print(f"> model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
          f"ffn {m.ffn_hidden_size}, layout {m.layout}, seq {m.seq_length}, vocab {m.total_vocab_size} "
          f"(video {m.vocab_size} + special/condition {m.video_token_offset}; padded "
          f"{m.padded_vocab_size})")
    print(f"> parameters: transformer {format_count(c.transformer)} ({c.transformer:,}) | "
          f"embeddings {format_count(c.word_embeddings + c.position_embeddings)} | "
          f"output layer {format_count(c.output_layer)} | total {format_count(c.total)} ({c.total:,})")
    if cfg.train.backend == "deepspeed":
        world = int(os.environ.get("WORLD_SIZE", p.tensor_model_parallel_size))
        dp = world // p.tensor_model_parallel_size
        print(f"> backend: DeepSpeed ZeRO-{cfg.deepspeed.stage} (optimizer offload: {cfg.deepspeed.offload}) | "
              f"TP={p.tensor_model_parallel_size} DP={dp} | global batch {cfg.train.global_batch_size} = micro "
              f"{cfg.train.micro_batch_size} x DP {dp} x accumulation "
              f"{cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)}")


def main(argv=None) -> None:
    from megatron_nbp.config import ConfigError

    cfg = parse_args(argv)
    if cfg.dry_run:
        try:
            dry_run(cfg)
        except ConfigError as err:  # a refused config is a message, not a traceback
            sys.exit(f"pretrain_nbp.py: {err}")
        return
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
