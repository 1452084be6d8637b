"""dMoE routing benchmarks: memops.block_route (one fused kernel per block) against the PyTorch reference.

Providers, same run: ``memops`` (block routing, fused kernel), ``memops-token`` (token-level routing,
block_size=None, through the same kernel), ``reference`` (memops.reference.block_route: the algorithm in
PyTorch ops) and ``reference-token``. The note gives the mean unique experts per 32-token block.
"""

from __future__ import annotations

import torch

import memops
from memops import reference
from memops.tools.benchmarking import Case

OP = "block_route"
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("reference", "memops-token", "reference-token")

LLADA2 = dict(E=256, top_k=8, n_groups=8, topk_groups=4, routed_scaling=2.5, score_func="sigmoid", min_experts=16)
MIXTRAL = dict(E=8, top_k=2, n_groups=1, topk_groups=1, routed_scaling=1.0, score_func="softmax", min_experts=2)


def cases(device: str, quick: bool) -> list[Case]:
    out = [
        Case("llada2-1blk", "fwd", dict(LLADA2, B=1, N=32), quick=True),
        Case("llada2-64blk", "fwd", dict(LLADA2, B=1, N=2048), quick=True),
        Case("mixtral-64blk", "fwd", dict(MIXTRAL, B=1, N=2048)),
    ]
    if device == "cuda" and not quick:
        out.append(Case("llada2-512blk", "fwd", dict(LLADA2, B=8, N=2048), cuda_only=True))
    return out


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(p["B"], p["N"], p["E"], device=device, generator=generator)


def _kwargs(p: dict, block_size):
    return dict(
        block_size=block_size,
        top_k=p["top_k"],
        min_experts=p["min_experts"],
        score_func=p["score_func"],
        n_groups=p["n_groups"],
        topk_groups=p["topk_groups"],
        routed_scaling=p["routed_scaling"],
    )


def providers(case: Case, device: str) -> dict:
    p = case.params
    ours = "memops" if device == "cuda" else "memops-reference"
    out = {ours: lambda logits: lambda: memops.block_route(logits, **_kwargs(p, 32))}
    if device == "cuda":
        out["memops-token"] = lambda logits: lambda: memops.block_route(logits, **_kwargs(p, None))
    out["reference"] = lambda logits: lambda: reference.block_route(logits, **_kwargs(p, 32))
    out["reference-token"] = lambda logits: lambda: reference.block_route(logits, **_kwargs(p, None))
    return out


def note(case: Case, provider: str, device: str) -> str | None:
    logits = make_inputs(case, device, 0)
    block_size = None if provider.endswith("token") else 32
    ids, _, _ = reference.block_route(logits, **_kwargs(case.params, block_size))
    return f"unique experts per 32-token block {memops.unique_experts(ids, 32).float().mean().item():.1f}"


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    return p["B"] * p["N"] * (p["E"] * 4 + p["top_k"] * 8)
