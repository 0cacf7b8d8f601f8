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
# 1. The vit_b recipe's step at its batch (4 images per device), part by part: encoder in the
#    step vs cached embeddings, images/s, memory and MFU.
timeout "${STEP_TIMEOUT:-300}" python3 benchmarks/train_step.py --batch 4 2>&1 \
  | tee "$OUT/train_step.txt"
echo "train_step rc=$?"
# 2. The cached-embedding step at larger batches: how images/s scales with the batch.
for b in ${SWEEP_BATCHES:-16 32}; do
  timeout "${SWEEP_TIMEOUT:-120}" python3 benchmarks/train_step.py --parts cached --batch "$b" \
    2>&1 | tee "$OUT/train_step_cached_b$b.txt"
  echo "train_step cached batch $b rc=$?"
done
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
