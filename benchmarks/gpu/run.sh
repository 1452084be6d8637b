#!/usr/bin/env bash
# One device call: install, CUDA tests, compute-sanitizer, tuning sweep, full benchmark. At most 8 files come
# back from $OUT, so logs are combined.
# Usage on the GPU machine: bash benchmarks/gpu/run.sh [steps...]  (steps: tests sanitize tune tune-search bench)
# Env: TEST_FILES (default tests/test_*.py), TEST_TIMEOUT (per file, default 240 s), BENCH_OP (one op).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-tests sanitize tune bench}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
for step in $steps; do
  echo "=== $step"
  case $step in
    tests)  # one pytest per file, so a slow compile in one cannot starve the others of the call's time
      # TEST_FILES picks a subset when one device call cannot run them all (each call has 10 minutes)
      for f in ${TEST_FILES:-tests/test_*.py}; do
        echo "--- $f" | tee -a "$OUT/cuda-tests.log"
        timeout "${TEST_TIMEOUT:-240}" python3 -m pytest "$f" -q 2>&1 | tee -a "$OUT/cuda-tests.log" | tail -3
      done ;;
    sanitize) compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/gpu/sanitize.py 2>&1 | tail -8 | tee "$OUT/sanitize.log" ;;
    tune) python3 -m memops.benchmarks.tune_product_key --out "$OUT" 2>&1 | tee "$OUT/tune.log" ;;
    tune-search) python3 -m memops.benchmarks.tune_product_key_search --out "$OUT" 2>&1 | tee "$OUT/tune-search.log" ;;
    bench) memops bench ${BENCH_OP:+--op $BENCH_OP} --out "$OUT" 2>&1 | tee "$OUT/bench-${BENCH_OP:-all}.log" | grep -v "^\[" ;;
  esac
done
