"""Train the video tokenizer (reconstruction, optional GAN/LeCam/perceptual, EMA). Single process or torchrun (DDP).

Example::

    python launchers/train_tokenizer.py --config configs/tokenizer/tiny.yaml --data media/ \
        --output runs/tokenizer.safetensors --resolution 64 --num-frames 17 --train-steps 400 --max-minutes 4
    torchrun --nproc-per-node 2 launchers/train_tokenizer.py ...   # same flags

Defaults for the training flags come from the ``train:`` section of the YAML config; flags override them.

Crash and resume: ``--save DIR --save-interval N`` publishes ``DIR/iter_XXXXXXX/`` atomically (staged under a
temporary name, then renamed; the latest file is replaced atomically), so after a crash or SIGKILL rerunning
the same command with ``--load DIR`` continues from the last published step (bitwise on CPU). A damaged
checkpoint or one written for other settings (model config, FSQ levels, latent shape, discriminator, EMA,
world size) is refused before training: exit status 2 and the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from data_prep.tokenizer.checkpoint import TrainingCheckpointError
from data_prep.tokenizer.train import TrainOptions, train_tokenizer


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    """Parse command-line flags into :class:`TrainOptions` (YAML ``train:`` values as defaults)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="tokenizer YAML (model: and optional train: sections)")
    parser.add_argument("--data", required=True, help="directory of videos (searched recursively)")
    parser.add_argument("--output", required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--resolution", type=int, help="square crop size in pixels (multiple of 8)")
    parser.add_argument("--num-frames", type=int, help="frames per clip, 1 + 4n (e.g. 17)")
    parser.add_argument("--frame-stride", type=int, help="step between sampled frames")
    parser.add_argument("--train-steps", "--train-iters", dest="train_steps", type=int, help="optimizer steps")
    parser.add_argument("--max-minutes", type=float, help="stop after this wall time (minutes)")
    parser.add_argument("--batch-size", type=int, help="clips per step per rank")
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    parser.add_argument("--image-every", type=int, help="every k-th step trains on single frames (0: never)")
    parser.add_argument("--image-batch-size", type=int, help="frames per image step per rank")
    parser.add_argument("--seed", type=int, help="random seed (model init and clip sampling)")
    parser.add_argument("--log-interval", type=int, help="log every N steps")
    parser.add_argument("--tensorboard-dir", help="write TensorBoard scalars here (rank 0)")
    parser.add_argument("--eval-clips", type=int, help="non-overlapping clips per rank for the final PSNR")
    parser.add_argument("--holdout-fraction", type=float,
                        help="tail fraction of every video held back from training, used for the final PSNR")
    gan = parser.add_argument_group("GAN (off unless --disc-weight > 0)")
    gan.add_argument("--disc-weight", type=float, help="weight of the generator's adversarial term (0: no GAN)")
    gan.add_argument("--disc-start", type=int, help="step at which the discriminator and the GAN term start")
    gan.add_argument("--gan-loss", choices=["hinge", "non_saturating"], help="GAN loss")
    gan.add_argument("--disc-lr", type=float, help="discriminator peak learning rate (default: --lr)")
    gan.add_argument("--disc-channels", type=int, help="width of the 3D PatchGAN's first layer")
    gan.add_argument("--disc-layers", type=int, help="stride-2 layers of the 3D PatchGAN")
    gan.add_argument("--no-adaptive-weight", dest="adaptive_weight", action="store_const", const=False,
                     help="use disc_weight as is instead of VQGAN's adaptive gradient-norm ratio")
    gan.add_argument("--lecam-weight", type=float, help="LeCam regularization weight (0: off)")
    gan.add_argument("--lecam-decay", type=float, help="decay of LeCam's EMA anchors")
    parser.add_argument("--perceptual-weight", type=float, help="perceptual loss weight (needs --perceptual-network)")
    parser.add_argument("--perceptual-network", help="TorchScript feature network you supply (nothing is downloaded)")
    parser.add_argument("--ema-decay", type=float, help="EMA decay of the tokenizer weights (0: off)")
    parser.add_argument("--no-export-ema", dest="export_ema", action="store_const", const=False,
                        help="export the raw weights even when an EMA is kept")
    parser.add_argument("--save", help="directory for resumable training checkpoints (iter_XXXXXXX/)")
    parser.add_argument("--save-interval", type=int, help="save the training state every N steps")
    parser.add_argument("--load", help="resume from the latest checkpoint in this directory")
    parser.add_argument("--exit-interval", type=int, help="stop after N steps in this run (then save)")
    parser.add_argument("--image-log-interval", type=int, help="TensorBoard original/reconstruction images every N steps")
    args = parser.parse_args(argv)
    values = TrainOptions.yaml_defaults(args.config)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return TrainOptions(**values)


def main(argv: list[str] | None = None) -> int:
    """Train with the parsed flags; print the result JSON (rank 0).

    Returns:
        0 on success, 2 when ``--load`` names a damaged checkpoint or one written for other settings (the
        reason, naming the checkpoint and each differing value, goes to stderr; nothing is trained).
    """
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        result = train_tokenizer(parse_args(argv))
    except TrainingCheckpointError as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
