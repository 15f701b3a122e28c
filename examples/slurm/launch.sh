#!/usr/bin/env bash
# Start pretrain_bam.py with one rank per GPU of the allocation.
# - One node (the default there): tools/torchrun.py, torchrun whose agent passes stop signals on
#   to its ranks and waits for them, inside the batch step. Any process of the job may get the
#   stop signal (`scancel --signal=TERM --full`, a preemption, `--signal=B:USR1@...`): the ranks
#   save and exit 0, and so does the launcher.
# - Several nodes: srun, one task per GPU (RANK / WORLD_SIZE / LOCAL_RANK from SLURM, rendezvous
#   on the first node). srun passes USR1 on to every rank, but turns a SIGTERM that reaches srun
#   itself into SIGKILL of its tasks: such jobs save on USR1 (`#SBATCH --signal=B:USR1@300`; the
#   batch shell passes USR1 on for TERM too, see common.sh), not on a TERM sent to every process.
#   bash examples/slurm/launch.sh <pretrain_bam.py flags...>
# Environment: GPUS_PER_NODE (default 8), MASTER_PORT (srun: default 29500), PYTHON (default
# python), LAUNCHER=torchrun|srun to choose (torchrun needs a one-node job).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
if [ "$NNODES" -eq 1 ]; then LAUNCHER=${LAUNCHER:-torchrun}; else LAUNCHER=${LAUNCHER:-srun}; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export BAM_PYTHON=${PYTHON:-python} BAM_SCRIPT="$REPO/pretrain_bam.py"
if [ "$LAUNCHER" = torchrun ]; then
  if [ "$NNODES" -ne 1 ]; then
    echo "[launch] LAUNCHER=torchrun starts ranks on one node; this job has $NNODES: use LAUNCHER=srun" >&2
    exit 1
  fi
  echo "[launch] job $SLURM_JOB_ID: 1 node x $GPUS_PER_NODE GPUs (tools/torchrun.py)"
  exec "$BAM_PYTHON" "$REPO/tools/torchrun.py" --standalone --nproc-per-node "$GPUS_PER_NODE" "$BAM_SCRIPT" "$@"
fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
echo "[launch] job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPUs (srun), rendezvous $MASTER_ADDR:$MASTER_PORT"
exec srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
  bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$BAM_PYTHON" "$BAM_SCRIPT" "$@"' \
  pretrain_bam "$@"
