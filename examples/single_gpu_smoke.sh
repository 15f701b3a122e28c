#!/usr/bin/env bash
# Single-GPU smoke test of the whole training path: a small BAM model (4 attention experts,
# 4 FFN experts, parallel blocks) on mock data, with evaluation and a checkpoint, then a resume.
# Runs on the CPU too (slowly) when there is no GPU.
#   bash examples/single_gpu_smoke.sh [extra pretrain_bam.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
OUT=${OUT_DIR:-runs/single_gpu_smoke}
export WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(
  --num-layers 4 --hidden-size 512 --num-attention-heads 8 --ffn-hidden-size 1408
  --seq-length 512 --max-position-embeddings 512 --swiglu --normalization RMSNorm
  --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
  --hidden-dropout 0 --attention-dropout 0
  --bam-attn-experts 4 --num-experts 4 --moe-router-topk 1 --moe-router-pre-softmax
  --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 --moe-token-dispatcher-type alltoall
  --micro-batch-size 4 --global-batch-size 8 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 10
  --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
  --log-interval 10 --eval-interval 50 --eval-iters 5
  --save "$OUT/ckpt" --save-interval 50
  --wandb-project bam-smoke --wandb-exp-name single-gpu --wandb-save-dir "$OUT"
)
"$PY" pretrain_bam.py "${COMMON[@]}" --train-iters 50 "$@"
# Resume from the checkpoint and train 20 more steps.
"$PY" pretrain_bam.py "${COMMON[@]}" --train-iters 70 --load "$OUT/ckpt" "$@"
