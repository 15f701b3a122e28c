#!/usr/bin/env bash
# Create .venv (once) with everything bam-megatron needs, then print its python.
#   - A machine that already has PyTorch (e.g. a CUDA build) keeps it: the venv sees the
#     system site-packages.
#   - Otherwise PyTorch is installed from the package index (CPU machines get a CPU build
#     where the index offers one).
# Usage: PY=$(bash scripts/setup_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BAM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then
    python3 -m venv --system-site-packages "$VENV" >&2
  else
    python3 -m venv "$VENV" >&2
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, megatron.core, wandb, psutil, pytest, tokenizers, sentencepiece, tensorboard, matplotlib" >/dev/null 2>&1; then
  echo "[setup] installing requirements into $VENV ..." >&2
  "$PY" -m pip install -q --upgrade pip >&2 || true
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # The pinned CPU build is what CI uses; fall back to the index's default build.
    "$PY" -m pip install -q "torch==2.13.0" >&2 || "$PY" -m pip install -q "torch>=2.6" >&2
  fi
  "$PY" -m pip install -q -r requirements.txt >&2
fi
echo "$PY"
