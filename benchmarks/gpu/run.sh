#!/usr/bin/env bash
# The GPU session's plans, each sized for one device call (at most 10 minutes; a lease is 15 minutes in all).
# Usage on the GPU machine (run from the repo root; OUT is the folder that comes back, at most 8 files):
#   bash benchmarks/gpu/run.sh            # plan "check": <= 9 minutes, 6 files
#   bash benchmarks/gpu/run.sh tune       # plan "tune": the tuning sweeps (a second call)
#   bash benchmarks/gpu/run.sh STEP...    # single steps: info tests sanitize bench tune-attention tune-gather tune-search
# Plan "check", with a time limit per step so one slow step cannot eat the next one's share:
#   info      30 s  device, versions, install (editable, no deps: the machine has no network)
#   tests    240 s  every CUDA-marked test of every family, in parallel (pytest-xdist, one worker per core)
#   sanitize 120 s  compute-sanitizer memcheck on one awkward case per kernel (benchmarks/gpu/sanitize.py)
#   bench    120 s  every family's headline cases against its baselines (memops bench --quick on CUDA: the small
#                   cases plus each family's CUDA headline shape)
# Files in $OUT: device.txt cuda-tests.log sanitize.log bench.log and the bench JSON/markdown (bench/ is
# tarred into one file so the count stays under 8).
# Env: TRITON_CACHE_DIR: a Triton 3.6 cache compiled ahead of time for sm_90 (see docs/testing.md); the info step
# counts its entries before and after, so the log says whether launches hit it.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
plan=${*:-check}
case $plan in
  check) steps="info tests sanitize bench" ;;
  tune) steps="info tune-attention tune-gather tune-search" ;;
  *) steps=$plan ;;
esac
cache_entries() { find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.cubin' 2>/dev/null | wc -l; }
for step in $steps; do
  echo "=== $step $(date +%T)" | tee -a "$OUT/device.txt"
  case $step in
    info)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/device.txt"
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
      timeout 60 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
      echo "triton cache ${TRITON_CACHE_DIR:-default}: $(cache_entries) cubins before" | tee -a "$OUT/device.txt" ;;
    tests)
      timeout 240 python3 -m pytest tests -m cuda -q -n "$(nproc)" -p no:cacheprovider 2>&1 | tail -40 > "$OUT/cuda-tests.log"
      tail -3 "$OUT/cuda-tests.log" ;;
    sanitize)
      timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/gpu/sanitize.py 2>&1 | tail -8 > "$OUT/sanitize.log"
      tail -3 "$OUT/sanitize.log" ;;
    bench)
      timeout 120 memops bench --quick --out "$OUT/bench" 2>&1 | grep -v "^\[" > "$OUT/bench.log"
      tar -C "$OUT" -czf "$OUT/bench.tgz" bench && rm -rf "$OUT/bench"
      tail -5 "$OUT/bench.log" ;;
    tune-attention) timeout 200 python3 -m memops.benchmarks.tune_attention --out "$OUT" 2>&1 | tail -30 > "$OUT/tune-attention.log" ;;
    tune-gather) timeout 150 python3 -m memops.benchmarks.tune_product_key --out "$OUT" 2>&1 | tail -30 > "$OUT/tune-gather.log" ;;
    tune-search) timeout 150 python3 -m memops.benchmarks.tune_product_key_search --out "$OUT" 2>&1 | tail -30 > "$OUT/tune-search.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "triton cache: $(cache_entries) cubins after" | tee -a "$OUT/device.txt"
