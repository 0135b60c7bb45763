#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch and the test/benchmark dependencies.
# Idempotent: a second run with an unchanged requirements-dev.txt does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.stamp-$(cat requirements-dev.txt scripts/setup_env.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet python -m pip install -q --upgrade pip
# torch first, pinned: a CPU build on local disk (an unpinned torch would pull a CUDA build).
quiet python -m pip install -q torch==2.13.0
echo "torch==2.13.0" > .venv/torch-constraint.txt
quiet python -m pip install -q -c .venv/torch-constraint.txt -r requirements-dev.txt
nodeps=$(sed -n 's/^# no-deps: *//p' requirements-dev.txt)
[ -z "$nodeps" ] || quiet python -m pip install -q --no-deps -c .venv/torch-constraint.txt $nodeps
rm -f .venv/.stamp-*
touch "$stamp"
