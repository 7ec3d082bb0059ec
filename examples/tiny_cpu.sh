#!/usr/bin/env bash
# The built-in default run on a CPU machine: `megatron-cppo train` with no run flags, i.e.
# megatron_cppo/configs/tiny_cpu.yaml on 2 local gloo ranks (TP 2 x PP 1). On first use it builds a
# tiny Qwen2.5-VL with the real Qwen2.5 tokenizer (offline) and the built-in dataset under
# ~/.cache/megatron_cppo (or $MEGATRON_CPPO_CACHE), runs the supervised warm start, then CPPO with
# vLLM rollouts. Metrics, samples and curves.png go to --log-dir (default ./runs/<time>). Extra
# flags override the YAML, e.g. `bash examples/tiny_cpu.sh --train-iters 8`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONWARNINGS="ignore::UserWarning"
py=${PYTHON:-.venv/bin/python}
exec "$py" -m megatron_cppo.cli train "$@"
