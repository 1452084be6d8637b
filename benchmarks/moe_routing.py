"""dMoE routing benchmarks: memops.block_route (one fused kernel per block) against the PyTorch reference.

Providers, same run: ``memops`` (block routing, fused kernel), ``memops-token`` (token-level routing,
block_size=None, through the same kernel), ``reference`` (memops.reference.block_route: the algorithm in
PyTorch ops) and ``reference-token``. The note gives the mean unique experts per 32-token block.
"""

from __future__ import annotations

import itertools

import torch

import memops
from memops import reference
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case

OP = "block_route"
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("reference", "torch_topk", "memops-token", "reference-token")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("torch_topk",)

LLADA2 = dict(E=256, top_k=8, n_groups=8, topk_groups=4, routed_scaling=2.5, score_func="sigmoid", min_experts=16)
MIXTRAL = dict(E=8, top_k=2, n_groups=1, topk_groups=1, routed_scaling=1.0, score_func="softmax", min_experts=2)


def cases(device: str, quick: bool) -> list[Case]:
    out = [
        Case("llada2-1blk", "fwd", dict(LLADA2, B=1, N=32), quick=True),
        Case("llada2-64blk", "fwd", dict(LLADA2, B=1, N=2048), quick=True),
        # plain (ungrouped) sigmoid routing, 16 blocks: the CPU-ratio shape of issue 18
        Case("sigmoid-16blk", "fwd", dict(LLADA2, n_groups=1, topk_groups=1, routed_scaling=1.0, B=2, N=256), True),
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


def _torch_topk(logits, p: dict, block_size: int = 32):
    """The routing as one writes it by hand: scores -> top-k votes -> block shares -> sort / cumsum coreset ->
    masked (group-limited) top-k -> weights. torch.topk breaks ties as it likes; random logits have none."""
    scores = torch.sigmoid(logits.float()) if p["score_func"] == "sigmoid" else torch.softmax(logits.float(), -1)
    B, N, E = scores.shape
    top_p = p.get("top_p", 0.6)
    votes_value, votes_index = scores.topk(p["top_k"], dim=-1)
    votes = torch.zeros_like(scores).scatter_(-1, votes_index, votes_value)
    votes = votes.view(B, N // block_size, block_size, E).sum(2)
    shares = votes / (votes.sum(-1, keepdim=True) + 1e-20)
    sorted_shares, order = shares.sort(dim=-1, descending=True)
    before = sorted_shares.cumsum(-1) - sorted_shares
    keep = ((before <= top_p) & (sorted_shares > 0)) | (torch.arange(E, device=logits.device) < p["min_experts"])
    coreset = torch.zeros_like(keep).scatter_(-1, order, keep)
    routing = scores.masked_fill(~coreset.repeat_interleave(block_size, dim=1), float("-inf"))
    if p["n_groups"] > 1:
        grouped = routing.view(B, N, p["n_groups"], -1)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(p["topk_groups"], dim=-1).indices
        kept = torch.zeros(B, N, p["n_groups"], dtype=torch.bool, device=logits.device).scatter_(-1, best_groups, True)
        routing = routing.masked_fill(~kept.repeat_interleave(E // p["n_groups"], dim=-1), float("-inf"))
    ids = routing.topk(p["top_k"], dim=-1).indices
    weights = scores.gather(-1, ids)
    if p["top_k"] > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids.int(), weights * p["routed_scaling"], coreset


def providers(case: Case, device: str) -> dict:
    p = case.params
    ours = "memops" if device == "cuda" else "memops-reference"
    out = {ours: lambda logits: lambda: memops.block_route(logits, **_kwargs(p, 32))}
    if device == "cuda":
        out["memops-token"] = lambda logits: lambda: memops.block_route(logits, **_kwargs(p, None))
    out["reference"] = lambda logits: lambda: reference.block_route(logits, **_kwargs(p, 32))
    out["torch_topk"] = lambda logits: lambda: _torch_topk(logits, p)
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


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import moe

    for case in scenarios.cases("moe_routing", subset, keep=lambda case: case.name.startswith("llada2")):
        p = case.params

        def run(p=p):
            logits = scenarios.meta(p["B"], p["N"], p["E"], dtype=torch.float32)
            # block routing and token routing, with and without DeepSeek's expert bias
            for block_size, bias in itertools.product((32, None), (scenarios.meta(p["E"], dtype=torch.float32), None)):
                moe.block_route(
                    logits,
                    bias,
                    block_size=block_size,
                    top_k=p["top_k"],
                    top_p=0.9,
                    min_experts=p["min_experts"],
                    softmax=p["score_func"] == "softmax",
                    n_groups=p["n_groups"],
                    topk_groups=p["topk_groups"],
                    routed_scaling=p["routed_scaling"],
                    normalize=True,
                )

        yield f"route {case.name}", run
