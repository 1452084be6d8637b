"""Test set-up. Without CUDA, every Triton kernel runs on CPU tensors through Triton's interpreter, so
TRITON_INTERPRET must be set before triton is first imported: here, before memops is imported."""

import os
import sys

import torch

# pytest-xdist's workers start with the working directory first on sys.path, where the repo's top-level
# kernels/ folder would shadow PyPI's `kernels` package (transformers imports it). memops is installed, so the
# working directory has nothing the tests need.
sys.path[:] = [entry for entry in sys.path if entry not in ("", os.getcwd())]
# The tests' own helper modules (engram_demo.py: the official demo's transcription) import by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI: 12 examples per property of the per-op test files (the fuzz modules draw at least 100 per op and
# backend in every profile) with a fixed seed (derandomized), so a run is reproducible and its time is
# bounded; ``--hypothesis-profile memops-long`` draws 300 per property, randomly, for local fuzzing.
settings.register_profile("memops", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("memops-long", max_examples=300, deadline=None, derandomize=False, print_blob=True)
settings.load_profile("memops")


# The suite's longest tests (tens of seconds each on 2 cores), started first: a long test that starts last keeps
# one xdist worker busy after the other has run out of work.
LONG_TESTS = (
    "test_gpu_check.py::test_ci_subset_compiles_clean_for_sm90", "test_cli.py::test_bench_quick_writes_table",
    "test_fuzz.py::test_fuzz_block_route_and_experts", "test_fuzz_new_surfaces.py::",
    "test_fuzz.py::test_fuzz_retention", "test_gpu_plan.py::", "test_memory_lm.py::test_ngram_demo",
    "test_memory_lm.py::test_demo",
)  # fmt: skip


def _start_rank(item) -> int:
    """Where a test starts: the long ones first, longest first; every other test after them, in file order."""
    return next((rank for rank, name in enumerate(LONG_TESTS) if name in item.nodeid), len(LONG_TESTS))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)
    items.sort(key=_start_rank)  # (a stable sort)


@pytest.fixture
def device() -> str:
    """Where the kernel tests run: the GPU when there is one, else the CPU through the interpreter."""
    return "cuda" if CUDA else "cpu"


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.uint8 else 255)

    return make


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like fill with NaN (ints with their max), so memory a kernel should have
    written but did not fails the comparison loudly (the fla habit)."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))


@pytest.fixture
def deterministic():
    """Turn on torch's deterministic-algorithms mode for one test, restoring the previous mode."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
