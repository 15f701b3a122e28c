#!/usr/bin/env bash
# Nexus (Gritsch et al. 2024) on the bundled corpus (data/): mix three domains with the Nexus
# router and with the linear router, then add a fourth domain's expert after mixing. CPU-sized
# by default.
#
#   1. preprocess   data/*.jsonl -> Megatron indexed datasets (bundled BPE tokenizer)
#   2. seed         a dense model on general English text + a little of every domain
#   3. branch       one expert per domain: code, legal, english (the initial mix) and math (added later)
#   4. embed        domain embeddings of the four domains under the seed (tools/domain_embeddings.py)
#   5. mix          seed + code, legal, english experts -> BAM with the seed's FFN as a shared expert
#                   and top-1 over the three domain experts, once with the Nexus router, once with
#                   the linear router (the only difference); trained on the three domains
#   6. add          the math expert into each trained MoE (tools/add_expert.py)
#   7. fine-tune    FT_ITERS steps on half math, half the old domains: the extended MoEs, and the
#                   same fine-tune of the MoEs without the new expert
#   8. evaluate     per-domain perplexity table (runs/nexus/results/nexus.md)
#
# Re-running skips finished stages (like examples/quickstart.sh).
#   bash examples/nexus.sh                        # defaults: ~6 min on a 2-core CPU
# Environment knobs: OUT (default runs/nexus), DATA, SEED_ITERS, BRANCH_ITERS, MOE_ITERS, FT_ITERS,
# HIDDEN, LAYERS, HEADS, SEQ, MBS, GBS, EVAL_ITERS, EMBED_TOKENS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${BAM_PYTHON:-$(bash scripts/setup_env.sh)}  # BAM_PYTHON: use this interpreter as it is
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

OUT=${OUT:-runs/nexus}
DATA=${DATA:-data}
: "${LAYERS:=2}" "${HIDDEN:=128}" "${HEADS:=4}" "${SEQ:=128}" "${MBS:=16}" "${GBS:=16}"
: "${SEED_ITERS:=300}" "${BRANCH_ITERS:=100}" "${MOE_ITERS:=100}" "${FT_ITERS:=50}" "${EVAL_ITERS:=4}"
: "${EMBED_TOKENS:=32768}"
DOMAINS=(code legal english math)
OLD=(code legal english)               # the initial mix: seed (shared FFN) + these experts
NEW=math                               # the expert added after mixing
TOK=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$DATA/tokenizer/tokenizer.json")
MODEL=(
  --num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
  --seq-length "$SEQ" --swiglu --normalization RMSNorm --position-embedding-type rope
  --disable-bias-linear --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
)
BIN="$OUT/data"
VALID=()
for d in "${DOMAINS[@]}"; do VALID+=("$d:$BIN/${d}_valid_text_document"); done
COMMON=("${TOK[@]}" --micro-batch-size "$MBS" --global-batch-size "$GBS" --weight-decay 0.1
        --clip-grad 1.0 --log-interval 25 --eval-iters "$EVAL_ITERS" --valid-data-path "${VALID[@]}"
        --split 100,0,0 --seed 1234)
train() { echo "$BIN/$1_train_text_document"; }

stage() { echo; echo "=== [nexus] $* ==="; }
has_ckpt() { [ -f "$1/latest_checkpointed_iteration.txt" ]; }
done_at() { has_ckpt "$1" && [ "$(cat "$1/latest_checkpointed_iteration.txt")" = "$2" ]; }

# 1. preprocess ------------------------------------------------------------------------------
stage "1/8 preprocess $DATA/*.jsonl -> $BIN"
mkdir -p "$BIN"
"$PY" - "$DATA" "$BIN" "${DOMAINS[@]}" <<'EOF'
import os, sys
from bam_megatron.cli.preprocess import preprocess
data, out, domains = sys.argv[1], sys.argv[2], sys.argv[3:]
for d in domains:
    for split in ("train", "valid"):
        prefix = os.path.join(out, f"{d}_{split}")
        if os.path.exists(prefix + "_text_document.idx"):
            continue
        preprocess(["--input", f"{data}/{d}_{split}.jsonl", "--output-prefix", prefix, "--json-keys", "text",
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", f"{data}/tokenizer/tokenizer.json",
              "--append-eod", "--workers", "1", "--log-interval", "100000"])
print(f"[nexus] indexed datasets in {out}")
EOF

# 2. seed -------------------------------------------------------------------------------------
stage "2/8 pre-train the dense seed ($SEED_ITERS steps)"
if done_at "$OUT/seed" "$SEED_ITERS"; then echo "[nexus] seed done, skipping"; else
  "$PY" pretrain_bam.py "${MODEL[@]}" "${COMMON[@]}" \
    --data-path 0.7 "$(train english)" 0.1 "$(train code)" 0.1 "$(train legal)" 0.1 "$(train math)" \
    --train-iters "$SEED_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $(( SEED_ITERS / 15 )) --lr-decay-style cosine \
    --override-opt-param-scheduler --eval-interval "$SEED_ITERS" --load "$OUT/seed" --save "$OUT/seed" \
    --save-interval 100 --keep-last-checkpoints 1
fi

# 3. branch -----------------------------------------------------------------------------------
for d in "${DOMAINS[@]}"; do
  stage "3/8 branch: $d expert ($BRANCH_ITERS steps, half the seed's LR)"
  if done_at "$OUT/expert_$d" "$BRANCH_ITERS"; then echo "[nexus] $d expert done, skipping"; continue; fi
  "$PY" pretrain_bam.py "${MODEL[@]}" "${COMMON[@]}" --data-path 0.9 "$(train "$d")" 0.1 "$(train english)" \
    --load "$OUT/expert_$d" --save "$OUT/expert_$d" --pretrained-checkpoint "$OUT/seed" \
    --train-iters "$BRANCH_ITERS" --lr 1.5e-3 --min-lr 1.5e-4 --override-opt-param-scheduler \
    --lr-warmup-iters $(( BRANCH_ITERS / 10 )) --lr-decay-style cosine --eval-interval "$BRANCH_ITERS" \
    --save-interval 100 --keep-last-checkpoints 1
done

# 4. domain embeddings ------------------------------------------------------------------------
stage "4/8 domain embeddings of ${DOMAINS[*]} under the seed"
EMB="$OUT/domain_embeddings.pt"
if [ -f "$EMB" ]; then echo "[nexus] done, skipping"; else
  SPECS=()
  for d in "${DOMAINS[@]}"; do SPECS+=("$d:$(train "$d")"); done
  "$PY" tools/domain_embeddings.py --load "$OUT/seed" --domain "${SPECS[@]}" --tokens "$EMBED_TOKENS" --output "$EMB"
fi

# 5. mix and train ----------------------------------------------------------------------------
OLD_BLEND=()
for d in "${OLD[@]}"; do OLD_BLEND+=(0.3333 "$(train "$d")"); done
moe_train() {  # name, init checkpoint, iterations, blend...
  local name=$1 init=$2 iters=$3; shift 3
  if done_at "$OUT/$name" "$iters"; then echo "[nexus] $name done, skipping"; return; fi
  "$PY" pretrain_bam.py "${COMMON[@]}" --use-checkpoint-args --load "$OUT/$name" --save "$OUT/$name" \
    --pretrained-checkpoint "$init" --data-path "$@" --train-iters "$iters" --override-opt-param-scheduler \
    --lr 1.5e-3 --min-lr 1.5e-4 --lr-warmup-iters $(( iters / 10 )) --lr-decay-style cosine \
    --eval-interval "$iters" --save-interval 100 --keep-last-checkpoints 1
}
SEEDS=("$OUT/seed")
for d in "${OLD[@]}"; do SEEDS+=("$OUT/expert_$d"); done
OLD_CSV=$(IFS=,; echo "${OLD[*]}")
for router in nexus linear; do
  stage "5/8 mix (${router} router): seed FFN shared + ${OLD[*]} experts, then $MOE_ITERS steps on ${OLD[*]}"
  if has_ckpt "$OUT/mix_$router"; then echo "[nexus] mix done, skipping"; else
    if [ "$router" = nexus ]; then ROUTER=(--router nexus --domain-embeddings "$EMB" --domains "$OLD_CSV"); else ROUTER=(--shared-expert); fi
    "$PY" tools/upcycle_bam.py "${ROUTER[@]}" --moe-router-topk 1 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 \
      --output "$OUT/mix_$router" "${SEEDS[@]}"
  fi
  moe_train "moe_$router" "$OUT/mix_$router" "$MOE_ITERS" "${OLD_BLEND[@]}"
done

# 6. add the new domain's expert ----------------------------------------------------------------
for router in nexus linear; do
  stage "6/8 add the $NEW expert to the trained ${router} MoE"
  if has_ckpt "$OUT/moe_${router}_plus_$NEW"; then echo "[nexus] done, skipping"; continue; fi
  "$PY" tools/add_expert.py "$OUT/moe_$router" "$OUT/expert_$NEW" --domain-embedding "$EMB" --domain "$NEW" \
    --output "$OUT/moe_${router}_plus_$NEW"
done

# 7. fine-tune: half new domain, half old domains ------------------------------------------------
FT_BLEND=(0.5 "$(train "$NEW")")
for d in "${OLD[@]}"; do FT_BLEND+=(0.1667 "$(train "$d")"); done
for router in nexus linear; do
  stage "7/8 fine-tune ($FT_ITERS steps, half $NEW): ${router} MoE with and without the $NEW expert"
  moe_train "ft_${router}_plus_$NEW" "$OUT/moe_${router}_plus_$NEW" "$FT_ITERS" "${FT_BLEND[@]}"
  moe_train "ft_${router}" "$OUT/moe_$router" "$FT_ITERS" "${FT_BLEND[@]}"
done

# 8. evaluate -------------------------------------------------------------------------------------
stage "8/8 evaluate: per-domain perplexity"
ROWS=(--model "seed=$OUT/seed" --model "$NEW expert=$OUT/expert_$NEW")
for router in linear nexus; do
  ROWS+=(--model "$router: mixed and trained (before adding)=$OUT/moe_$router"
         --model "$router: + $NEW expert (after adding)=$OUT/moe_${router}_plus_$NEW"
         --model "$router: + $NEW expert, fine-tuned=$OUT/ft_${router}_plus_$NEW"
         --model "$router: fine-tuned without the new expert=$OUT/ft_$router")
done
"$PY" tools/evaluate_bam.py "${ROWS[@]}" --valid-data-path "${VALID[@]}" "${TOK[@]}" --eval-iters "$EVAL_ITERS" \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --out-dir "$OUT/results" --routing
"$PY" examples/nexus_table.py "$OUT/results/results.csv" --old "${OLD[@]}" --new "$NEW" --out "$OUT/results/nexus.md"
