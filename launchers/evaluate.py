#!/usr/bin/env python
"""`python launchers/evaluate.py ...` / `torchrun ... launchers/evaluate.py ...`: the same job as the installed
console script; the code and its --help live in `megatron_nbp.cli.evaluate`."""

from megatron_nbp.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns None (exit 0) or an exit status
