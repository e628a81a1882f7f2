#!/usr/bin/env bash
# The test command: set up .venv, then run the whole pytest suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash orchestration_scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
