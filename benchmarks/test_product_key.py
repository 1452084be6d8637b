"""pytest-benchmark view of benchmarks/product_key.py: ``pytest benchmarks/ --benchmark-only``.

The quick cases of this device, every provider. `memops bench` gives the same timings as a table with
GB/s, the fraction of copy bandwidth, and the speedups against the baselines."""
import pytest
import torch

from memops.benchmarks import product_key as suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JOBS = [
    pytest.param(case, provider, id=f"{case.name}-{case.mode}-{provider}")
    for case in suite.cases(DEVICE, quick=True)
    for provider in suite.providers(case, DEVICE)
]


@pytest.mark.parametrize("case, provider", JOBS)
def test_weighted_gather(benchmark, case, provider):
    call = suite.providers(case, DEVICE)[provider](suite.make_inputs(case, DEVICE, seed=0))

    def run():
        call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case.params, mode=case.mode, device=DEVICE)
    benchmark(run)
