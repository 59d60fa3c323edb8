#!/usr/bin/env bash
# The main job in one command: set up, check parity, then train and judge the whole pipeline on a CPU.
#   bash scripts/quickstart.sh [--fresh] [--long] [--smoke] [--minutes 20] [--precision auto|fp32|bf16]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
start=$(date +%s)
STAR_SETUP_BROWSER=0 bash "$REPO_ROOT/scripts/setup.sh"
cd "$REPO_ROOT"
# The set-up time counts in the quickstart's time budget and its summary.
exec "$VENV/bin/python" scripts/quickstart.py --setup-seconds "$(( $(date +%s) - start ))" "$@"
