#!/usr/bin/env bash
# Set up the environment (once) and run the checks: ruff, then the test suite (CPU + gloo).
#   bash scripts/run_tests.sh                   # everything (what CI runs; about 25 min on 2 cores)
#   bash scripts/run_tests.sh tests/unit        # the quick tier (= -m "not slow"; ~20 s on 2 cores)
#   bash scripts/run_tests.sh tests/unit -p random_order --random-order-seed=7   # ... in random order
#   bash scripts/run_tests.sh tests/integration/hf -k export   # any pytest arguments
# A skipped test prints its reason (-rs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh test)
export WANDB_MODE=offline
"$PY" -m ruff check --quiet .
exec "$PY" -m pytest -q -rs "$@"
