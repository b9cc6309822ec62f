#!/usr/bin/env python
"""Measured vs planned memory of one training step on CPU (fp32, one process, TP = PP = DP = 1); the
measurement is megatron_nbp.memory_measure, the plan megatron_nbp.memory_plan.

    python bench/memory_check.py --config configs/tiny_frame_prediction.yaml --micro-batch-size 2
    python bench/memory_check.py --config tests/configs/tiny_memory.yaml --micro-batch-size 4 --set model.activation=swiglu
"""

from __future__ import annotations

import argparse

from megatron_nbp.memory_measure import estimate, measure, parse_set


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="YAML config(s), layered")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. model.activation=swiglu (repeatable)")
    a = p.parse_args(argv)
    overrides = parse_set(a.set)
    got = measure(a.config, a.micro_batch_size, overrides)
    est = estimate(a.config, a.micro_batch_size, overrides)
    mib = 2 ** 20
    print(f"config {' + '.join(a.config + a.set)} | micro-batch {a.micro_batch_size} | fp32, TP=PP=DP=1")
    print(f"measured peak RSS delta {got['measured'] / mib:.1f} MiB | estimated {est / mib:.1f} MiB | "
          f"estimate / measured {est / got['measured']:.3f}")


if __name__ == "__main__":
    main()
