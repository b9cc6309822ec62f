"""Tokenize a folder of videos (or images) into WebDataset token shards (entry point; logic in data_prep.tokenize_job).

Usage::

    torchrun --nproc-per-node 2 launchers/tokenize_videos.py --input DIR --output DIR --tokenizer CKPT
    python launchers/tokenize_videos.py --input DIR --output DIR --tokenizer CKPT   # one process
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        launchers/tokenize_videos.py ...                                            # many nodes
    python launchers/tokenize_videos.py --media image --num-frames 1 ...           # images, T = 1

Rerunning the same command after a crash (any rank killed at any point) finishes only the missing
shards; every clip is written exactly once. Files that gave no clip are listed with the reason in
OUTPUT/failures.jsonl (and in manifest.json).
"""

from __future__ import annotations

import argparse


from data_prep.tokenize_job import TokenizeConfig, run_tokenize_job
from nbp_common.config import ConfigError, add_config_arguments, config_overrides

# Flags of the launcher itself, not TokenizeConfig fields: none (every flag is derived from a field).
LAUNCHER_FLAGS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TokenizeConfig` field (nbp_common.config.add_config_arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, TokenizeConfig, show_defaults=True)
    return parser


def parse_args(argv: list[str] | None = None) -> TokenizeConfig:
    """Parse command-line flags into a :class:`TokenizeConfig` (exits with a usage message on errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = TokenizeConfig.from_dict({}, config_overrides(args, TokenizeConfig))
        cfg.validate()
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse flags and run the job on this rank."""
    run_tokenize_job(parse_args(argv))


if __name__ == "__main__":
    main()
