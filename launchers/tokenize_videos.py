#!/usr/bin/env python
"""`python launchers/tokenize_videos.py ...` / `torchrun ... launchers/tokenize_videos.py ...`: the same job as the installed
console script; the code and its --help live in `data_prep.cli.tokenize_videos`."""

from data_prep.cli.tokenize_videos import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns None (exit 0) or an exit status
