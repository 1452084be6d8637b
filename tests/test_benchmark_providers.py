"""Every benchmark provider, including the CUDA-only ones, runs once on CPU at the quick shapes: the GPU
benchmark run must not be the first to execute this code. The memops providers run on backend "reference"
here (the kernels at these shapes would take minutes in the interpreter; the op tests cover them)."""

import pytest
import torch

import memops
from memops.tools import benchmarking

JOBS = [
    pytest.param(op, case, provider, id=f"{op}-{case.name}-{case.mode}-{provider}")
    for op in benchmarking.BENCHMARKS
    for case in benchmarking.load(op).cases("cpu", quick=True)
    for provider in benchmarking.load(op).providers(case, "cuda")
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark run itself executes these")
@pytest.mark.parametrize("op, case, provider", JOBS)
def test_provider_runs(op, case, provider):
    suite = benchmarking.load(op)
    build = suite.providers(case, "cuda")[provider]
    with memops.backend("reference"):
        call = build(suite.make_inputs(case, "cpu", seed=0))
        if provider == "flex_attention" and case.mode != "fwd":
            with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
                call()  # FlexAttention's backward is GPU-only; its forward ran in the fwd case
            return
        if provider == "flash_varlen":  # FlashAttention's varlen op is CUDA-only; the memory rows were built
            with pytest.raises(NotImplementedError, match="_flash_attention_forward"):
                call()
            return
        call()


EQUIVALENT_JOBS = [
    pytest.param(op, case, name, id=f"{op}-{case.name}-{case.mode}-{name}")
    for op in benchmarking.BENCHMARKS
    for case in benchmarking.load(op).cases("cpu", quick=True)
    if case.mode in ("fwd", "evict")
    for name in getattr(benchmarking.load(op), "EQUIVALENT", ())
    if name in benchmarking.load(op).providers(case, "cpu")  # (as cpu_ratio.py: the formulations a case has)
]


@pytest.mark.parametrize("op, case, name", EQUIVALENT_JOBS)
def test_cpu_ratio_formulations_compute_the_reference(op, case, name):
    # benchmarks/cpu_ratio.py holds each reference to these formulations: they must be the same op.
    from memops.benchmarks.cpu_ratio import REFERENCE, check_same_op, tensor_leaves

    suite = benchmarking.load(op)
    built = suite.providers(case, "cpu")
    expected = built[REFERENCE](suite.make_inputs(case, "cpu", seed=0))()
    check_same_op(op, name, expected, built[name](suite.make_inputs(case, "cpu", seed=0))())
    with pytest.raises(AssertionError, match="does not compute"):  # the check can fail
        check_same_op(op, name, expected, [leaf + 1 for leaf in tensor_leaves(expected)])


def test_one_list_of_benchmark_modules():
    """memops/benchmarks/__init__.py's MODULES is the one list: every benchmark module (a file there with
    ``cases``) is in it, under its own OP, with its compile scenarios; BENCHMARKS and gpu-check's FAMILIES
    are derived from it."""
    import importlib
    import pathlib

    from memops.benchmarks import MODULES
    from memops.tools import gpu_check

    folder = pathlib.Path(importlib.import_module("memops.benchmarks").__file__).parent
    with_cases = {
        path.stem
        for path in folder.glob("*.py")
        if "\ndef cases(" in path.read_text() and not path.stem.startswith("_")
    }
    assert with_cases == set(MODULES)
    for module, (op, family) in MODULES.items():
        loaded = importlib.import_module(f"memops.benchmarks.{module}")
        assert loaded.OP == op and callable(loaded.compile_scenarios), module
        assert benchmarking.BENCHMARKS[op] == module and family in gpu_check.FAMILIES
    assert len(benchmarking.BENCHMARKS) == len(MODULES)
