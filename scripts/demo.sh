#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the in-process three-party demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m secure.demo "$@"
