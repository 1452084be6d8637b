"""pytest-benchmark view of the benchmark modules: ``pytest tests/benchmark_timings.py -n 0 --benchmark-only``
(not collected by the suite: its name does not start with ``test_``; ``-n 0`` because pytest-benchmark does not
time under xdist).

The quick cases of this device, every provider, every op. `memops bench` gives the same timings as a table
with GB/s, TFLOP/s, the fraction of copy bandwidth, and the speedups against the baselines."""

import pytest
import torch

from memops.tools import benchmarking

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JOBS = [
    pytest.param(op, case, provider, id=f"{op}-{case.name}-{case.mode}-{provider}")
    for op in benchmarking.BENCHMARKS
    for case in benchmarking.load(op).cases(DEVICE, quick=True)
    for provider in benchmarking.load(op).providers(case, DEVICE)
]


@pytest.mark.parametrize("op, case, provider", JOBS)
def test_benchmark(benchmark, op, case, provider):
    suite = benchmarking.load(op)
    call = suite.providers(case, DEVICE)[provider](suite.make_inputs(case, DEVICE, seed=0))

    def run():
        call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case.params, mode=case.mode, device=DEVICE)
    benchmark(run)
