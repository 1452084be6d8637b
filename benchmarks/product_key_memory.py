"""Product-key memory layer benchmarks: memops.nn.ProductKeyMemory against the XLM-style PyTorch layer.

Baselines, same run, same parameters: ``xlm`` (the formulation of XLM's HashingMemoryProductFast and Meta's
Memory Layers at Scale, batched over heads: two matmuls, topk, the k x k expand, topk, softmax,
F.embedding_bag) and ``xlm-compiled`` (the same under torch.compile). GB/s counts the bytes the value read
must move (T * heads * k table rows, plus the output), so "% copy" is the value read's share of the copy
roof; fwd+bwd adds the values-grad scatter and the dense values-grad write.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import memops
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, case_grid

OP = "product_key_memory"
METRIC = "bandwidth"  # the plot's third panel: % of the bandwidth ceiling
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("xlm", "xlm-compiled")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("xlm",)


def xlm_search(queries: torch.Tensor, sub_keys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """XLM's product-key search (HashingMemoryProductFast._get_indices), batched over heads.

    queries (T, Hm, Dk); sub_keys (Hm, 2, n_keys, Dk // 2). Scores in the inputs' dtype, indices int64.
    """
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    scores1 = torch.einsum("thd,hnd->thn", queries[..., :half], sub_keys[:, 0])
    scores2 = torch.einsum("thd,hnd->thn", queries[..., half:], sub_keys[:, 1])
    scores1, indices1 = scores1.topk(topk, dim=-1)
    scores2, indices2 = scores2.topk(topk, dim=-1)
    all_scores = (scores1.unsqueeze(-1) + scores2.unsqueeze(-2)).flatten(-2)
    all_indices = (indices1.unsqueeze(-1) * n_keys + indices2.unsqueeze(-2)).flatten(-2)
    scores, best = all_scores.topk(topk, dim=-1)
    return scores, all_indices.gather(-1, best)


def xlm_memory(layer: memops.nn.ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The XLM / Memory Layers at Scale layer in plain PyTorch, with ``layer``'s parameters."""
    flat = x.reshape(-1, x.shape[-1])
    T = flat.shape[0]
    q = layer.query_proj(flat)
    if layer.query_norm_kind == "batchnorm":
        q = layer.query_norm(q)
    q = q.view(T, layer.heads, layer.key_dim)
    if layer.query_norm_kind == "layernorm":
        q = layer.query_norm(q)
    scores, indices = xlm_search(q, layer.sub_keys.to(q.dtype), layer.topk)
    table = layer.values.weight
    weights = F.softmax(scores.float(), dim=-1).to(table.dtype)
    y = F.embedding_bag(indices.view(T, -1), table, per_sample_weights=weights.view(T, -1), mode="sum")
    if layer.gated:
        y = y * F.silu(layer.gate_proj(flat))
    if layer.out_proj is not None:
        y = layer.out_proj(y)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(T=512, dim=256, n_keys=64, heads=4, topk=16, key_dim=64, value_dim=256, gated=False, dtype="float32")
    medium = dict(
        T=2048, dim=512, n_keys=256, heads=4, topk=32, key_dim=128, value_dim=512, gated=False, dtype="float32"
    )
    # XLM (Lample et al.): 512^2 slots, 4 heads x top-32, key_dim 256, values of the model width.
    xlm = dict(
        T=8192, dim=1024, n_keys=512, heads=4, topk=32, key_dim=256, value_dim=1024, gated=False, dtype="bfloat16"
    )
    # Memory Layers at Scale: 1024^2 slots, key_dim 512, Memory+ (gated) output.
    mlas = dict(
        T=8192, dim=2048, n_keys=1024, heads=4, topk=32, key_dim=512, value_dim=2048, gated=True, dtype="bfloat16"
    )
    mlas_4k = dict(mlas, dim=4096, value_dim=4096)
    return case_grid(
        device,
        quick,
        quick_cases=[("small", small)],
        full_cases=[("medium", medium)],
        cuda_quick=[("xlm", xlm)],
        cuda_full=[("mlas-D2048", mlas), ("mlas-D4096", mlas_4k)],
    )


def make_layer(p: dict, device: str) -> memops.nn.ProductKeyMemory:
    return memops.nn.ProductKeyMemory(
        p["dim"],
        p["dim"],
        n_keys=p["n_keys"],
        heads=p["heads"],
        topk=p["topk"],
        key_dim=p["key_dim"],
        value_dim=p["value_dim"],
        query_norm=None,
        gated=p["gated"],
        device=device,
        dtype=getattr(torch, p["dtype"]),
    )


@functools.lru_cache(maxsize=1)
def _layer(params: tuple, device: str) -> memops.nn.ProductKeyMemory:
    # One layer per case: its value table can be GBs, and every input set and provider share it.
    torch.manual_seed(0)
    return make_layer(dict(params), device)


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p["T"], p["dim"], device=device, generator=generator).to(getattr(torch, p["dtype"]))
    grad_out = torch.randn_like(x) if case.mode != "fwd" else None
    return _layer(tuple(sorted(p.items())), device), x, grad_out


def _build(forward, mode: str):
    def build(inputs):
        layer, x, grad_out = inputs
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    return forward(layer, x)

            return run
        x = x.detach().requires_grad_()

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            forward(layer, x).backward(grad_out)

        return step

    return build


def _memops_layer(layer, x):
    return layer(x)


def providers(case: Case, device: str) -> dict:
    out = {"memops" if device == "cuda" else "memops-reference": _build(_memops_layer, case.mode)}
    out["xlm"] = _build(xlm_memory, case.mode)
    # Inductor on CPU compiles for tens of seconds per case; the quick CPU run leaves it out.
    if device == "cuda" or not case.quick:
        out["xlm-compiled"] = _build(torch.compile(xlm_memory), case.mode)
    return out


def _value_read_bytes(p: dict) -> int:
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    picks = p["T"] * p["heads"] * p["topk"]
    return picks * p["value_dim"] * item + p["T"] * p["value_dim"] * item + picks * 12


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    forward = _value_read_bytes(p)
    if mode == "fwd":
        return forward
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    picks = p["T"] * p["heads"] * p["topk"]
    # backward of the read: re-read the rows (weights grad), scatter the picks, write the dense values grad.
    return forward + 2 * picks * p["value_dim"] * item + p["n_keys"] ** 2 * p["value_dim"] * item


def flops(case: Case, mode: str) -> float:
    """The search's matmuls plus the query (and gated output) projections; the value read is bandwidth."""
    p = case.params
    search = 2.0 * p["T"] * p["heads"] * p["n_keys"] * p["key_dim"]
    projections = 2.0 * p["T"] * p["dim"] * p["heads"] * p["key_dim"]
    if p["gated"]:
        projections += 2 * 2.0 * p["T"] * p["dim"] * p["value_dim"]
    forward = search + projections
    return forward if mode == "fwd" else 3 * forward


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    """nn.ProductKeyMemory's kernels at its benchmark shapes: the search over (heads, 2, n_keys, key_dim / 2)
    sub-keys, then the weighted gather of heads x topk rows from the n_keys^2-row value table."""
    from memops.kernels import product_key as kernels
    from memops.product_key import search_backward

    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("product_key_memory", subset, keep=lambda case: case.name == "xlm"):
        p = case.params

        def run(p=p):
            T, heads, key_dim, n_keys, topk, D = (
                p["T"],
                p["heads"],
                p["key_dim"],
                p["n_keys"],
                p["topk"],
                p["value_dim"],
            )
            queries, sub_keys = (
                scenarios.meta(T, heads, key_dim, dtype=dt),
                scenarios.meta(heads, 2, n_keys, key_dim // 2, dtype=dt),
            )
            indices = torch.randint(0, n_keys * n_keys, (T, heads * topk), dtype=torch.int64)
            if not kernels.search_reference_instead(queries):
                kernels.product_key_search(queries, sub_keys, topk)
                search_backward(scenarios.meta(T, heads, topk, dtype=torch.float32), queries, sub_keys,
                                indices.view(T, heads, topk))  # fmt: skip
            # the layer's weights are the search's fp32 softmax
            values, weights = (
                scenarios.meta(n_keys * n_keys, D, dtype=dt),
                scenarios.meta(T, heads * topk, dtype=torch.float32),
            )
            kernels.weighted_gather_fwd(values, indices, weights)
            kernels.weighted_gather_bwd(
                scenarios.meta(T, D, dtype=dt), values, indices, weights, values_grad_algorithm="atomic"
            )

        yield f"layer {case.name}", run
