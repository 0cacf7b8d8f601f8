#!/usr/bin/env bash
# The accelerator measurements of docs/benchmarks.md as one command, for a single-GPU machine
# whose Python already has jax[cuda], flax's dependencies, optax and torch (no network needed).
# Pure-Python pieces it lacks can travel as wheels in .whl/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       flax==0.12.8 ml_collections==1.1.0 segment-anything==1.0
# Usage: OUT=/some/dir bash benchmarks/accelerator_run.sh        (at most 9 minutes: the timeouts)
#        ALL=1 OUT=/some/dir bash benchmarks/accelerator_run.sh  (at most 19 minutes)
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
# STEP_ARGS go to every train_step.py call (e.g. "--sam tiny --frame 128" for a dry run on a CPU).
# One compilation cache for the calls: a second run on the same machine skips the compiles.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/samref_jax_cache}
step() {  # step NAME TIMEOUT ARGS...: one train_step.py call, its output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  # shellcheck disable=SC2086
  timeout "$limit" python3 benchmarks/train_step.py $STEP_ARGS "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "$name rc=$?"
}
# On the H200, each whole step compiles in about a minute (autotuning included) and counting
# model FLOPs (lowering each part for the CPU) adds up to a minute; the timeouts allow for both.
# 1. The vit_b recipe's step at its batch (4 images per device), part by part: the cached-
#    embedding step first, then traced (where the device's time goes; the trace and the step's
#    optimised HLO come back in $OUT), the parts, the step with the encoder in it; images/s, MFU.
step train_step "${STEP_TIMEOUT:-330}" --batch 4 --profile /tmp/samref_prof
cp "$(ls /tmp/samref_prof/plugins/profile/*/*.trace.json.gz 2>/dev/null | tail -1)" \
  "$OUT/cached_b4.trace.json.gz" 2>/dev/null
cp /tmp/samref_prof/cached_step.hlo.txt.gz "$OUT/" 2>/dev/null
# 2. More images per device: how images/s grows with the batch (no FLOP count: it scales with
#    the batch, so MFU follows from step 1's count).
for b in ${SWEEP_BATCHES:-32}; do
  step "train_step_cached_b$b" "${SWEEP_TIMEOUT:-200}" --parts cached --batch "$b" --flops 0
done
# 2b. With REMAT=1, the recipe batch's cached step without remat and with the dots_saveable
#     policy: whether recomputing each round's forward pays on this device (on a CPU it does).
if [ "${REMAT:-0}" = 1 ]; then
  step train_step_cached_b4_remat0 "${SWEEP_TIMEOUT:-200}" --parts cached --batch 4 --flops 0 --remat 0
  step train_step_cached_b4_dots "${SWEEP_TIMEOUT:-200}" --parts cached --batch 4 --flops 0 \
    --remat-policy dots_saveable
fi
# 3. With ALL=1, also: the encoder, one click and SAM parity (accelerator.py), SAM's decoder
#    alone, and the SAM latency peer.
if [ "${ALL:-0}" = 1 ]; then
  timeout "${ACCEL_TIMEOUT:-330}" python3 benchmarks/accelerator.py 2>&1 | tee "$OUT/accelerator.txt"
  echo "accelerator rc=$?"
  timeout "${STEP_SAM_TIMEOUT:-150}" python3 benchmarks/train_step.py --batch 4 --mode sam 2>&1 \
    | tee "$OUT/train_step_sam.txt"
  echo "train_step_sam rc=$?"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout "${LATENCY_TIMEOUT:-150}" \
    python3 benchmarks/sam_latency.py --torch-device cuda --runs 10 --decoder-runs 50 2>&1 \
    | tee "$OUT/sam_latency_gpu.txt"
  echo "sam_latency rc=$?"
fi
