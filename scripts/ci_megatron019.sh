#!/usr/bin/env bash
# Compatibility job: the suite's megatron-facing tests against megatron-core 0.19.2, the version the
# Python 3.12 GPU machines run. On Python 3.11 that release installs only from its sdist and only
# with --ignore-requires-python (docs/cpu-platform.md, "Versions"); it needs no triton here because
# megatron_cppo installs a stand-in for the one MoE kernel module that imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-mcore019
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip install -q --disable-pip-version-check"
$pip torch==2.13.0 numpy packaging
if ! "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('megatron-core') == '0.19.2'" 2>/dev/null; then
  $pip --no-deps --ignore-requires-python megatron-core==0.19.2
fi
# every other requirement of megatron_cppo, without letting pip touch megatron-core
$pip --no-deps -e ".[test]"
"$venv/bin/python" - <<'PY' > "$venv/requirements.txt"
import importlib.metadata as m
reqs = m.requires("megatron_cppo") or []
print("\n".join(r for r in reqs if "megatron-core" not in r and "extra ==" not in r)
      + "\npytest>=8\npytest-timeout>=2.3")
PY
$pip -r "$venv/requirements.txt"
"$venv/bin/python" -m pytest -q "$@"
