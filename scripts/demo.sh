#!/usr/bin/env bash
# Installs torchfreeze into .venv (through constraints.txt) and runs the main job.
source "$(dirname "$0")/_venv.sh"
exec torchfreeze demo "$@"
