#!/usr/bin/env bash
# The test command: set up the environment, lint (ruff), then run the whole test suite (arguments go to pytest).
# Two pytest-xdist workers, each taking whole test files (module fixtures are built once): most tests run
# single-threaded subprocesses, so one process alone keeps a 2-core machine half idle (11 min 7 s -> 7 min 13 s).
# STAR_TEST_WORKERS=0 runs everything in one process; a later `-n N` argument also overrides it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$REPO_ROOT/scripts/setup.sh"
cd "$REPO_ROOT"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest -n "${STAR_TEST_WORKERS:-2}" --dist loadfile "$@"
