"""Backend selection, packaging, and the guarantees around them."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import memops
import memops.testing
from memops._backend import resolve_backend


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    # A neutral cwd, so nothing is importable just because the repo root is the working directory.
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd="/")


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("MEMOPS_BACKEND", raising=False)
    assert memops.get_backend() == "auto"
    assert resolve_backend(torch.zeros(1)) == "reference"  # CPU tensor under auto


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda(monkeypatch):
    monkeypatch.delenv("MEMOPS_BACKEND", raising=False)
    assert resolve_backend(torch.zeros(1, device="cuda")) == "triton"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("MEMOPS_BACKEND", "reference")
    assert memops.get_backend() == "reference"
    monkeypatch.setenv("MEMOPS_BACKEND", "Triton")
    assert memops.get_backend() == "triton"


def test_environment_variable_unknown_name(monkeypatch):
    monkeypatch.setenv("MEMOPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MEMOPS_BACKEND.*auto, triton, reference"):
        memops.get_backend()


def test_context_manager_overrides_env_nests_and_restores(monkeypatch):
    monkeypatch.setenv("MEMOPS_BACKEND", "triton")
    with memops.backend("reference"):
        assert memops.get_backend() == "reference"
        with memops.backend("auto"):
            assert memops.get_backend() == "auto"
        assert memops.get_backend() == "reference"
    assert memops.get_backend() == "triton"


def test_context_manager_restores_on_exception(monkeypatch):
    monkeypatch.delenv("MEMOPS_BACKEND", raising=False)
    with pytest.raises(KeyError):
        with memops.backend("reference"):
            raise KeyError("boom")
    assert memops.get_backend() == "auto"


def test_context_manager_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*auto, triton, reference"):
        with memops.backend("fast"):
            pass


def test_context_manager_is_per_thread(monkeypatch):
    monkeypatch.delenv("MEMOPS_BACKEND", raising=False)
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = memops.get_backend()
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with memops.backend("reference"):
        inside.set()
        release.wait(timeout=10)
    worker.join()
    assert seen["other"] == "auto"


def test_reference_backend_runs_no_kernel():
    values, indices, weights = torch.randn(8, 4), torch.randint(0, 8, (3, 2)), torch.randn(3, 2)
    with memops.backend("reference"), memops.testing.count_launches() as launches:
        memops.weighted_gather(values, indices, weights)
    assert sum(launches.values()) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_explicit_triton_on_cpu_without_interpreter_raises():
    result = _run_python(
        "import torch, memops\n"
        "with memops.backend('triton'):\n"
        "    memops.weighted_gather(torch.randn(4, 2), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))\n",
        TRITON_INTERPRET="0",
    )
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_explicit_triton_without_triton_raises():
    # triton made unimportable for this process: `import memops` works, the reference works, and an
    # explicit request for triton is a clear RuntimeError rather than a silent fallback.
    result = _run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, memops\n"
        "args = (torch.randn(4, 2), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))\n"
        "print(memops.weighted_gather(*args).shape)\n"
        "with memops.backend('triton'):\n"
        "    memops.weighted_gather(*args)\n",
    )
    assert "torch.Size([1, 2])" in result.stdout, result.stderr
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "triton cannot be imported" in result.stderr


def test_kernels_ship_as_memops_kernels_only():
    result = _run_python(
        "import importlib.util, pathlib, memops, memops.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = pathlib.Path(memops.kernels.__file__).parent\n"
        "print('top-level:', spec is not None and pathlib.Path(spec.origin).parent == ours)\n"
        "print('memops.kernels:', (ours / 'product_key.py').exists())\n"
    )
    assert result.returncode == 0, result.stderr
    assert "top-level: False" in result.stdout
    assert "memops.kernels: True" in result.stdout
