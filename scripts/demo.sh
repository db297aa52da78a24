#!/usr/bin/env bash
# Set everything up, then run the end-to-end demo: embedded NATS, the daemon, three local agents,
# a Mahjong winning-tiles distillation on CPU, a deployed endpoint and a report.
# Pass --fast for the CI smoke variant.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stratosctl demo "$@"
