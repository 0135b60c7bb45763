#!/usr/bin/env bash
# The test command: sets up .venv and the ComfyUI test host if needed, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/build_comfyui_host.sh >/dev/null
exec .venv/bin/python -m pytest "$@"
