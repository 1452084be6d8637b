"""dMoE layer benchmarks: routed SwiGLU experts (memops.moe_ffn) with block vs token routing.

Providers, same run: ``memops`` (block routing + grouped-GEMM experts), ``memops-token`` (token routing,
block_size=None, same kernels: more experts read), ``expert_loop`` (memops.reference.moe_ffn: one batched
matmul per used expert in PyTorch, the usual hand-written MoE) and, on CUDA where torch has it,
``grouped_mm`` (torch._grouped_mm over the expert-sorted tokens). GB/s counts the expert weights that must
be read (the used experts' W_gate_up and W_down) plus activations: the layer is weight-bandwidth bound at
small T, which is where block routing pays. The note gives the unique experts and expert bytes read.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import memops
from memops import reference
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case

OP = "block_moe"
METRIC = "flops"  # the plot's third panel: TFLOP/s
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("memops-token", "expert_loop", "grouped_mm")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("expert_loop",)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(T=64, d=256, inter=128, E=32, top_k=4, n_groups=1, topk_groups=1, min_experts=8, dtype="float32")
    # LLaDA2.0-mini MoE layer: d 2048, 256 experts of 512, top-8, 8 groups keep 4.
    llada2 = dict(T=32, d=2048, inter=512, E=256, top_k=8, n_groups=8, topk_groups=4, min_experts=16, dtype="bfloat16")
    out = [Case("small", "fwd", small, quick=True), Case("small", "fwd+bwd", small, quick=True)]
    if device == "cuda":
        out += [
            Case("llada2-1blk", "fwd", llada2, quick=True, cuda_only=True),
            Case("llada2-64blk", "fwd", dict(llada2, T=2048), cuda_only=True),
            Case("llada2-64blk", "fwd+bwd", dict(llada2, T=2048), cuda_only=True),
        ]
    return out


@functools.lru_cache(maxsize=1)
def _weights(params: tuple, device: str):
    # One weight set per case (GBs at the LLaDA2 shape), shared by every input set and provider.
    p = dict(params)
    dtype = getattr(torch, p["dtype"])
    generator = torch.Generator(device=device).manual_seed(0)
    w_gate_up = (torch.randn(p["E"], 2 * p["inter"], p["d"], device=device, generator=generator) * p["d"] ** -0.5).to(
        dtype
    )
    w_down = (torch.randn(p["E"], p["d"], p["inter"], device=device, generator=generator) * p["inter"] ** -0.5).to(
        dtype
    )
    router = torch.randn(p["E"], p["d"], device=device, generator=generator) * p["d"] ** -0.5
    return w_gate_up, w_down, router


def _route(p: dict, x: torch.Tensor, router: torch.Tensor, block_size):
    logits = (x.float() @ router.t())[None]
    ids, weights, _ = reference.block_route(
        logits,
        block_size=block_size,
        top_k=p["top_k"],
        min_experts=p["min_experts"],
        n_groups=p["n_groups"],
        topk_groups=p["topk_groups"],
    )
    return ids[0], weights[0]


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    w_gate_up, w_down, router = _weights(tuple(sorted(p.items())), device)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p["T"], p["d"], device=device, generator=generator).to(w_gate_up.dtype)
    routes = {"block": _route(p, x, router, 32), "token": _route(p, x, router, None)}
    grad = torch.randn_like(x) if case.mode == "fwd+bwd" else None
    return x, w_gate_up, w_down, routes, grad


def _grouped_mm_ffn(x, w_gate_up, w_down, ids, weights):
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    tokens = order // ids.shape[1]
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    x_sorted = x[tokens]
    gate, up = torch._grouped_mm(x_sorted, w_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)
    combined = out.float() * weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, combined).to(x.dtype)


def _build(ffn, routing: str, mode: str):
    def build(inputs):
        x, w_gate_up, w_down, routes, grad = inputs
        ids, weights = routes[routing]
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    return ffn(x, w_gate_up, w_down, ids, weights)

            return run
        leaves = [t.detach().requires_grad_() for t in (x, w_gate_up, w_down)]

        def step():
            for t in leaves:
                t.grad = None
            ffn(*leaves, ids, weights).backward(grad)

        return step

    return build


def providers(case: Case, device: str) -> dict:
    out = {("memops" if device == "cuda" else "memops-reference"): _build(memops.moe_ffn, "block", case.mode)}
    if device == "cuda":
        out["memops-token"] = _build(memops.moe_ffn, "token", case.mode)
        if hasattr(torch, "_grouped_mm") and case.mode == "fwd":
            out["grouped_mm"] = _build(_grouped_mm_ffn, "block", case.mode)
    out["expert_loop"] = _build(reference.moe_ffn, "block", case.mode)
    return out


def _used_experts(case: Case, device: str, routing: str) -> int:
    _, _, _, routes, _ = make_inputs(case, device, 0)
    return int(torch.unique(routes[routing][0]).numel())


def note(case: Case, provider: str, device: str) -> str | None:
    p = case.params
    routing = "token" if provider.endswith("token") else "block"
    used = _used_experts(case, device, routing)
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    weight_bytes = used * 3 * p["inter"] * p["d"] * item
    return f"{used} experts used, {weight_bytes / 2**20:.1f} MiB of expert weights"


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    # A lower bound: every expert the tokens may use, capped by E, read once; activations in and out.
    used = min(p["E"], p["T"] * p["top_k"])
    forward = used * 3 * p["inter"] * p["d"] * item + 2 * p["T"] * p["d"] * item
    return forward if mode == "fwd" else 3 * forward


def flops(case: Case, mode: str) -> float:
    p = case.params
    forward = 2.0 * p["T"] * p["top_k"] * 3 * p["inter"] * p["d"]
    return forward if mode == "fwd" else 3 * forward


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import moe

    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("moe_layer", subset, keep=lambda case: case.name == "llada2-64blk"):
        p = case.params

        def run(p=p):
            T, d, inter, E, top_k = p["T"], p["d"], p["inter"], p["E"], p["top_k"]
            x, w_gate_up, w_down = (
                scenarios.meta(T, d, dtype=dt),
                scenarios.meta(E, 2 * inter, d, dtype=dt),
                scenarios.meta(E, d, inter, dtype=dt),
            )
            ids = scenarios.meta(T, top_k, dtype=torch.int32)
            moe.moe_experts_fwd(x, w_gate_up, w_down, ids, save_preact=False)  # the forward op
            # the backward op: the gate/up GEMM again for its pre-activations, then the grads
            _, (layout, h, preact) = moe.moe_experts_fwd(x, w_gate_up, w_down, ids, save_preact=True, down=False)
            moe.moe_experts_bwd(scenarios.meta(T * top_k, d, dtype=dt), x, w_gate_up, w_down, ids, layout, h, preact)

        yield f"experts {case.name}", run
