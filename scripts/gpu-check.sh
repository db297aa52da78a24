#!/usr/bin/env bash
# Run every GPU path on this host's GPU (tests marked `gpu`, tests/gpu/): the vLLM teacher, the
# vLLM deployer serving LoRA adapters by name, bf16 full SFT, QLoRA (bitsandbytes) and the
# export, all on a `config:` model built locally (no downloads). Then print what was measured:
# training and vLLM generation tokens/s, time to first token. Budget: 8 minutes on one GPU.
#
#   scripts/gpu-check.sh            # extra arguments go to pytest, e.g. -k vllm
#
# Needs: a CUDA GPU, torch with CUDA, and pip install -e ".[train,vllm,qlora,dev]" (with
# [train] in the same environment that resolves to vLLM 0.30: see pyproject.toml's vllm extra).
# Exit: 0 all passed, 1 a test failed, 2 no GPU here, 3 passed but extras were missing (their
# tests were skipped), 124 over the 8-minute budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"

if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu-check: torch is not installed: pip install -e '.[train]' with a CUDA build")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: needs a CUDA GPU, and torch {torch.__version__} sees none "
             f"(CUDA build: {torch.version.cuda or 'no'}; nvidia-smi must list a GPU)")
print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF
then
    echo "gpu-check: nothing was run. Run this script on a host with an NVIDIA GPU." >&2
    exit 2
fi

missing=$("$PY" - <<'EOF'
import importlib.util
extras = {"vllm": "vllm", "bitsandbytes": "qlora"}
print(" ".join(f"{m}(stratos[{e}])" for m, e in extras.items()
               if importlib.util.find_spec(m) is None))
EOF
)
[ -n "$missing" ] && echo "gpu-check: missing $missing: their tests will be skipped" >&2

metrics="$(mktemp -t stratos-gpu-metrics.XXXXXX)"
trap 'rm -f "$metrics"' EXIT
start=$(date +%s)
STRATOS_GPU_METRICS="$metrics" timeout --kill-after=30 "$BUDGET_S" "$PY" -m pytest -m gpu tests/gpu \
    -p no:cacheprovider -v -rs "$@"
rc=$?
elapsed=$(( $(date +%s) - start ))

echo
echo "gpu-check: measured"
"$PY" - "$metrics" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if not rows:
    print("  (nothing: every measuring test failed or was skipped)")
width = max((len(r["what"]) for r in rows), default=0)
for r in rows:
    print(f"  {r['what']:<{width}}  {r['value']:>10.1f} {r['unit']}")
EOF
echo "gpu-check: ${elapsed}s of the ${BUDGET_S}s budget"

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then  # 137: killed 30 s after the TERM
    echo "gpu-check: over budget: the tests took longer than ${BUDGET_S}s" >&2
    exit 124
fi
if [ "$rc" -ne 0 ]; then
    echo "gpu-check: FAILED (pytest exit $rc)" >&2
    exit 1
fi
if [ -n "$missing" ]; then
    echo "gpu-check: passed, but incomplete: install $missing and run again" >&2
    exit 3
fi
echo "gpu-check: all GPU paths passed"
