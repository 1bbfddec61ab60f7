#!/usr/bin/env bash
# Sets up pxkern on a fresh machine: a virtual environment in .venv with the CPU build of
# torch, the package (its C++ extension compiled against that torch) and the test tools.
# Safe to run again: it only installs what is missing and rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# torch first and pinned: anything that pulls another torch downloads gigabytes.
pip install --quiet torch==2.13.0
pip install --quiet -r requirements.txt
# The extension builds against the installed torch, so no build isolation.
pip install --quiet --no-build-isolation -e .
