#!/usr/bin/env bash
# The built-in default run on a CPU machine: 4 gloo ranks, tensor parallel 2 x pipeline parallel 2.
# Until the CPPO trainer lands, megatron_cppo.train trains the tiny toy GPT (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONWARNINGS="ignore::UserWarning"
exec .venv/bin/torchrun --nproc-per-node 4 -m megatron_cppo.train \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --micro-batch-size 2 --global-batch-size 16 --train-iters 20 "$@"
