#!/usr/bin/env bash
# Run pretrain_bam.py on every node of a SLURM allocation: one torchrun per node (srun), the
# rendezvous on the first node of the job's node list. Called by the *.sbatch templates:
#   bash examples/slurm/launch.sh <pretrain_bam.py flags...>
# Environment: GPUS_PER_NODE (default 8), RDZV_PORT (default 29500), PYTHON (default python).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON=${PYTHON:-python}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
echo "[launch] job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$RDZV_PORT"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT" \
    "$REPO/pretrain_bam.py" "$@"
