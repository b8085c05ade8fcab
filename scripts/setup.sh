#!/usr/bin/env bash
# Create .venv and install the project with what its tests need. Idempotent.
# torch==2.13.0 goes first: on the reference machines pip finds that CPU build on disk, while an
# unpinned torch would pull a multi-GB CUDA build. pyproject.toml keeps a permissive range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS:-test}]"
