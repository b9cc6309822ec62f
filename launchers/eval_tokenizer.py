#!/usr/bin/env python
"""`python launchers/eval_tokenizer.py ...` / `torchrun ... launchers/eval_tokenizer.py ...`: the same job as the installed
console script; the code and its --help live in `megatron_nbp.cli.eval_tokenizer`."""

from megatron_nbp.cli.eval_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns the exit status (2: refused settings)
