#!/usr/bin/env bash
# Every GPU-only check of the project in one run, most important first, within a time budget (no network):
#   tests      the tests marked gpu (compiled FlexAttention, the project's attention module, training on the GPU
#              in bf16 vs fp32, profiling a training window, TE spec if installed, CUDA-graph decoding, the
#              tokenizer on CUDA);
#   tokenizer_variants  bf16 encoding at the 370M layout plain and with the job's opt-in settings
#              (torch.compile, with and without channels-last 3D), each with its token agreement, TFLOP/s
#              and a torch.profiler summary of one batch (GPU busy fraction, top kernels);
#   tokenizer_job  the job's shard loop in-process on clips in host memory (no decoding), profiled after
#              its first shard, and the tokenization job (bf16, 8 decode workers, 384 clips), plain and
#              with --compile (rates after the first batch; the time each waited for the device);
#   tokenizer_recipe  tokenizer training as the recipes run it: bf16, recompute full, micro-batches of 8
#              with accumulated gradients (batch 16), at the 336M and the official 370M layout: steps/s and
#              peak memory (for the recipes' "fits 80 GB" estimate; without a perceptual network, whose
#              activations the recipes add);
#   profile    where the time of a training iteration goes: megatron bf16 and DeepSpeed ZeRO-1 bf16 at nbp-xl,
#              micro-batch 4, two iterations each under torch.profiler (the trainer's --profile
#              --use-pytorch-profiler; traces in OUT_DIR/profile);
#   generation NBP vs NTP at nbp-xl bf16, batch 1 and 8: per-step time, eager and CUDA-graph decoding;
#   attention  block-causal attention kernels at the nbp-xl shape (CUDA events, after one compile);
#   train_more megatron fp32 and DeepSpeed ZeRO-2 bf16 at micro-batch 4;
#   zero3      nbp-3b under DeepSpeed ZeRO-3 bf16 with the memory planner's prediction beside it;
#   train      training throughput at nbp-xl, K600 layout (seq 1264), micro-batch 4: megatron bf16 and DeepSpeed
#              ZeRO-1 bf16 (the first step of both backends on the GPU);
#   tokenizer  tokenizer throughput at the 370M layout (configs/tokenizer/magvit2.yaml), 17x128x128: decode
#              alone (0 / 8 DataLoader workers), encode alone (fp32 / bf16, batch 32), the tokenization job
#              (bf16, 8 workers) and training steps (bf16, batch 2, with and without recomputation, peak memory),
#              bench/tokenize_throughput.py;
#   real       with REAL_VIDEOS=DIR and REAL_TOKENIZER=FILE: bf16 vs fp32 token agreement of a trained tokenizer
#              on real footage, its encode rate, and eval_tokenizer.py's PSNR from bf16 and fp32 ids
#              (skipped without them);
#   train_mb   megatron bf16 at micro-batch 8 and 16 (the largest that fits shows as the last "ok" row).
# The order is the priority: what has never been measured on a GPU first, after the tests (train, tokenizer,
# real, train_mb and the encode variants were measured on an H200 on 2026-11-30, docs/benchmarks.md; the job
# since its id read-back waits per batch on a CUDA event, the loop rows and tokenizer_recipe not yet).
# DEADLINE_S (default 480) bounds the whole run: each step gets at most what is left, and steps that would
# start with under 20 s left are listed as skipped. STEPS="train tokenizer" runs only those steps.
# Without CUDA it runs the same steps at tiny sizes (a smoke test of the script itself, ~5 min on 2 cores).
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]      (default OUT_DIR: runs/gpu_check; the log is OUT_DIR/gpu_check.log)
# The Python packages it needs beyond torch: requirements.txt (megatron-core, deepspeed, webdataset, PyAV, ...).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
# the packages from this checkout, for the launchers, the benchmarks and the torchrun workers alike (also
# on a GPU box where `pip install -e .` has not run; `python -c` alone would find them from the cwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=0

DEADLINE_S=${DEADLINE_S:-480}
STEPS=${STEPS:-tests tokenizer_variants tokenizer_job tokenizer_recipe profile generation attention train_more zero3 train tokenizer real train_mb}
SKIPPED=()

wanted() { [[ " ${STEPS//,/ } " == *" $1 "* ]]; }

step() {  # step NAME TIMEOUT_S COMMAND...   (the timeout is cut to what is left of DEADLINE_S)
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    SKIPPED+=("$name")
    echo "" | tee -a "$LOG"; echo "## $name: skipped, ${left} s left of DEADLINE_S=$DEADLINE_S" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "" | tee -a "$LOG"
  echo "## $name (limit $limit s)" | tee -a "$LOG"
  echo "\$ $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^\s*$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "(exit $rc, $(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
}

if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  GPU=1
  XL=(--config configs/model/nbp_xl.yaml --config configs/data/k600.yaml)
  B3=(--config configs/model/nbp_3b.yaml --config configs/data/k600.yaml)
  SIZES=(4 8 16); ITERS=(--iters 5 --warmup 2); ATTN=(--paper-shape); GEN=(--config configs/model/nbp_xl.yaml --dtype bf16)
  TOK=(--num-videos 16 --batch-sizes 32 --encode-batches 3 --train-steps 2 --train-precisions bf16 --train-recompute none,full)
  TOKV=(--batch-sizes 32 --encode-batches 3)
  TOKJ=(--num-videos 96 --job-workers 8 --job-batch-size 32 --job-precisions bf16)
  TOKR=(--num-videos 8 --train-batch-size 16 --train-micro-batch-size 8 --train-steps 2); TOKRC="magvit2 magvit2_official"
else
  GPU=0
  XL=(--config configs/tiny_frame_prediction.yaml)
  B3=(--config configs/tiny_frame_prediction.yaml)
  SIZES=(2 4); ITERS=(--iters 2 --warmup 1); ATTN=(); GEN=(--dtype fp32)
  TOK=(--num-videos 4 --video-frames 40 --resolution 32 --batch-sizes 8 --encode-batches 1 --job-workers 2
       --train-steps 1 --train-recompute none,full)
  TOKV=(--resolution 32 --batch-sizes 8 --encode-batches 1)
  TOKJ=(--num-videos 4 --video-frames 40 --resolution 32 --job-workers 2 --job-batch-size 8 --job-precisions fp32)
  TOKR=(--num-videos 4 --video-frames 40 --resolution 32 --train-batch-size 4 --train-micro-batch-size 2 --train-steps 1)
  TOKRC="tiny"
fi

{
  echo "# bench/gpu_check.sh | $(date -u +%Y-%m-%dT%H:%MZ) | commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  $PY - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)"
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | GPU {gpu}")
for name in ("megatron.core", "deepspeed", "webdataset", "transformer_engine"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"{name}: not importable ({type(exc).__name__})")
PY
} 2>&1 | tee -a "$LOG"

wanted tests && step "tests marked gpu" 200 $PY -m pytest -v --tb=short -p no:cacheprovider -m gpu -rs tests

wanted tokenizer_variants && step "tokenizer encoding variants (bf16, 370M layout, 17x128x128)" 240 \
  $PY bench/tokenize_throughput.py "${TOKV[@]}" --parts encode --precisions bf16 \
  --encode-variants plain,compile,compile+channels_last \
  --profile-encode

wanted tokenizer_job && step "the job's shard loop in-process (profiled) and the tokenization job, plain and compiled" 240 \
  $PY bench/tokenize_throughput.py "${TOKJ[@]}" --parts loop,job --job-settings plain,compile --profile-loop

wanted tokenizer_recipe && step "tokenizer training as the recipes run it: micro-batches of 8, recompute full, bf16" 150 \
  bash -c 'for c in $0; do "$@" --tokenizer-config configs/tokenizer/$c.yaml || exit; done' "$TOKRC" \
  $PY bench/tokenize_throughput.py "${TOKR[@]}" --parts train --train-precisions bf16 --train-recompute full

wanted profile && step "where a training iteration's time goes: megatron and ZeRO-1 bf16, micro-batch ${SIZES[0]}, torch.profiler" 200 \
  $PY bench/train_throughput.py "${XL[@]}" --modes megatron-bf16 zero1-bf16 --micro-batch-sizes "${SIZES[0]}" --iters 3 \
  --warmup 2 --profile --workdir "$OUT/profile"

if wanted generation; then
  for batch in 1 8; do
    step "generation, NBP vs NTP, batch $batch (eager and CUDA-graph decoding)" 150 \
      $PY bench/nbp_vs_ntp.py "${GEN[@]}" --batch-size "$batch" --repeats 1
  done
fi

wanted attention && step "block-causal attention kernels" 100 $PY bench/attention.py "${ATTN[@]}" --repeats 20

wanted train_more && step "training throughput, megatron fp32 and DeepSpeed ZeRO-2 bf16, micro-batch ${SIZES[0]}" 150 \
  $PY bench/train_throughput.py "${XL[@]}" --modes megatron-fp32 zero2-bf16 --micro-batch-sizes "${SIZES[0]}" \
  "${ITERS[@]}"

if wanted zero3; then
  step "nbp-3b, DeepSpeed ZeRO-3 bf16" 150 \
    $PY bench/train_throughput.py "${B3[@]}" --modes zero3-bf16 --micro-batch-sizes 1 --iters 3 --warmup 2
  step "memory plan of that parallel plan (ZeRO-3, DP 1, micro-batch 1, bf16 gradients as DeepSpeed keeps them)" 60 \
    $PY launchers/plan_memory.py "${B3[@]}" --zero-stage 3 --dp 1 --micro-batch-size 1 --global-batch-size 1 \
    --grad-dtype bf16 --gpu-memory-gib 139
fi

wanted train && step "training throughput at micro-batch ${SIZES[0]}: megatron bf16 (fused flex attention), DeepSpeed ZeRO-1 bf16" \
  150 $PY bench/train_throughput.py "${XL[@]}" --modes megatron-bf16 zero1-bf16 --micro-batch-sizes "${SIZES[0]}" \
  "${ITERS[@]}"

wanted tokenizer && step "tokenizer throughput: decode, encode, tokenization job, training steps (370M layout, 17x128x128)" \
  100 $PY bench/tokenize_throughput.py "${TOK[@]}"

if wanted real && [ -n "${REAL_VIDEOS:-}" ] && [ -n "${REAL_TOKENIZER:-}" ]; then
  step "a trained tokenizer on real footage: bf16 vs fp32 token agreement, encode rate" 60 \
    $PY bench/tokenize_throughput.py --input "$REAL_VIDEOS" --tokenizer "$REAL_TOKENIZER" --parts encode,decode \
    --precisions fp32,bf16 --resolution "${REAL_RESOLUTION:-64}" --batch-sizes 32 --encode-batches 3 \
    --agreement-clips 64
  step "the same tokenizer's reconstructions from bf16- and fp32-encoded ids (launchers/eval_tokenizer.py)" 40 \
    $PY launchers/eval_tokenizer.py --tokenizer "$REAL_TOKENIZER" --data "$REAL_VIDEOS" \
    --resolution "${REAL_RESOLUTION:-64}" --num-frames 17 --holdout-fraction 0 --max-clips 48 --device auto \
    --encode-precision bf16 --json "$OUT/eval_tokenizer.json"
fi

wanted train_mb && step "training throughput, megatron bf16, larger micro-batches" 150 \
  $PY bench/train_throughput.py "${XL[@]}" --modes megatron-bf16 --micro-batch-sizes "${SIZES[@]:1}" "${ITERS[@]}"

echo "" | tee -a "$LOG"
echo "# done in $(( $(date +%s) - START )) s, $FAILED step(s) failed, ${#SKIPPED[@]} skipped for time" \
  "(GPU: $GPU); log: $LOG" | tee -a "$LOG"
for name in "${SKIPPED[@]}"; do echo "#   skipped: $name" | tee -a "$LOG"; done
exit "$FAILED"
