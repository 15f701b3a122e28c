#!/usr/bin/env bash
# Set up the environment (once) and run the test suite (CPU + gloo; about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export WANDB_MODE=offline PYTHONWARNINGS=ignore
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
