"""Product-key search benchmarks: memops.product_key_topk against the XLM-style PyTorch search.

Baselines, same run: ``xlm`` (two matmuls, topk, the k x k expand, topk: see
memops.benchmarks.product_key_memory.xlm_search) and ``xlm-compiled`` (the same under torch.compile).
TFLOP/s counts the two half-score matmuls (2 * T * Hm * n_keys * Dk); bytes are the queries and sub-keys
read and the (scores, indices) written, which the fused kernel is bound by only at tiny n_keys.
"""

from __future__ import annotations

import torch

import memops
from memops.benchmarks.product_key_memory import xlm_search
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, case_grid, random_source

OP = "product_key_topk"
METRIC = "flops"  # the plot's third panel: TFLOP/s
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("xlm", "xlm-compiled")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("xlm",)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(T=1024, heads=4, key_dim=64, n_keys=64, topk=16, dtype="float32")
    medium = dict(T=4096, heads=4, key_dim=128, n_keys=256, topk=32, dtype="float32")
    xlm = dict(T=8192, heads=4, key_dim=256, n_keys=512, topk=32, dtype="bfloat16")
    mlas = dict(T=8192, heads=4, key_dim=512, n_keys=1024, topk=32, dtype="bfloat16")
    return case_grid(
        device,
        quick,
        quick_cases=[("small", small)],
        full_cases=[("medium", medium)],
        cuda_quick=[("mlas", mlas)],
        cuda_full=[("xlm", xlm)],
    )


def make_inputs(case: Case, device: str, seed: int):
    p, _, generator, randn = random_source(case, device, seed)
    queries = randn(p["T"], p["heads"], p["key_dim"])
    sub_keys = randn(p["heads"], 2, p["n_keys"], p["key_dim"] // 2)
    grad_scores = torch.randn(p["T"], p["heads"], p["topk"], device=device, generator=generator)
    return queries, sub_keys, grad_scores, p["topk"]


def _build(search, mode: str):
    def build(inputs):
        queries, sub_keys, grad_scores, topk = inputs
        if mode == "fwd":
            return lambda: search(queries, sub_keys, topk)
        queries, sub_keys = queries.requires_grad_(), sub_keys.requires_grad_()

        def step():
            queries.grad = sub_keys.grad = None
            scores, _ = search(queries, sub_keys, topk)
            scores.backward(grad_scores.to(scores.dtype))

        return step

    return build


def providers(case: Case, device: str) -> dict:
    out = {"memops" if device == "cuda" else "memops-reference": _build(memops.product_key_topk, case.mode)}
    out["xlm"] = _build(xlm_search, case.mode)
    # Inductor on CPU compiles for tens of seconds per case; the quick CPU run leaves it out.
    if device == "cuda" or not case.quick:
        out["xlm-compiled"] = _build(torch.compile(xlm_search), case.mode)
    return out


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    forward = (p["T"] + 2 * p["n_keys"]) * p["heads"] * p["key_dim"] * item + p["T"] * p["heads"] * p["topk"] * 12
    return forward if mode == "fwd" else 3 * forward


def flops(case: Case, mode: str) -> float:
    p = case.params
    forward = 2.0 * p["T"] * p["heads"] * p["n_keys"] * p["key_dim"]
    # The backward touches only the k selected sub-key rows per half: tiny next to the search.
    return forward if mode == "fwd" else forward + 8.0 * p["T"] * p["heads"] * p["topk"] * p["key_dim"]


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import product_key as kernels
    from memops.product_key import search_backward

    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("product_key_search", subset, keep=lambda case: case.params["key_dim"] == 512):
        p = case.params

        def run(p=p):
            T, heads, key_dim, n_keys, topk = p["T"], p["heads"], p["key_dim"], p["n_keys"], p["topk"]
            queries, sub_keys = (
                scenarios.meta(T, heads, key_dim, dtype=dt),
                scenarios.meta(heads, 2, n_keys, key_dim // 2, dtype=dt),
            )
            if kernels.search_reference_instead(queries):  # the op's "auto" backend runs the reference here
                return
            kernels.product_key_search(queries, sub_keys, topk)
            indices = torch.randint(0, n_keys * n_keys, (T, heads, topk), dtype=torch.int64)
            search_backward(scenarios.meta(T, heads, topk, dtype=torch.float32), queries, sub_keys, indices)

        yield case.name, run
