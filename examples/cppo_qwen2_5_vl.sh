#!/usr/bin/env bash
# Convert -> train -> export for Qwen2.5-VL-3B or -7B on one or two 8 x H100 nodes.
#   SIZE=7B NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash examples/cppo_qwen2_5_vl.sh   (each node)
# HF_DIR: the Hugging Face checkpoint; DATA / VAL: ViRL39K-style parquet (verl schema).
set -euo pipefail
SIZE=${SIZE:-3B}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
HF_DIR=${HF_DIR:-Qwen2.5-VL-${SIZE}-Instruct}; DATA=${DATA:-virl39k_train.parquet}
VAL=${VAL:-val.parquet}; OUT=${OUT:-runs/cppo-${SIZE,,}}
CONFIG=examples/qwen2_5_vl_${SIZE,,}.yaml
TP=$(awk '/^tensor-model-parallel-size/{print $2}' "$CONFIG")
PP=$(awk '/^pipeline-model-parallel-size/{print $2}' "$CONFIG")
cd "$(dirname "$0")/.."
# 1. HF -> megatron at the training layout (once, on node 0)
if [ "$NODE_RANK" = 0 ] && [ ! -d "$OUT/start" ]; then
  megatron-cppo convert hf-to-megatron --hf-dir "$HF_DIR" --out "$OUT/start" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --dtype bf16
fi
# 2. train (resumes from $OUT/ckpt when it holds a checkpoint)
LOAD="$OUT/start"; [ -f "$OUT/ckpt/latest" ] && LOAD="$OUT/ckpt"
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m megatron_cppo.train \
  --config "$CONFIG" --hf-dir "$HF_DIR" --load "$LOAD" --save "$OUT/ckpt" \
  --save-interval 20 --data-path "$DATA" --val-data-path "$VAL" --tensorboard-dir "$OUT/tb" \
  --train-iters "${TRAIN_ITERS:-150}" "$@"
# 3. export the last checkpoint for serving (node 0)
if [ "$NODE_RANK" = 0 ]; then
  megatron-cppo convert megatron-to-hf --megatron-dir "$OUT/ckpt/$(cat "$OUT/ckpt/latest")" \
    --out "$OUT/hf"
fi
