#!/usr/bin/env python
"""`python launchers/convert_checkpoint.py ...` / `torchrun ... launchers/convert_checkpoint.py ...`: the same job as the installed
console script; the code and its --help live in `megatron_nbp.cli.convert`."""

from megatron_nbp.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns None (exit 0) or an exit status
