#!/usr/bin/env bash
# The GPU session's plans, each sized for one device call (at most 10 minutes; a lease is 15 minutes in all).
# Usage, from the repo root (OUT: the folder that comes back, at most 8 files of at most 16 MiB each):
#   bash benchmarks/gpu/run.sh [check]   # plan "check", <= 9 minutes: info compile tests sanitize bench
#   bash benchmarks/gpu/run.sh tune      # plan "tune", <= 9 minutes: the launch-table sweeps
#   bash benchmarks/gpu/run.sh rehearse  # plan "check" on a CPU machine: the interpreter, small shapes, < 3 minutes
#   bash benchmarks/gpu/run.sh STEP...   # single steps: info compile tests sanitize racecheck bench tune-attention
#                                        #   tune-gather tune-search tune-moe tune-engram
# Each step runs under `timeout -s INT` at its limit (SIGINT, so pytest and the bench print what they have; SIGKILL
# 15 s later), prints its budget first (counts and estimates: python -m memops.tools.gpu_plan budget; the table is
# in docs/testing.md, "The GPU run"), and records its exit status and seconds in device.txt. A failed install
# stops the plan; any other failed step fails the plan (exit 1) after the remaining steps have run.
# Files in $OUT after "check": device.txt (versions, budgets, step times, Triton cache hits and misses),
# tests.log, tests-at-scale.log, sanitize.log, bench.log, headline.jsonl (a line per result as it is measured),
# headline.md and extras.tar (the compile-ahead log, the tests' junit XML, the sanitized script's output,
# bench/<op>.json + png): 8 files.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
WORK=${MEMOPS_GPU_WORK:-$(mktemp -d /tmp/memops-gpu-run.XXXXXX)}
mkdir -p "$OUT" "$WORK"
plan=${*:-check}
case $plan in
  check) steps="info compile tests sanitize bench" ;;
  tune) steps="info tune-attention tune-gather tune-search tune-moe tune-engram" ;;
  rehearse) steps="info compile tests sanitize bench" ;;
  *) steps=$plan ;;
esac
known=" info compile tests sanitize racecheck bench tune-attention tune-gather tune-search tune-moe tune-engram "
for step in $steps; do
  if [[ $known != *" $step "* ]]; then
    echo "run.sh: unknown step or plan '$step'; plans: check tune rehearse; steps:$known" >&2
    exit 2
  fi
done
REHEARSE=${MEMOPS_REHEARSE:-0}  # 1: single steps as the rehearsal runs them
[[ $plan == rehearse ]] && REHEARSE=1
python=${PYTHON:-python3}
export OUT WORK REHEARSE python PYTHONUNBUFFERED=1
# The compile-ahead step's `memops gpu-check` pins Triton's FP-fusion default; the variable is part of Triton's
# cache key, so every step sets it too and its launches find what that step compiled.
export TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
# Triton's own file cache, counting each kernel lookup (hit or miss) into the step's log (not part of the key).
export TRITON_CACHE_MANAGER=memops.tools.triton_cache:CountingCacheManager
if ((REHEARSE)); then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
log() { echo "$*" | tee -a "$OUT/device.txt"; }
extras() { (cd "$WORK" && tar -rf "$OUT/extras.tar" "$@" 2>/dev/null) || true; }
# Every step's limit and budget line, read once from the committed benchmarks/gpu/budget.json (written by
# `python -m memops.tools.gpu_plan budget --write`; plain JSON, so nothing needs memops installed yet).
"$python" - benchmarks/gpu/budget.json >"$WORK/plan.tsv" <<'PLAN'
import json, sys
plan = json.load(open(sys.argv[1]))
for row in plan["check"]:
    print(f"{row['step']}\t{row['limit_s']}\tbudget {row['step']}: {row['count']}; estimate {row['estimate_s']} s, limit {row['limit_s']} s")
for step, seconds in plan["limits"].items():
    if step not in {row["step"] for row in plan["check"]}:
        print(f"{step}\t{seconds}\tlimit {seconds} s")
PLAN
limit() { awk -F'\t' -v s="$1" '$1 == s {print $2; found=1} END {if (!found) print 120}' "$WORK/plan.tsv"; }
budget_line() { awk -F'\t' -v s="$1" '$1 == s {print $3}' "$WORK/plan.tsv"; }
failed=""

run_step() {  # run_step NAME: the step's commands under its limit, with its time and status in device.txt
  local step=$1 seconds start rc
  seconds=$(limit "$step")
  log "=== $step $(date +%T): $(budget_line "$step")"
  export MEMOPS_TRITON_CACHE_LOG="$WORK/cache-$step.log"
  start=$(date +%s)
  timeout -s INT -k 15 "$seconds" bash -c "step_$step"
  rc=$?
  log "--- $step: exit $rc in $(($(date +%s) - start)) s"
  [[ $rc -ne 0 ]] && failed="$failed $step"
  return $rc
}

step_info() {
  if ((!REHEARSE)); then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/device.txt"
  else
    log "no GPU: $(nproc) cores, $(uname -m) (a rehearsal)"
  fi
  # The image's own setuptools builds the package (no network). One older than 77 does not read the SPDX
  # license string: retry once with the older table form, in this copy of the tree only.
  install() {
    "$python" -m pip install -q --no-build-isolation --no-deps --no-index --disable-pip-version-check -e . \
      >>"$WORK/install.log" 2>&1
  }
  install || {
    log "install failed ($(tail -1 "$WORK/install.log")); retrying with the pre-SPDX license table"
    sed -i -e 's/^license = "Apache-2.0".*/license = { text = "Apache-2.0" }/' \
      -e 's/^requires = \["setuptools>=77"\]/requires = ["setuptools>=64"]/' pyproject.toml
    install
  } || { log "install FAILED: $(tail -3 "$WORK/install.log" | tr '\n' ' ')"; return 1; }
  "$python" -c "import torch, triton, memops; print('torch', torch.__version__, 'triton', triton.__version__, 'memops', memops.__version__, 'cores', __import__('os').cpu_count())" | tee -a "$OUT/device.txt"
}

step_compile() {
  # The Triton variants of the headline cases, compiled for sm_90 on every core into TRITON_CACHE_DIR, then the
  # sanitizer's cases run once each in parallel (their own launches: the same keys the sanitized run looks up).
  # The tests compile their own variants on 16 xdist workers. The rehearsal counts the variants at the small
  # shapes, compiles two kernels' for real, warms two sanitizer cases (interpreted: nothing to cache) and runs
  # the compiled baselines' warm-up processes.
  local jobs rc=0; jobs=$(nproc)
  if ((REHEARSE)); then
    env -u TRITON_INTERPRET "$python" -m memops.tools.gpu_check --count --headline --small >>"$WORK/compile.log" 2>&1 \
      || rc=1
    env -u TRITON_INTERPRET "$python" -m memops.tools.gpu_check --warm-cache --headline --small --jobs "$jobs" \
      --kernel weighted_gather_fwd_kernel --kernel engram_gate_fwd_kernel >>"$WORK/compile.log" 2>&1 || rc=1
    "$python" -m memops.benchmarks.gpu_sanitize --warm "$jobs" --case engram --case retention_cache >>"$WORK/compile.log" 2>&1 || rc=1
    # (the processes and calls of the warm-up, without inductor's CPU compiles: the bench step compiles them)
    TORCHDYNAMO_DISABLE=1 "$python" -m memops.tools.cli bench --headline --rehearse --warm-compiled "$jobs" \
      >>"$WORK/compile.log" 2>&1 || rc=1
  else
    # a variant that fails to compile is reported in the log; the warm-ups go on (their launches compile it)
    "$python" -m memops.tools.gpu_check --warm-cache --headline --jobs "$jobs" >>"$WORK/compile.log" 2>&1 || rc=1
    # side by side: the sanitizer's cases once each, and every torch.compile baseline once (inductor's caches);
    # a background job ignores the step's SIGINT, so it is ended with the step
    "$python" -m memops.benchmarks.gpu_sanitize --warm 8 >"$WORK/compile-sanitizer.log" 2>&1 &
    sanitizer=$!
    trap 'kill $sanitizer 2>/dev/null; cat "$WORK/compile-sanitizer.log" "$WORK/compile-baselines.log" >>"$WORK/compile.log" 2>/dev/null; extras compile.log' EXIT
    "$python" -m memops.tools.cli bench --headline --warm-compiled 8 >"$WORK/compile-baselines.log" 2>&1 || rc=1
    wait "$sanitizer" || rc=1
    trap - EXIT
    cat "$WORK/compile-sanitizer.log" "$WORK/compile-baselines.log" >>"$WORK/compile.log"
  fi
  extras compile.log
  grep -E "^compile ahead|variants of|warm: [0-9]+ cases|: error|Error" "$WORK/compile.log" | head -20
  echo "compiled baselines warmed: $(grep -c "warm compiled" "$WORK/compile.log")"
  return "$rc"
}

step_tests() {
  # Every CUDA-marked test. Those marked at_scale (tens of GB each) run one at a time in a process of their own,
  # beside the rest on the other cores (one xdist worker each), so the GPU's memory is never oversubscribed.
  # Output goes to the files as it runs (no pipe: the step's SIGINT reaches the whole process group, and pytest
  # must still print its summary).
  local timeout_flag="" rc=0
  "$python" -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout=100"
  if ((REHEARSE)); then  # (the two collections side by side: one per core)
    "$python" -m pytest tests -m "cuda and not at_scale" --collect-only -q -n 0 >"$OUT/tests.log" 2>&1 &
    local collecting=$!
    "$python" -m pytest tests -m "cuda and at_scale" --collect-only -q -n 0 >"$OUT/tests-at-scale.log" 2>&1 || rc=1
    wait "$collecting" || rc=1
    tail -q -n 1 "$OUT/tests.log" "$OUT/tests-at-scale.log"
    grep -q "tests collected" "$OUT/tests.log" && grep -q "tests collected" "$OUT/tests-at-scale.log" || rc=1
    return "$rc"
  fi
  # shellcheck disable=SC2086
  "$python" -m pytest tests -m "cuda and at_scale" -n 0 $timeout_flag -rfE --junitxml "$WORK/tests-at-scale.xml" \
    >"$OUT/tests-at-scale.log" 2>&1 &
  local at_scale=$!
  # shellcheck disable=SC2086
  "$python" -m pytest tests -m "cuda and not at_scale" -n "$(($(nproc) - 1))" $timeout_flag -rfE \
    --junitxml "$WORK/tests.xml" >"$OUT/tests.log" 2>&1 || rc=1
  wait "$at_scale" || rc=1
  extras tests.xml tests-at-scale.xml
  tail -q -n 2 "$OUT/tests.log" "$OUT/tests-at-scale.log"
  return "$rc"
}

step_sanitize() {
  # memcheck over one awkward case per kernel (memops.benchmarks.gpu_sanitize fails when a kernel did not launch);
  # without PyTorch's caching allocator, so an overrun lands outside any allocation where memcheck sees it.
  if ((REHEARSE)); then
    "$python" -m memops.benchmarks.gpu_sanitize --device cpu --jobs "$(nproc)" >"$WORK/sanitize-run.log" 2>&1
    local rc=$?
    { echo "rehearsal: no compute-sanitizer; the cases ran through the interpreter (exit $rc)"; tail -2 "$WORK/sanitize-run.log"; } >"$OUT/sanitize.log"
  else
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --log-file "$OUT/sanitize.log" \
      "$python" -m memops.benchmarks.gpu_sanitize >"$WORK/sanitize-run.log" 2>&1
    local rc=$?
    if grep -q "Device not supported" "$OUT/sanitize.log" 2>/dev/null; then
      # gVisor machines refuse the tool (docs of the device tool): the cases still run, without memcheck
      echo "compute-sanitizer: Device not supported on this machine; the cases ran without memcheck" >>"$OUT/sanitize.log"
      "$python" -m memops.benchmarks.gpu_sanitize >>"$WORK/sanitize-run.log" 2>&1
      rc=3
    fi
  fi
  extras sanitize-run.log
  tail -3 "$OUT/sanitize.log"
  return "$rc"
}

step_racecheck() {
  local cases; cases=$("$python" -c "from memops.benchmarks.gpu_sanitize import RACECHECK; print(' '.join('--case ' + c for c in RACECHECK))")
  # shellcheck disable=SC2086
  compute-sanitizer --tool racecheck --error-exitcode 1 --log-file "$OUT/racecheck.log" \
    "$python" -m memops.benchmarks.gpu_sanitize $cases >"$WORK/racecheck-run.log" 2>&1
}

step_bench() {
  # The headline list: ceilings, a warm-up pass, then the timed pass appending headline.jsonl case by case; it
  # stops warming compiled baselines when its deadline nears. bench/ (per-op JSON and plots) goes into extras.tar.
  local flags="" seconds; seconds=$(limit bench)
  ((REHEARSE)) && flags="--rehearse"
  # shellcheck disable=SC2086
  "$python" -m memops.tools.cli bench --headline $flags --deadline $((seconds - 20)) --out "$OUT" >"$OUT/bench.log" 2>&1
  local rc=$?
  [[ -d $OUT/bench ]] && (cd "$OUT" && tar -rf extras.tar bench && rm -rf bench)
  tail -2 "$OUT/bench.log"
  return "$rc"
}

tune_sweep() {  # tune_sweep MODULE NAME PROCESSES: compile every config in PROCESSES processes, then time them all
  local module=$1 name=$2 processes=$3 index pids=()
  for ((index = 0; index < processes; index++)); do
    "$python" -m "memops.benchmarks.$module" --compile-only "$index/$processes" >"$WORK/tune-$name-compile-$index.log" 2>&1 &
    pids+=($!)
  done
  # background jobs ignore the step's SIGINT: ended with the step
  trap 'kill ${pids[*]} 2>/dev/null' EXIT
  wait "${pids[@]}"
  trap - EXIT
  "$python" -m "memops.benchmarks.$module" --out "$WORK" >"$OUT/tune-$name.log" 2>&1
}
# (processes per sweep: the gather's MLaS tables take 8 GB each)
step_tune-attention() { tune_sweep tune_attention attention 16; }
step_tune-gather() { tune_sweep tune_product_key gather 4; }
step_tune-search() { tune_sweep tune_product_key_search search 16; }
step_tune-moe() { tune_sweep tune_moe moe 8; }
step_tune-engram() { tune_sweep tune_engram engram 8; }

export -f log extras limit budget_line tune_sweep step_info step_compile step_tests step_sanitize step_racecheck step_bench \
  step_tune-attention step_tune-gather step_tune-search step_tune-moe step_tune-engram
: >"$OUT/device.txt"
log "plan: $plan ($steps) $(date -u +%FT%TZ); work folder $WORK; triton cache $TRITON_CACHE_DIR"
for step in $steps; do
  run_step "$step" || { [[ $step == info ]] && { log "plan stopped: the install failed"; exit 1; }; }
done
if [[ $plan == tune ]]; then  # the sweeps' chosen configs, as patch-ready tables, in one file
  cat "$WORK"/tune-*.md >"$OUT/tune-tables.md" 2>/dev/null
  (cd "$WORK" && tar -cf "$OUT/tune.tar" ./*.json 2>/dev/null) || true
fi
# Triton's cache lookups, per step and for the run (memops' kernels apart from torch.compile's)
cat "$WORK"/cache-*.log >"$WORK/cache-run.log" 2>/dev/null
(cd "$WORK" && "$python" -m memops.tools.triton_cache $(ls cache-*.log 2>/dev/null | grep -v cache-run) cache-run.log) \
  | tee -a "$OUT/device.txt"
if [[ $plan == check || $plan == rehearse ]]; then
  "$python" -m memops.tools.gpu_plan check-outputs "$OUT" | tee -a "$OUT/device.txt"
  [[ ${PIPESTATUS[0]} -ne 0 ]] && failed="$failed outputs"
fi
log "plan $plan: $([[ -n $failed ]] && echo "FAILED:$failed" || echo ok) ($(ls "$OUT" | wc -l) files in $OUT)"
[[ -z $failed ]]
