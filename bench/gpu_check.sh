#!/usr/bin/env bash
# Every GPU-only check of the project in one run (target: under 8 minutes on one H100 / H200, no network):
#   1. the tests marked gpu (compiled FlexAttention, the project's attention module, TE spec if installed, CUDA-graph
#      decoding, the tokenizer on CUDA);
#   2. training throughput at nbp-xl, K600 layout (seq 1264): megatron bf16 at micro-batch 4, 8 and 16
#      (the largest that fits shows as the last "ok" row), megatron fp32 and DeepSpeed ZeRO-1 / ZeRO-2
#      bf16 at micro-batch 4;
#   3. nbp-3b under DeepSpeed ZeRO-3 bf16, 5 iterations, with the memory planner's prediction beside it;
#   4. block-causal attention kernels at the nbp-xl shape (CUDA events, after one compile);
#   5. generation, NBP vs NTP at nbp-xl bf16, batch 1 and 8: per-step time in the eager and the CUDA-graph
#      decode modes (graph vs eager speed-up) and the sampler's share of a step;
#   6. tokenizer throughput at the 370M layout (configs/tokenizer/magvit2.yaml), 17x128x128: decode alone (0 / 8
#      DataLoader workers), encode alone (fp32 / bf16, batch 32), the tokenization job (bf16, 8 workers) and
#      training steps (bf16, batch 2), bench/tokenize_throughput.py (cut at 90 s; rows print as they finish).
# Without CUDA it runs the same steps at tiny sizes (a smoke test of the script itself, ~5 min on 2 cores).
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]      (default OUT_DIR: runs/gpu_check; the log is OUT_DIR/gpu_check.log)
# The Python packages it needs beyond torch: requirements.txt (megatron-core, deepspeed, webdataset, ...).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
# a checkout where `pip install -e .` has not run (a GPU box without the project installed): the packages
# are importable from the repository root, for the launchers and the torchrun workers alike
if ! $PY -c "import megatron_nbp, data_prep, nbp_common" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
START=$(date +%s)
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "" | tee -a "$LOG"
  echo "## $name" | tee -a "$LOG"
  echo "\$ $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^\s*$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "(exit $rc, $(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
}

if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  GPU=1
  XL=(--config configs/model/nbp_xl.yaml --config configs/data/k600.yaml)
  B3=(--config configs/model/nbp_3b.yaml --config configs/data/k600.yaml)
  SIZES=(4 8 16); ITERS=(--iters 5 --warmup 2); ATTN=(--paper-shape); GEN=(--config configs/model/nbp_xl.yaml --dtype bf16)
  TOK=(--num-videos 16 --batch-sizes 32 --encode-batches 3 --train-steps 2 --train-precisions bf16)
else
  GPU=0
  XL=(--config configs/tiny_frame_prediction.yaml)
  B3=(--config configs/tiny_frame_prediction.yaml)
  SIZES=(2 4); ITERS=(--iters 2 --warmup 1); ATTN=(); GEN=(--dtype fp32)
  TOK=(--num-videos 4 --video-frames 40 --resolution 32 --batch-sizes 8 --encode-batches 1 --job-workers 2
       --train-steps 1)
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

step "tests marked gpu" 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests

step "training throughput, megatron bf16 (fused flex attention), largest micro-batch that fits" 240 \
  $PY bench/train_throughput.py "${XL[@]}" --modes megatron-bf16 --micro-batch-sizes "${SIZES[@]}" "${ITERS[@]}"

step "training throughput, megatron fp32 and DeepSpeed ZeRO-1 / ZeRO-2 bf16, micro-batch ${SIZES[0]}" 240 \
  $PY bench/train_throughput.py "${XL[@]}" --modes megatron-fp32 zero1-bf16 zero2-bf16 \
  --micro-batch-sizes "${SIZES[0]}" "${ITERS[@]}"

step "nbp-3b, DeepSpeed ZeRO-3 bf16, 5 iterations" 240 \
  $PY bench/train_throughput.py "${B3[@]}" --modes zero3-bf16 --micro-batch-sizes 1 --iters 3 --warmup 2
step "memory plan of that parallel plan (ZeRO-3, DP 1, micro-batch 1, bf16 gradients as DeepSpeed keeps them)" 60 \
  $PY launchers/plan_memory.py "${B3[@]}" --zero-stage 3 --dp 1 --micro-batch-size 1 --global-batch-size 1 \
  --grad-dtype bf16 --gpu-memory-gib 139

step "block-causal attention kernels" 120 $PY bench/attention.py "${ATTN[@]}" --repeats 20

for batch in 1 8; do
  step "generation, NBP vs NTP, batch $batch (eager and CUDA-graph decoding)" 240 \
    $PY bench/nbp_vs_ntp.py "${GEN[@]}" --batch-size "$batch" --repeats 1
done

step "tokenizer throughput: decode, encode, tokenization job, training steps (370M layout, 17x128x128)" 90 \
  $PY bench/tokenize_throughput.py "${TOK[@]}"

echo "" | tee -a "$LOG"
echo "# done in $(( $(date +%s) - START )) s, $FAILED step(s) failed (GPU: $GPU); log: $LOG" | tee -a "$LOG"
exit "$FAILED"
