#!/usr/bin/env bash
# The main job: set up .venv if needed, then three party nodes on loopback and a client query.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m client.demo "$@"
