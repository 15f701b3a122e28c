#!/usr/bin/env bash
# Submit a template from the repository root, after creating logs/ (sbatch opens the log file
# before the job starts and cannot create its folder).
#   bash examples/slurm/submit.sh examples/slurm/seed.sbatch [sbatch flags...]
#   bash examples/slurm/submit.sh examples/slurm/branch.sbatch --export=ALL,DOMAIN=code
set -euo pipefail
cd "$(dirname "$0")/../.."
template=$1
shift
mkdir -p logs
exec sbatch "$@" "$template"
