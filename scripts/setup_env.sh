#!/usr/bin/env bash
# Create a virtual environment (once) with bam-megatron installed in it, then print its python.
#   bash scripts/setup_env.sh            # the programs (quickstart, training, tools)
#   bash scripts/setup_env.sh test       # ... plus the test tools (pytest, ruff)
# Environment:
#   BAM_VENV=DIR        where the venv lives (default .venv)
#   BAM_HERMETIC=1      never see the system's packages (what CI does); by default a machine that
#                       already has PyTorch (e.g. a CUDA build) keeps it: the venv then sees the
#                       system site-packages.
# The project itself is installed editable (pip install -e .), dependencies from requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BAM_VENV:-.venv}
EXTRAS=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${BAM_HERMETIC:-0}" != 1 ] && python3 -c "import torch" >/dev/null 2>&1; then
    python3 -m venv --system-site-packages "$VENV" >&2
  else
    python3 -m venv "$VENV" >&2
  fi
fi
PY="$VENV/bin/python"
STAMP="$VENV/.bam-installed${EXTRAS:+-$EXTRAS}"
# Reinstall when the requirements or the package metadata changed since the last install.
if [ ! -f "$STAMP" ] || [ requirements.txt -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing bam-megatron${EXTRAS:+[$EXTRAS]} into $VENV ..." >&2
  LOG="$VENV/setup.log"
  : > "$LOG"
  # pip and the build backend talk a lot; their output goes to the log, shown only on failure.
  quiet() { "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; echo "[setup] failed: $* (log: $LOG)" >&2; return 1; }; }
  quiet "$PY" -m pip install --upgrade pip || true
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # The pinned CPU build is what CI uses; fall back to the index's default build.
    quiet "$PY" -m pip install "torch==2.13.0" || quiet "$PY" -m pip install "torch>=2.6"
  fi
  quiet "$PY" -m pip install -e ".${EXTRAS:+[$EXTRAS]}"
  echo "[setup] done (log: $LOG)" >&2
  touch "$STAMP"
fi
echo "$PY"
