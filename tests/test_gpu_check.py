"""The ahead-of-time GPU compile check (memops.tools.gpu_check) catches what the interpreter lets through.

The check compiles for real GPU targets, so it runs in a subprocess without TRITON_INTERPRET (the suite's
conftest sets it for this process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BROKEN_KERNELS = textwrap.dedent("""
    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def reassigned_constexpr_kernel(x_ptr, BLOCK: tl.constexpr):
        for i in tl.static_range(2):
            width: tl.constexpr = BLOCK * (i + 1)   # assigned twice: no GPU compiler accepts it
            offs = tl.arange(0, width)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs))


    @triton.jit
    def too_much_shared_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            a = tl.load(a_ptr + offs[:, None] * K + k0 + offs[None, :])
            b = tl.load(b_ptr + (k0 + offs[:, None]) * BLOCK + offs[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


    def launch_all():
        x = torch.empty(64, dtype=torch.float32, device="meta")
        reassigned_constexpr_kernel[(1,)](x, BLOCK=16)
        a = torch.empty(256, 4096, dtype=torch.bfloat16, device="meta")
        too_much_shared_kernel[(1,)](a, a, x, 4096, BLOCK=256, num_warps=8, num_stages=4)
""")

DRIVER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import broken_kernels
    from memops.tools import gpu_check
    with gpu_check.recording() as launches:
        broken_kernels.launch_all()
    rows = [gpu_check.compile_variant(gpu_check.Variant("test", l.kernel.__name__, 90, "bf16", ["test"], {}, "", l))
            for l in launches]
    print(json.dumps([dict(kernel=r["kernel"], ok=r["ok"], error=r["error"], problems=r["problems"]) for r in rows]))
""")


def _check_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_check_catches_reassigned_constexpr_and_shared_memory_over_the_limit(tmp_path: Path):
    (tmp_path / "broken_kernels.py").write_text(BROKEN_KERNELS)
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, env=_check_env(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    reassigned = rows["reassigned_constexpr_kernel"]
    assert not reassigned["ok"] and "constexpr cannot be reassigned" in reassigned["error"]
    assert reassigned["problems"][0].startswith("compile error")
    shared = rows["too_much_shared_kernel"]
    assert shared["ok"], shared["error"]
    assert any("shared memory" in p and "over the" in p for p in shared["problems"]), shared["problems"]


# .ci/run installs Triton 3.6.0 (the GPU machine's) in a second venv and names its python here, so the check
# also runs under the GPU's compiler version.
PYTHONS = [sys.executable] + (
    [os.environ["MEMOPS_TRITON36_PYTHON"]] if os.environ.get("MEMOPS_TRITON36_PYTHON") else []
)


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-triton" if p == sys.executable else "triton36")
def test_ci_subset_compiles_clean_for_sm90(python, tmp_path: Path):
    """The CI subset (every kernel once per code path in bf16 and once in fp32 and tf32, at the headline shapes,
    sm_90; in one process, as the suite's other worker has the second core) has no compile error, no shared
    memory over the limit, no spill and no 16-bit/tf32 dot off tensor cores outside gpu_check.ALLOWED; the three
    kernels built on memops.kernels.topk (search, block routing, cache eviction) are among them."""
    result = subprocess.run(
        [python, "-m", "memops.tools.gpu_check", "--subset", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_check_env(),
        timeout=900,
    )
    report = json.loads(next(tmp_path.glob("gpu-compile-triton*-subset.json")).read_text())
    failing = [
        (r["arch"], r["kernel"], r["dtype"], r["config"], r["problems"]) for r in report["rows"] if r["problems"]
    ]
    assert result.returncode == 0 and not failing, (failing, result.stderr[-2000:])
    compiled = {r["kernel"] for r in report["rows"] if r["ok"]}
    assert {"product_key_search_kernel", "block_route_kernel", "retention_select_kernel"} <= compiled
    assert len(compiled) >= 15, compiled  # every family's kernels, not an empty sweep
