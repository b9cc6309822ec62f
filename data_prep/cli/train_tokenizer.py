"""Train the video tokenizer (reconstruction, optional GAN/LeCam/perceptual, EMA). Single process or torchrun (DDP).

Example::

    python launchers/train_tokenizer.py --config configs/tokenizer/tiny.yaml --data media/ \
        --output runs/tokenizer.safetensors --resolution 64 --num-frames 17 --train-steps 400 --max-minutes 4
    torchrun --nproc-per-node 2 launchers/train_tokenizer.py ...   # same flags

Every field of :class:`data_prep.tokenizer.config.TrainOptions` is a flag (``--lr``, ``--num-frames``, ...).
Defaults for the training flags come from the ``train:`` section of the YAML config; flags override them.

Crash and resume: ``--save DIR --save-interval N`` publishes ``DIR/iter_XXXXXXX/`` atomically (staged under a
temporary name, then renamed; the latest file is replaced atomically), so after a crash or SIGKILL rerunning
the same command with ``--load DIR`` continues from the last published step (bitwise on CPU). A damaged
checkpoint or one written for other settings (model config, FSQ levels, latent shape, discriminator, EMA,
world size) is refused before training: exit status 2 and the reason on stderr. Under a scheduler,
``--exit-signal-handler`` turns SIGTERM / SIGUSR1 into "finish the step, save into --save, exit 0" so a
requeued job resumes with ``--load`` (launchers/slurm/train_tokenizer.sbatch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from data_prep.tokenizer.checkpoint import TrainingCheckpointError
from data_prep.tokenizer.train import TrainOptions, check_options, train_tokenizer
from nbp_common.config import ConfigError, add_config_arguments, config_overrides

# Flags of the launcher itself, not TrainOptions fields: none (every flag is derived from a field).
LAUNCHER_FLAGS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainOptions` field (nbp_common.config.add_config_arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, TrainOptions)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    """Parse command-line flags into :class:`TrainOptions` (YAML ``train:`` values as defaults; flags given
    override them). A bad value exits with a usage message naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = config_overrides(args, TrainOptions)
    try:
        values = TrainOptions.yaml_defaults(given["config"])
        values.update(given)
        return TrainOptions.from_dict(values)
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Train with the parsed flags; print the result JSON (rank 0).

    Returns:
        0 on success (also after ``--exit-signal-handler`` saved and stopped the run), 2 for refused
        options (:func:`~data_prep.tokenizer.train.check_options`: a global batch that does not split into
        the ranks' micro-batches, ``--exit-signal-handler`` without ``--save``) or when ``--load`` names a
        damaged checkpoint or one written for other settings (the reason, naming the checkpoint and each
        differing value, goes to stderr; nothing is trained).
    """
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    opts = parse_args(argv)
    try:
        check_options(opts, int(os.environ.get("WORLD_SIZE", "1")))  # before any work
    except ValueError as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = train_tokenizer(opts)
    except TrainingCheckpointError as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
