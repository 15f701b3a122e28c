#!/usr/bin/env bash
# Smoke run: set up (once), then build dense, BTX and BAM models with megatron-core and time
# forward + backward passes. Tiny shape on CPU; the reference shape on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
export PYTHONWARNINGS=ignore
exec "$PY" bench/bench_model.py "$@"
