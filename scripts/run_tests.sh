#!/usr/bin/env bash
# Set up the environment (once) and run the checks: ruff, then the test suite (CPU + gloo).
#   bash scripts/run_tests.sh                   # everything (what CI runs; ~20 min on 2 cores)
#   bash scripts/run_tests.sh -m "not slow"     # the quick tier (a few minutes)
#   bash scripts/run_tests.sh tests/unit        # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh test)
export WANDB_MODE=offline
"$PY" -m ruff check --quiet .
exec "$PY" -m pytest -q "$@"
