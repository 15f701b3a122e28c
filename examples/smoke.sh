#!/usr/bin/env bash
# Smoke run of the main program: set up (once), then train a tiny BAM model (parallel blocks,
# 2 soft-routed attention experts + 2 FFN experts) on synthetic data for 60 steps with
# validation and a checkpoint, then resume it for 20 more. CPU when there is no GPU (~1 min).
#   bash examples/smoke.sh [extra pretrain_bam.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
OUT=${OUT_DIR:-runs/smoke}
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ARGS=(
  --num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 64 --swiglu
  --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
  --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
  --bam-attn-experts 2 --num-experts 2 --moe-router-topk 1 --moe-router-pre-softmax
  --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001
  --micro-batch-size 8 --global-batch-size 16 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 5
  --lr-decay-style cosine --mock-data --tokenizer-type NullTokenizer --vocab-size 256
  --log-interval 10 --eval-interval 30 --eval-iters 2 --save "$OUT/ckpt" --save-interval 30
)
rm -rf "$OUT"
"$PY" pretrain_bam.py "${ARGS[@]}" --train-iters 60 "$@"
echo "[smoke] resuming from $OUT/ckpt"
"$PY" pretrain_bam.py "${ARGS[@]}" --train-iters 80 --load "$OUT/ckpt" "$@"
