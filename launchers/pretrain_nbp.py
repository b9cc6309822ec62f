#!/usr/bin/env python
"""`python launchers/pretrain_nbp.py ...` / `torchrun ... launchers/pretrain_nbp.py ...`: the same job as the installed
console script; the code and its --help live in `megatron_nbp.cli.pretrain`."""

from megatron_nbp.cli.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns None (exit 0) or an exit status
