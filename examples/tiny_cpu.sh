#!/usr/bin/env bash
# The built-in default run on a CPU machine: CPPO on gloo ranks (needs the rollout and data
# packages; without them the trainer stops with an error naming what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONWARNINGS="ignore::UserWarning"
exec .venv/bin/torchrun --nproc-per-node 4 -m megatron_cppo.train \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --micro-batch-size 2 --global-batch-size 20 --train-iters 20 "$@"
