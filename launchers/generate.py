#!/usr/bin/env python
"""`python launchers/generate.py ...` / `torchrun ... launchers/generate.py ...`: the same job as the installed
console script; the code and its --help live in `megatron_nbp.cli.generate`."""

from megatron_nbp.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns None (exit 0) or an exit status
