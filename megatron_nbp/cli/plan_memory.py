"""Per-GPU memory of an NBP training run under a parallel plan (nothing allocated; formulas in
megatron_nbp/memory_plan.py).

One parallel plan, every pipeline stage, with and without full activation recomputation::

    python launchers/plan_memory.py --config configs/model/nbp_xl.yaml --config configs/data/k600.yaml \
        --tp 1 --pp 1 --dp 8 --zero-stage 1 --micro-batch-size 4 --global-batch-size 256

Every parallel plan of a number of GPUs (TP x PP x DP = --gpus, each ZeRO stage; --tp/--pp/--zero-stage
restrict the sweep to the values given) and which fit the GPU memory::

    python launchers/plan_memory.py --config configs/model/nbp_7b.yaml --config configs/data/k600.yaml \
        --sweep --gpus 8 --micro-batch-size 4 --global-batch-size 256 --gpu-memory-gib 80
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace


from megatron_nbp.config import ConfigError, NBPConfig
from megatron_nbp.memory_plan import GIB, MemoryPlan, ParallelPlan, gib, plan_memory, sweep
from megatron_nbp.model.params import count_parameters, format_count


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="YAML config(s), layered (model, data)")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, nargs="+")
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, nargs="+")
    p.add_argument("--dp", type=int, help="data-parallel size (default: --gpus / (TP x PP))")
    p.add_argument("--gpus", type=int, help="total GPUs (required with --sweep)")
    p.add_argument("--zero-stage", type=int, nargs="+", help="0 (DDP), 1 (optimizer), 2 (+ grads), 3 (+ params)")
    p.add_argument("--micro-batch-size", type=int, help="default: the config's train.micro_batch_size")
    p.add_argument("--global-batch-size", type=int, help="default: the config's train.global_batch_size")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="as the trainer's flag; the tables add a full-recompute column either way")
    p.add_argument("--recompute-method", choices=["uniform", "block"])
    p.add_argument("--recompute-num-layers", type=int)
    p.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallelism (TE spec)")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"])
    p.add_argument("--attention-backend", choices=["flex", "dense"])
    p.add_argument("--grad-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="gradient buffer dtype under bf16 (fp32: megatron main grads; bf16: DeepSpeed-style)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="kept free for CUDA context, NCCL / communication buffers, fragmentation (default 4)")
    p.add_argument("--sweep", action="store_true", help="table over TP / PP / ZeRO stage for --gpus GPUs")
    a = p.parse_args(argv)
    if a.sweep and not a.gpus:
        p.error("--sweep needs --gpus")
    if not a.sweep:
        for name in ("tp", "pp", "zero_stage"):
            if getattr(a, name) and len(getattr(a, name)) > 1:
                p.error(f"--{name.replace('_', '-')} takes several values only with --sweep")
    return a


def header(cfg: NBPConfig, a: argparse.Namespace, mbs: int, gbs: int) -> str:
    m, c = cfg.model, count_parameters(cfg.model)
    return (f"> model {' + '.join(a.config)}: {m.num_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_attention_heads} heads, ffn {m.ffn_hidden_size} ({m.activation}), seq {m.seq_length}, "
            f"padded vocab {m.padded_vocab_size}, attention {m.attention_backend}, {format_count(c.total)} "
            f"parameters\n> micro-batch {mbs}, global batch {gbs}, {a.precision}"
            f"{' (grads ' + a.grad_dtype + ')' if a.precision == 'bf16' else ''}; "
            f"GPU {a.gpu_memory_gib:g} GiB, reserve {a.reserve_gib:g} GiB")


def table(rows: list[list[str]]) -> str:
    """Markdown table (first row = header)."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def fit_mark(plan: MemoryPlan, gpu: int, reserve: int) -> str:
    return "yes" if plan.fits(gpu, reserve) else "no"


def show_plan(cfg, a, parallel: ParallelPlan, gpu: int, reserve: int) -> None:
    plain = plan_memory(cfg, parallel)
    full = plan_memory(cfg, replace(parallel, recompute="full"))
    print(f"> parallel plan TP={parallel.tp} PP={parallel.pp} DP={parallel.dp} ZeRO-{parallel.zero_stage}: "
          f"{parallel.num_microbatches} micro-batches per iteration and DP rank")
    rows = [["stage", "params/GPU", "weights GiB", "grads GiB", "optimizer GiB", "activations GiB",
             "total GiB", "activations GiB (recompute)", "total GiB (recompute)"]]
    for st, sf in zip(plain.stages, full.stages):
        rows.append([str(st.stage), format_count(st.parameters), f"{gib(st.weights):.2f}", f"{gib(st.gradients):.2f}",
                     f"{gib(st.optimizer):.2f}", f"{gib(st.activations):.2f}", f"{gib(st.total):.2f}",
                     f"{gib(sf.activations):.2f}", f"{gib(sf.total):.2f}"])
    print(table(rows))
    print(f"> peak per GPU: {gib(plain.peak.total):.2f} GiB with recompute {parallel.recompute} (fits: "
          f"{fit_mark(plain, gpu, reserve)}), {gib(full.peak.total):.2f} GiB with full recompute "
          f"(fits: {fit_mark(full, gpu, reserve)})")


def show_sweep(cfg, a, mbs: int, gbs: int, gpu: int, reserve: int, options: dict) -> None:
    plans, skipped = sweep(cfg, a.gpus, mbs, gbs, a.precision, a.grad_dtype, a.tp, a.pp, a.zero_stage, **options)
    rows = [["TP", "PP", "DP", "ZeRO", "params/GPU", "weights", "grads", "optimizer", "activations",
             "total", "fits", "activations (recompute)", "total (recompute)", "fits (recompute)"]]
    for plain, full in plans:
        par, p, f = plain.parallel, plain.peak, full.peak
        rows.append([str(par.tp), str(par.pp), str(par.dp), str(par.zero_stage), format_count(p.parameters),
                     f"{gib(p.weights):.2f}", f"{gib(p.gradients):.2f}", f"{gib(p.optimizer):.2f}",
                     f"{gib(p.activations):.2f}", f"{gib(p.total):.2f}", fit_mark(plain, gpu, reserve),
                     f"{gib(f.activations):.2f}", f"{gib(f.total):.2f}", fit_mark(full, gpu, reserve)])
    print(f"> {a.gpus} GPUs; GiB per GPU on the most loaded pipeline stage")
    print(table(rows))
    if skipped:
        par, why = skipped[0]
        print(f"> skipped {len(skipped)} invalid parallel plans, e.g. TP={par.tp} PP={par.pp} ZeRO-{par.zero_stage}: "
              f"{why}")


def main(argv=None) -> None:
    a = parse_args(argv)
    try:
        cfg = NBPConfig.from_yaml(a.config, {"model.transformer_impl": a.transformer_impl,
                                             "model.attention_backend": a.attention_backend})
    except (ConfigError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    options = dict(recompute=a.recompute_granularity or "none", recompute_method=a.recompute_method,
                   recompute_num_layers=a.recompute_num_layers, sequence_parallel=a.sequence_parallel)
    mbs = a.micro_batch_size or cfg.train.micro_batch_size
    gbs = a.global_batch_size or cfg.train.global_batch_size
    gpu, reserve = int(a.gpu_memory_gib * GIB), int(a.reserve_gib * GIB)
    print(header(cfg, a, mbs, gbs))
    try:
        if a.sweep:
            show_sweep(cfg, a, mbs, gbs, gpu, reserve, options)
            return
        tp = (a.tp or [cfg.parallel.tensor_model_parallel_size])[0]
        pp = (a.pp or [cfg.parallel.pipeline_model_parallel_size])[0]
        dp = a.dp or (a.gpus // (tp * pp) if a.gpus else 1)
        if a.gpus and a.gpus != tp * pp * dp:
            raise ConfigError(f"--gpus {a.gpus} != TP x PP x DP = {tp} x {pp} x {dp}")
        zero = (a.zero_stage or [0])[0]
        show_plan(cfg, a, ParallelPlan(tp, pp, dp, zero, mbs, gbs, a.precision, a.grad_dtype, **options), gpu,
                  reserve)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
