#!/usr/bin/env bash
# Installs torchfreeze into .venv (through constraints.txt), runs the static gates
# (import layers, ruff, mypy --strict), then the whole test suite.
source "$(dirname "$0")/_venv.sh"
echo "== lint-imports (layer contract)"
lint-imports --no-cache
echo "== ruff check / ruff format --check"
ruff check src tests scripts
ruff format --check src tests scripts
echo "== mypy --strict"
mypy
echo "== pytest"
exec python -m pytest "$@"
