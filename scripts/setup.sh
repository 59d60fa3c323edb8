#!/usr/bin/env bash
# Create (or reuse) .venv and install the requirements. Idempotent: a venv whose recorded requirements hash
# matches the current files is reused as is. Set STAR_VENV to use another location.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
stamp="$VENV/.star-requirements.sha256"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] reusing $VENV (requirements unchanged)"
  exit 0
fi
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
echo "[setup] installing requirements-dev.txt (torch, torchvision, ... ; a few minutes on a fresh machine)"
"$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q -r requirements-dev.txt
"$VENV/bin/python" -m pip check
echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
