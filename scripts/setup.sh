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
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS:-all,test}]"
# Chromium for the browser test of the HTML report (tests/test_report.py skips without it).
# CHROMIUM=0 (or no/false/off) skips this step; it never fails the setup.
case "${CHROMIUM:-1}" in 0|no|false|off) want_chromium=0 ;; *) want_chromium=1 ;; esac
if [ "$want_chromium" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium with apt-get; tests/test_report.py will be skipped"
  else
    echo "setup: chromium not found (install it, e.g. apt-get install chromium); tests/test_report.py will be skipped"
  fi
fi
