#!/usr/bin/env bash
# Set up Stratos in ./.venv: the CPU torch wheel first (an unpinned torch pulls a multi-GB CUDA
# build), then the project with its training and dev extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.stratos-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$VPY" -c "import stratosd, torch" 2>/dev/null; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${STRATOS_CPU_ONLY:-}" ]; then
    "$VPY" -m pip install -q torch            # GPU host: the CUDA build
  else
    "$VPY" -m pip install -q torch==2.13.0    # CPU machine: the CPU wheel
  fi
fi
"$VPY" -m pip install -q -e ".[train,dev]"
touch "$stamp"
echo "setup done: $("$VPY" -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)')"
