"""What ``memops gpu-check`` compiles: each benchmark module's ``compile_scenarios(dtype, subset)`` (the
launches its op makes at the module's CUDA cases, on meta tensors), and the helpers those functions share.

A scenario function yields ``(label, thunk)`` pairs; gpu-check runs each thunk under
:func:`memops.tools.gpu_check.recording` for every dtype class and target, so nothing launches and what it
records is exactly what the launchers pass. ``dtype`` is "bf16", "fp16", "fp32" (ieee dots) or "tf32";
``subset`` asks for the CI subset (fewer cases and paths).

This module imports nothing of memops.tools or memops.benchmarks at its top, so benchmark modules and
gpu-check may both import it.
"""

from __future__ import annotations

import importlib

import torch

HEAD_DIMS = (64, 128, 256)

# While gpu-check's headline run is on: benchmark module -> the cases of the headline list, which then replace
# each module's CUDA cases as the scenarios' shapes (memops.tools.gpu_check.headline_source).
CASE_SOURCE: list[dict] = []


def headline_run() -> bool:
    """Whether the scenarios record only the headline benchmark's cases."""
    return bool(CASE_SOURCE)


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def torch_dtype(dtype: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[dtype]


def cases(module: str, subset: bool = False, keep=None) -> list:
    """The CUDA benchmark cases of a benchmark module (the headline ones in a headline run), one per distinct
    params (fwd and fwd+bwd share); with ``subset``, only those ``keep(case)`` accepts."""
    seen, out = set(), []
    if CASE_SOURCE:
        module_cases = CASE_SOURCE[-1].get(module, [])
    else:
        module_cases = importlib.import_module(f"memops.benchmarks.{module}").cases("cuda", False)
    for case in module_cases:
        key = tuple(sorted(case.params.items()))
        if key not in seen and (not subset or keep is None or keep(case)):
            seen.add(key)
            out.append(case)
    return out


def cases_by_head_dim(module: str, subset: bool, subset_case: str):
    """(case, params, head dim) of a benchmark module's CUDA cases at every head dim; the subset keeps one case
    at its own head dim, as does a headline run."""
    for case in cases(module, subset, keep=lambda case: case.name == subset_case):
        for D in (case.params["D"],) if subset or CASE_SOURCE else HEAD_DIMS:
            yield case, case.params, D
