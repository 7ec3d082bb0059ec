#!/usr/bin/env bash
# Create (or reuse) ./.venv on a CPU machine and install megatron_cppo into it, editable, with the
# test extra. torch==2.13.0 is installed first: it is the CPU build (a local wheel on CPU machines),
# and every other requirement accepts it, so nothing can pull a CUDA torch afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
