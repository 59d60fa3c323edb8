#!/usr/bin/env bash
# The main job in one command: set up, check parity, then train and judge the whole pipeline on a CPU.
#   bash scripts/quickstart.sh [--fresh] [--long] [--smoke]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$REPO_ROOT/scripts/setup.sh"
cd "$REPO_ROOT"
exec "$VENV/bin/python" scripts/quickstart.py "$@"
