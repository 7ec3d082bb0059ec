#!/usr/bin/env bash
# The GPU benchmark suite: one command, one H100/H200, meant to finish in under 6 minutes (each
# part runs under its own time limit; the limits add up to 570 s), one table per benchmark and a
# summary table.
#
#   benchmarks/gpu_suite.sh                  # on the GPU machine, from the repository root
#                                            # (device tool: carry .whl, timeout 600 s)
#   PYTHON=.venv/bin/python benchmarks/gpu_suite.sh --cpu-smoke   # the same code paths, tiny, CPU
#
# 0. GPU tests (pytest -m gpu): the flash / varlen attention kernels against the CPU path and the
#    compiled Triton loss head against the torch path; the numbers below mean nothing without them.
# 1. model step (benchmarks/model_step.py): Qwen2.5-VL-3B dimensions, bf16, random weights, 2
#    micro-batches of one 4096-token sequence with one 64x64-patch image (1024 image tokens),
#    padded and packed (cu_seqlens, varlen attention), against transformers' Qwen2.5-VL with sdpa
#    attention on the same micro-batches in the same run: time, tokens/s, MFU (dense bf16 peak,
#    989 TFLOPS for H100/H200 SXM) and peak memory.
# 2. 7B fit (benchmarks/model_step.py --memory-report): Qwen2.5-VL-7B dimensions, one packed
#    4096-token micro-batch with one 64x64-patch image, full recompute (every layer), megatron DDP
#    with fp32 gradient buffers as the trainer: weights + buffers and the step's peak measured,
#    Adam state and the reference model added from the parameter count; whether one 80 GB GPU
#    holds it, and the smallest distributed-optimizer sharding that does.
# 3. loss head (benchmarks/loss_head.py): CPPO's three passes fwd + bwd at T = 4096 and 16384, TP 1,
#    against the Megatron-style baseline and the HBM floor (a bf16 copy of the same logits).
#    The baseline needs ~94 GiB at T = 16384 and is skipped there (--max-gib-per-rank).
# Last, benchmarks/gpu_summary.py prints one table: every measure beside its target (MFU >= 40%,
# peak <= transformers', fits 80 GB, <= 1.5x the HBM floor, >= 10x the baseline), and the parts'
# exit statuses. The parts' JSON files, the summary and the console go to $OUT when set (the
# device machine sends that folder back), else to a fresh folder under /tmp (printed).
#
# The GPU machines have no megatron-core: the cp312 wheel travels in .whl/ (gitignored), fetched
# on a machine with pip access by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
# and is installed here into /tmp when `import megatron.core` fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
smoke=0
[ "${1:-}" = "--cpu-smoke" ] && smoke=1

if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  wheel=$(ls .whl/megatron_core-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    echo "megatron-core is not installed and no .whl/megatron_core-*.whl is here (see header)" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/megatron-core-site "$wheel"
  export PYTHONPATH=/tmp/megatron-core-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONWARNINGS=ignore OMP_NUM_THREADS=1

# On the device machine whatever is written under $OUT comes back: results and the console there.
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  results=$OUT
else
  results=$(mktemp -d /tmp/gpu_suite.XXXXXX)
fi
exec > >(tee -a "$results/gpu_suite.log") 2>&1
echo "results in $results"
: > "$results/parts.tsv"

# One benchmark per part; a failing or overrunning part is reported and the next one still runs
# (device time is scarce: one failure must not cost the other tables).
failed=()
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  echo "== $name"
  timeout "$limit" "$@" || rc=$?
  echo "== $name: exit status $rc, $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$results/parts.tsv"
  if [ "$rc" != 0 ]; then failed+=("$name (exit status $rc)"); fi
}
finish() {
  "$PYTHON" benchmarks/gpu_summary.py "$results" | tee "$results/summary.md" \
    || failed+=("summary")
  echo "== suite: $SECONDS s"
  if [ "${#failed[@]}" -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
  fi
  exit 0
}

full_recompute="--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
gpu_tests="tests/nn/test_attention.py tests/ops/test_triton_loss_head.py"
if [ "$smoke" = 1 ]; then  # the GPU tests are collected and skip here
  part "GPU tests (skip on CPU)" 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
  part "model step (tiny, CPU)" 600 "$PYTHON" benchmarks/model_step.py --cpu-smoke \
    --json "$results/model_step.json"
  part "7B fit path (tiny, CPU)" 300 "$PYTHON" benchmarks/model_step.py --layouts 1,1 --seq 64 \
    --image-patches 8,8 --batch 1 --num-mb 1 --forms packed $full_recompute --memory-report \
    --reps 1 --warmup 0 --json "$results/fit.json"
  part "loss head (CPU, Triton interpreted)" 300 env TRITON_INTERPRET=1 "$PYTHON" \
    benchmarks/loss_head.py --device cpu --tp 1 --tokens 128 --vocab 8192 \
    --variants cppo cppo_triton megatron copy --reps 1 --json "$results/loss_head.json"
  finish
fi

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
part "GPU tests" 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
part "model step 3B" 210 "$PYTHON" benchmarks/model_step.py --gpu --size 3B --seq 4096 \
  --image-patches 64,64 --batch 1 --num-mb 2 --forms padded packed --hf-baseline --reps 3 \
  --warmup 1 --json "$results/model_step.json"
part "7B fit" 120 "$PYTHON" benchmarks/model_step.py --gpu --size 7B --seq 4096 \
  --image-patches 64,64 --batch 1 --num-mb 1 --forms packed $full_recompute --memory-report \
  --reps 2 --warmup 1 --json "$results/fit.json"
part "loss head" 150 "$PYTHON" benchmarks/loss_head.py --device cuda --tp 1 --tokens 4096 16384 \
  --variants cppo cppo_triton megatron copy --reps 3 --max-gib-per-rank 70 \
  --json "$results/loss_head.json"
finish
