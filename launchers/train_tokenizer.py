#!/usr/bin/env python
"""`python launchers/train_tokenizer.py ...` / `torchrun ... launchers/train_tokenizer.py ...`: the same job as the installed
console script; the code and its --help live in `data_prep.cli.train_tokenizer`."""

from data_prep.cli.train_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns the exit status
