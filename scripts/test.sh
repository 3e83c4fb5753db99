#!/usr/bin/env bash
# Installs torchfreeze into .venv (through constraints.txt) and runs the whole test suite.
source "$(dirname "$0")/_venv.sh"
exec python -m pytest "$@"
