#!/usr/bin/env bash
# Branch-Attend-Mix end to end on the bundled sample corpus (data/): CPU-sized by default.
#
#   1. preprocess   data/*.jsonl -> Megatron indexed datasets (bundled BPE tokenizer)
#   2. seed         pre-train a dense parallel-block model on general text (+ a little of each domain)
#   3. branch       continue the seed on each domain (+10% general English) at a lower LR
#   4. mix          upcycle seed + experts three ways: BAM KV experts, BAM shared KV, BTX
#   5. train        each MoE on the uniform mixture for the same number of tokens, and the dense
#                   seed too (the baseline: does upcycling beat simply training the seed longer?)
#   6. evaluate     per-domain perplexity and multiple-choice accuracy on the bundled tasks
#                   (data/tasks) in one table (+ routing heatmaps of the BAM models)
#   7. transformers export the BAM KV-experts model (tools/hf_export.py) and sample from it
#
# Re-running resumes: a finished stage is skipped, one stopped part-way continues from its last
# checkpoint (saved every 100 steps) with the same command (--load DIR --save DIR, and
# --pretrained-checkpoint for the first start of a branch or mixing stage); a stage re-run with
# more steps continues with the new schedule (--override-opt-param-scheduler).
#   bash examples/quickstart.sh                    # defaults: ~5 min on a 2-core CPU
#   SCALE=gpu DATA=runs/data_large bash examples/quickstart.sh   # one GPU, ~10 min on an H100
#     (runs/data_large: python tools/build_sample_data.py --out runs/data_large --train-bytes 4000000)
# Environment knobs: OUT (default runs/quickstart), DATA (a corpus folder in the layout of data/,
# e.g. a larger one from tools/build_sample_data.py --train-bytes), SEED_ITERS, BRANCH_ITERS,
# MOE_ITERS, HIDDEN, LAYERS, HEADS, SEQ, MBS, GBS, EVAL_ITERS, TASKS (a folder of <domain>.jsonl
# multiple-choice tasks; default $DATA/tasks, built from $DATA/*_valid.jsonl when absent),
# TASK_LIMIT (items scored per task; default all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${BAM_PYTHON:-$(bash scripts/setup_env.sh)}  # BAM_PYTHON: use this interpreter as it is
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1

OUT=${OUT:-runs/quickstart}
DATA=${DATA:-data}
if [ "${SCALE:-cpu}" = gpu ]; then
  : "${LAYERS:=6}" "${HIDDEN:=512}" "${HEADS:=8}" "${SEQ:=512}" "${MBS:=16}" "${GBS:=32}"
  : "${SEED_ITERS:=600}" "${BRANCH_ITERS:=200}" "${MOE_ITERS:=300}" "${EVAL_ITERS:=8}"
  if [ "$DATA" = data ]; then
    echo "[quickstart] note: the bundled corpus (~1.6M tokens) is repeated many times at this scale;" \
         "for a meaningful comparison build a larger one: python tools/build_sample_data.py" \
         "--out runs/data_large --train-bytes 4000000, then DATA=runs/data_large" >&2
  fi
else
  : "${LAYERS:=2}" "${HIDDEN:=128}" "${HEADS:=4}" "${SEQ:=128}" "${MBS:=16}" "${GBS:=16}"
  : "${SEED_ITERS:=300}" "${BRANCH_ITERS:=100}" "${MOE_ITERS:=100}" "${EVAL_ITERS:=4}"
fi
DOMAINS=(code legal math english)
EXPERT_DOMAINS=(code legal math)       # one expert per domain; the seed is the fourth expert
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

TASKS=${TASKS:-$DATA/tasks}
TASK_ARGS=()
for d in "${DOMAINS[@]}"; do TASK_ARGS+=("$d=$TASKS/$d.jsonl"); done

stage() { echo; echo "=== [quickstart] $* ==="; }
has_ckpt() { [ -f "$1/latest_checkpointed_iteration.txt" ]; }  # a complete checkpoint, any iteration
done_at() { has_ckpt "$1" && [ "$(cat "$1/latest_checkpointed_iteration.txt")" = "$2" ]; }

# 1. preprocess ------------------------------------------------------------------------------
stage "1/7 preprocess $DATA/*.jsonl -> $BIN"
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
              "--append-eod", "--workers", "1", "--log-interval", "100000"])  # exits non-zero on error
print(f"[quickstart] indexed datasets in {out}")
EOF
train_blend() {  # weight prefix pairs for one domain + 10% general English
  echo 0.9 "$BIN/$1_train_text_document" 0.1 "$BIN/english_train_text_document"
}
UNIFORM=()
for d in "${DOMAINS[@]}"; do UNIFORM+=(0.25 "$BIN/${d}_train_text_document"); done

# 2. seed -------------------------------------------------------------------------------------
# General text with a little of every domain (the paper's seed sees general web text).
stage "2/7 pre-train the dense seed ($SEED_ITERS steps)"
if done_at "$OUT/seed" "$SEED_ITERS"; then echo "[quickstart] seed done, skipping"; else
  "$PY" pretrain_bam.py "${MODEL[@]}" "${COMMON[@]}" \
    --data-path 0.7 "$BIN/english_train_text_document" 0.1 "$BIN/code_train_text_document" \
                0.1 "$BIN/legal_train_text_document" 0.1 "$BIN/math_train_text_document" \
    --train-iters "$SEED_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $(( SEED_ITERS / 15 )) --lr-decay-style cosine \
    --override-opt-param-scheduler \
    --eval-interval "$SEED_ITERS" --load "$OUT/seed" --save "$OUT/seed" --save-interval 100 --keep-last-checkpoints 1
fi

# 3. branch -----------------------------------------------------------------------------------
for d in "${EXPERT_DOMAINS[@]}"; do
  stage "3/7 branch: $d expert ($BRANCH_ITERS steps, half the seed's LR)"
  if done_at "$OUT/expert_$d" "$BRANCH_ITERS"; then echo "[quickstart] $d expert done, skipping"; continue; fi
  # The first run starts from the seed (weights only); a stage stopped part-way resumes its own.
  # shellcheck disable=SC2046
  "$PY" pretrain_bam.py "${MODEL[@]}" "${COMMON[@]}" --data-path $(train_blend "$d") \
    --load "$OUT/expert_$d" --save "$OUT/expert_$d" --pretrained-checkpoint "$OUT/seed" \
    --train-iters "$BRANCH_ITERS" --lr 1.5e-3 --min-lr 1.5e-4 --override-opt-param-scheduler \
    --lr-warmup-iters $(( BRANCH_ITERS / 10 )) --lr-decay-style cosine --eval-interval "$BRANCH_ITERS" \
    --save-interval 100 --keep-last-checkpoints 1
done

# 4. mix --------------------------------------------------------------------------------------
SEEDS=("$OUT/seed")
for d in "${EXPERT_DOMAINS[@]}"; do SEEDS+=("$OUT/expert_$d"); done
declare -A MODE=([bam_kv_experts]=full [bam_shared_kv]=shared-kv [btx]=merged)
for name in bam_kv_experts bam_shared_kv btx; do
  stage "4/7 mix: $name (${MODE[$name]}) from ${#SEEDS[@]} dense models"
  if has_ckpt "$OUT/upcycled_$name"; then echo "[quickstart] done, skipping"; continue; fi
  "$PY" tools/upcycle_bam.py --attention-experts "${MODE[$name]}" --moe-router-topk 1 \
    --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 --output "$OUT/upcycled_$name" "${SEEDS[@]}" \
    --expert-names seed "${EXPERT_DOMAINS[@]}"
done

# 5. train the MoE models on the uniform mixture ---------------------------------------------
for name in bam_kv_experts bam_shared_kv btx; do
  stage "5/7 train $name on the uniform mixture ($MOE_ITERS steps)"
  if done_at "$OUT/$name" "$MOE_ITERS"; then echo "[quickstart] $name done, skipping"; continue; fi
  # Model, tokenizer, dropout and MoE loss settings come from the upcycled checkpoint.
  "$PY" pretrain_bam.py "${COMMON[@]}" --use-checkpoint-args \
    --load "$OUT/$name" --save "$OUT/$name" --pretrained-checkpoint "$OUT/upcycled_$name" \
    --data-path "${UNIFORM[@]}" --train-iters "$MOE_ITERS" --override-opt-param-scheduler \
    --lr 1.5e-3 --min-lr 1.5e-4 --lr-warmup-iters $(( MOE_ITERS / 10 )) --lr-decay-style cosine \
    --eval-interval "$MOE_ITERS" --save-interval 100 --keep-last-checkpoints 1
done

# The baseline: the dense seed on the same uniform mixture, for the same steps, batch and schedule.
stage "5/7 train the dense seed on the uniform mixture ($MOE_ITERS steps): the dense baseline"
if done_at "$OUT/dense_continued" "$MOE_ITERS"; then echo "[quickstart] dense_continued done, skipping"; else
  "$PY" pretrain_bam.py "${MODEL[@]}" "${COMMON[@]}" \
    --load "$OUT/dense_continued" --save "$OUT/dense_continued" --pretrained-checkpoint "$OUT/seed" \
    --data-path "${UNIFORM[@]}" --train-iters "$MOE_ITERS" --override-opt-param-scheduler \
    --lr 1.5e-3 --min-lr 1.5e-4 --lr-warmup-iters $(( MOE_ITERS / 10 )) --lr-decay-style cosine \
    --eval-interval "$MOE_ITERS" --save-interval 100 --keep-last-checkpoints 1
fi

# 6. evaluate ---------------------------------------------------------------------------------
stage "6/7 evaluate: per-domain perplexity and multiple-choice accuracy"
if [ ! -f "$TASKS/english.jsonl" ]; then "$PY" tools/build_tasks.py --data "$DATA" --out "$TASKS"; fi
"$PY" tools/evaluate_bam.py \
  --model "seed=$OUT/seed" \
  --model "code expert=$OUT/expert_code" --model "legal expert=$OUT/expert_legal" \
  --model "math expert=$OUT/expert_math" --model "dense continued=$OUT/dense_continued" \
  --model "BTX=$OUT/btx" --model "BAM shared KV=$OUT/bam_shared_kv" --model "BAM KV experts=$OUT/bam_kv_experts" \
  --valid-data-path "${VALID[@]}" "${TOK[@]}" --eval-iters "$EVAL_ITERS" --micro-batch-size "$MBS" \
  --global-batch-size "$GBS" --out-dir "$OUT/results" --routing \
  --tasks "${TASK_ARGS[@]}" ${TASK_LIMIT:+--task-limit "$TASK_LIMIT"}
echo
echo "[quickstart] results: $OUT/results/results.md, routing heatmaps in $OUT/results/routing/"

# 7. transformers -----------------------------------------------------------------------------
# Always re-exported (a few seconds): the folder follows the latest trained checkpoint.
stage "7/7 export the BAM KV-experts model to transformers and sample from it"
"$PY" tools/hf_export.py "$OUT/bam_kv_experts" --output "$OUT/hf/bam_kv_experts" --force --quiet
"$PY" - "$OUT/hf/bam_kv_experts" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
for prompt in ("def ", "The court held that", "Solve for x:"):
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"[quickstart] greedy sample: {tok.decode(out[0], skip_special_tokens=True)!r}")
EOF
echo "[quickstart] transformers folder: $OUT/hf/bam_kv_experts (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
