#!/usr/bin/env bash
# Start pretrain_bam.py on every GPU of the allocation with srun, one task per GPU (no torchrun):
# each task gets RANK / WORLD_SIZE / LOCAL_RANK from SLURM, the rendezvous is on the first node.
# srun forwards the signals it receives (USR1, TERM) to every rank.
#   bash examples/slurm/launch.sh <pretrain_bam.py flags...>
# Environment: GPUS_PER_NODE (default 8), MASTER_PORT (default 29500), PYTHON (default python).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export BAM_PYTHON=${PYTHON:-python} BAM_SCRIPT="$REPO/pretrain_bam.py"
echo "[launch] job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT"
exec srun --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
  bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$BAM_PYTHON" "$BAM_SCRIPT" "$@"' \
  pretrain_bam "$@"
