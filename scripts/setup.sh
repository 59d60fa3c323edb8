#!/usr/bin/env bash
# Create (or reuse) .venv and install the requirements. Idempotent: a venv whose recorded requirements hash
# matches the current files is reused as is. Set STAR_VENV to use another location.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
stamp="$VENV/.star-requirements.sha256"
# Headless Chromium for the demo's browser test (Debian package; needs root and the Debian mirror).
# STAR_SETUP_BROWSER=0 skips it (scripts/quickstart.sh: the quickstart does not use a browser).
if [ "${STAR_SETUP_BROWSER:-1}" != 0 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian chromium (browser test of demo_gradio.py)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] chromium missing and not root: tests/test_demo.py's browser test will fail; install 'chromium'"
  fi
fi
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
# pip byte-compiles every installed file on one core (~90 s of ~230 s here); compileall does the same on every
# core afterwards (~50 s on 2). The .pyc files are needed up front: with PYTHONDONTWRITEBYTECODE set (as on
# these machines) nothing is cached at import, and every process would pay ~13 s more to import torch & co.
# compileall exits 1 for files written for a newer Python (here torch/testing/_internal/py312_intrinsics.py),
# which pip's own compilation skips silently too.
"$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q --no-compile -r requirements-dev.txt
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" > /dev/null || true
"$VENV/bin/python" -m pip check
echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
