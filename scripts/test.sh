#!/usr/bin/env bash
# The test command: install, lint (ruff), check the layers (import-linter) and the types (mypy), run every
# test (slow end-to-end ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
lint-imports   # .importlinter: the core imports neither Ray nor torch; entry > deployments > actors > farm.gpu
"$PY" -m mypy  # [tool.mypy] in pyproject.toml: farm/, actors/, deployments/
wc -l actors/director.py
"$PY" -m pytest "$@"
