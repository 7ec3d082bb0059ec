#!/usr/bin/env bash
# The built-in default run on a CPU machine: 2 gloo ranks (TP 2 x PP 1). On first use it builds a
# tiny Qwen2.5-VL with the real Qwen2.5 tokenizer (offline) and the built-in dataset (count and
# color questions, level 0) under ~/.cache/megatron_cppo (or $MEGATRON_CPPO_CACHE), runs the
# supervised warm start, then CPPO with vLLM rollouts (examples/tiny_cpu.yaml). Metrics, samples
# and curves.png go to --log-dir (default ./runs/<time>). Extra flags override the YAML.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONWARNINGS="ignore::UserWarning"
py=${PYTHON:-.venv/bin/python}
exec "$py" -m torch.distributed.run --nproc-per-node 2 -m megatron_cppo.train \
  --config examples/tiny_cpu.yaml "$@"
