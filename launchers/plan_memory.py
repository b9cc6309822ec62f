#!/usr/bin/env python
"""`python launchers/plan_memory.py ...` / `torchrun ... launchers/plan_memory.py ...`: the same job as the installed
console script; the code and its --help live in `megatron_nbp.cli.plan_memory`."""

from megatron_nbp.cli.plan_memory import main

if __name__ == "__main__":
    raise SystemExit(main())  # main returns None (exit 0) or an exit status
