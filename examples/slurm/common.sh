# Shared settings and helpers of the SLURM templates (sourced by the *.sbatch files).
#
# Every setting is an environment variable with a default, so one template serves a real cluster
# and a dry run: MODEL_ARGS, TOKENIZER_ARGS, DATA_DIR, CKPT_DIR, GPUS_PER_NODE, PYTHON,
# EXTRA_ARGS (appended last: later flags win), WANDB_PROJECT.
# wandb: set WANDB_MODE=offline on nodes without internet (runs go to <CKPT_DIR>/wandb; upload
# later with `wandb sync`), or WANDB_MODE=disabled.
# Values are words separated by spaces: keep paths free of spaces.

: "${MODEL_ARGS:=--num-layers 6 --hidden-size 1024 --num-attention-heads 8 --ffn-hidden-size 4096 \
--seq-length 2048 --max-position-embeddings 2048 --swiglu --normalization RMSNorm \
--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights \
--hidden-dropout 0 --attention-dropout 0}"
: "${TOKENIZER_ARGS:=--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer/tokenizer.json}"
: "${DATA_DIR:=data/bin}"
: "${CKPT_DIR:=checkpoints}"
: "${PYTHON:=python}"
: "${EXTRA_ARGS:=}"
: "${WANDB_PROJECT:=bam}"
export WANDB_MODE=${WANDB_MODE:-offline}

# Train until the command's --train-iters, saving into (and resuming from) SAVE. Stops cleanly
# on USR1 (from #SBATCH --signal=B:USR1@...) or TERM (preemption, scancel), whether it reaches
# this shell only or every process of the job: the ranks finish the iteration, save and exit 0;
# the job is then requeued (#SBATCH --requeue) to continue with the same command. A run that
# fails is not requeued. The shell passes both signals on to the launcher as USR1 (the ranks run
# with --exit-signal SIGUSR1): srun would turn a TERM into SIGKILL of its tasks (launch.sh).
#   run_training SAVE TRAIN_ITERS <pretrain_bam.py flags...>
run_training() {
  local save=$1 iters=$2 child status done_iters
  shift 2
  trap 'echo "[slurm] $(date +%T) USR1: the run saves after this iteration and stops"; kill -USR1 "$child" 2>/dev/null' USR1
  trap 'echo "[slurm] $(date +%T) TERM: the run saves after this iteration and stops"; kill -USR1 "$child" 2>/dev/null' TERM
  bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@" --load "$save" --save "$save" --train-iters "$iters" \
    --exit-signal-handler --exit-signal SIGUSR1 &
  child=$!
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again for the run.
  # (`|| status=$?` keeps `set -e` from ending the script there.)
  while kill -0 "$child" 2>/dev/null; do status=0; wait "$child" || status=$?; done
  trap - USR1 TERM
  done_iters=$(cat "$save/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
  if [ "$status" -eq 0 ] && [ "$done_iters" -lt "$iters" ]; then
    echo "[slurm] stopped at iteration $done_iters of $iters: requeueing job $SLURM_JOB_ID to continue"
    scontrol requeue "$SLURM_JOB_ID" || echo "[slurm] requeue refused: submit the same job again to continue"
  elif [ "$status" -eq 0 ]; then
    echo "[slurm] finished: iteration $done_iters of $iters in $save"
  fi
  return "$status"
}
