"""Triton kernels for block-level MoE (dMoE): the fused block routing.

One program per (batch row, block of BLOCK_SIZE tokens) computes, for the block's router logits (T x E):

    s = sigmoid(logits) or softmax(logits)  (fp32);   r = s + expert_bias
    token top-k mask of r (group-limited: groups ranked by the sum of their two largest r)
    S̃ = Σ_tokens (r on the mask) / (Σ + 1e-20);   coreset C = prefix of S̃ sorted descending with exclusive
    cumsum <= top_p, at least min_experts long
    ids = (group-limited) top-k of r restricted to C;   w = s[ids] / (Σ s[ids] + 1e-20) * scaling

Top-k selections use int64 entries (score, inverted index) and the bitonic network of memops.kernels.topk,
so ties go to the lower expert index, as in the reference's stable sorts. VOTE False skips the coreset
(token-level routing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops._launches import record_launch
from memops.kernels.topk import empty_entries, pack_entries, topk_entries, unpack_entries


@triton.jit
def _kth_entry(entries, K: tl.constexpr, WIDTH: tl.constexpr):
    """The K-th (1-based) of each row of descending-sorted entries (R, WIDTH), as (R, 1)."""
    offs = tl.arange(0, WIDTH)
    return tl.sum(tl.where(offs[None, :] == K - 1, entries, 0), axis=1)[:, None]


@triton.jit
def _top_entries_mask(scores, valid, offs_e, K: tl.constexpr, T_LOG2: tl.constexpr, E_LOG2: tl.constexpr,
                      K_LOG2: tl.constexpr):
    """Mask (T, E) of each row's K largest valid scores (ties: lower index), and the rows' sorted entries."""
    entries = pack_entries(scores, 0x7FFFFFFF - offs_e[None, :], valid)
    best = topk_entries(entries, T_LOG2, E_LOG2, K_LOG2)
    return (entries >= _kth_entry(best, K, 1 << K_LOG2)) & valid, best


@triton.jit
def _eligible_experts(scores, valid, offs_e, GROUP_SIZE: tl.constexpr, N_GROUPS: tl.constexpr,
                      TOPK_GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr):
    """(T, E) mask of the experts in each token's TOPK_GROUPS best groups (group score: sum of its two
    largest scores; ties: lower group)."""
    offs_g = tl.arange(0, G_PAD)
    # Padding groups score below everything (NaN-free: -inf compares false with >, and they come last).
    group_scores = tl.full((BLOCK_T, G_PAD), float("-inf"), dtype=tl.float32)
    for g in tl.static_range(N_GROUPS):
        in_group = valid & ((offs_e[None, :] // GROUP_SIZE) == g)
        member = tl.where(in_group, scores, float("-inf"))
        first = tl.argmax(member, axis=1)
        second = tl.max(tl.where(offs_e[None, :] == first[:, None], float("-inf"), member), axis=1)
        group_scores = tl.where(offs_g[None, :] == g, (tl.max(member, axis=1) + second)[:, None], group_scores)
    eligible = tl.zeros(scores.shape, dtype=tl.int1)
    for g in tl.static_range(N_GROUPS):
        mine = tl.sum(tl.where(offs_g[None, :] == g, group_scores, 0.0), axis=1)
        better = (group_scores > mine[:, None]) | ((group_scores == mine[:, None]) & (offs_g[None, :] < g))
        better = better & (offs_g[None, :] < N_GROUPS)
        kept = tl.sum(better.to(tl.int32), axis=1) < TOPK_GROUPS
        eligible = eligible | (kept[:, None] & ((offs_e[None, :] // GROUP_SIZE) == g))
    return eligible & valid


@triton.jit
def _routing_top(scores, valid, offs_e, K: tl.constexpr, T_LOG2: tl.constexpr, E_LOG2: tl.constexpr,
                 K_LOG2: tl.constexpr, GROUP_SIZE: tl.constexpr, N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                 G_PAD: tl.constexpr):
    """Group-limited top-K of scores: (mask (T, E), sorted entries (T, 2**K_LOG2))."""
    if N_GROUPS > 1:
        eligible = _eligible_experts(scores, valid, offs_e, GROUP_SIZE, N_GROUPS, TOPK_GROUPS, 1 << T_LOG2, G_PAD)
        scores = tl.where(eligible, scores, float("-inf"))
    return _top_entries_mask(scores, valid, offs_e, K, T_LOG2, E_LOG2, K_LOG2)


@triton.jit(do_not_specialize=["N", "n_blocks"])
def block_route_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, coreset_ptr,
    N, n_blocks, top_p, min_experts, routed_scaling,
    E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    T_LOG2: tl.constexpr, E_LOG2: tl.constexpr, K_LOG2: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, VOTE: tl.constexpr, NORMALIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr, N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, G_PAD: tl.constexpr,
):
    BLOCK_T: tl.constexpr = 1 << T_LOG2
    E_PAD: tl.constexpr = 1 << E_LOG2
    K_PAD: tl.constexpr = 1 << K_LOG2
    b = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    offs_t = block * BLOCK_SIZE + tl.arange(0, BLOCK_T)
    token_ok = (tl.arange(0, BLOCK_T) < BLOCK_SIZE) & (offs_t < N)
    offs_e = tl.arange(0, E_PAD)
    expert_ok = offs_e < E
    valid = token_ok[:, None] & expert_ok[None, :]
    rows = b * N + offs_t
    logits = tl.load(logits_ptr + rows[:, None] * E + offs_e[None, :], mask=valid, other=0.0).to(tl.float32)
    if SOFTMAX:
        shifted = tl.where(valid, logits, float("-inf"))
        shifted = shifted - tl.max(tl.where(token_ok[:, None], shifted, 0.0), axis=1)[:, None]
        exp = tl.where(valid, tl.exp(shifted), 0.0)
        scores = exp / tl.where(token_ok, tl.sum(exp, axis=1), 1.0)[:, None]
    else:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    routing = scores
    if HAS_BIAS:
        routing += tl.load(bias_ptr + offs_e, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    if VOTE:
        mask, _ = _routing_top(routing, valid, offs_e, TOP_K, T_LOG2, E_LOG2, K_LOG2, GROUP_SIZE, N_GROUPS, TOPK_GROUPS, G_PAD)
        votes = tl.sum(tl.where(mask, routing, 0.0), axis=0)                          # (E_PAD,)
        shares = votes / (tl.sum(votes, axis=0) + 1e-20)
        entries = pack_entries(shares, 0x7FFFFFFF - offs_e, expert_ok)[None, :]       # (1, E_PAD)
        ranked = topk_entries(entries, 0, E_LOG2, E_LOG2)                             # all, descending
        ranked_shares, _, ranked_ok = unpack_entries(ranked)
        ranked_shares = tl.where(ranked_ok, ranked_shares, 0.0)
        before = tl.cumsum(ranked_shares, axis=1) - ranked_shares
        keep = ranked_ok & ((before <= top_p) | (offs_e[None, :] < min_experts))
        size = tl.sum(keep.to(tl.int32), axis=1)                                      # (1,)
        last = tl.sum(tl.where(offs_e[None, :] == size[:, None] - 1, ranked, 0), axis=1)
        coreset = (entries >= last[:, None]) & expert_ok[None, :]                     # (1, E_PAD)
        tl.store(coreset_ptr + (b * n_blocks + block) * E + offs_e[None, :], coreset.to(tl.int8),
                 mask=expert_ok[None, :])
        routing = tl.where(coreset, routing, float("-inf"))
    _, best = _routing_top(routing, valid, offs_e, TOP_K, T_LOG2, E_LOG2, K_LOG2, GROUP_SIZE, N_GROUPS, TOPK_GROUPS, G_PAD)
    _, inverted, _ = unpack_entries(best)
    ids = 0x7FFFFFFF - inverted                                                       # (T, K_PAD)
    offs_k = tl.arange(0, K_PAD)
    picked = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        id_j = tl.sum(tl.where(offs_k[None, :] == j, ids, 0), axis=1)
        score_j = tl.sum(tl.where(offs_e[None, :] == id_j[:, None], scores, 0.0), axis=1)
        picked = tl.where(offs_k[None, :] == j, score_j[:, None], picked)
    if NORMALIZE:
        picked = picked / (tl.sum(picked, axis=1)[:, None] + 1e-20)
    out = rows[:, None] * TOP_K + offs_k[None, :]
    out_mask = token_ok[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(ids_ptr + out, ids.to(tl.int32), mask=out_mask)
    tl.store(weights_ptr + out, picked * routed_scaling, mask=out_mask)


def _log2_ceil(n: int) -> int:
    return max(1, (n - 1).bit_length())


def block_route(
    router_logits: torch.Tensor, expert_bias: torch.Tensor | None, *, block_size: int | None, top_k: int,
    top_p: float, min_experts: int, softmax: bool, n_groups: int, topk_groups: int, routed_scaling: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ids (B, N, top_k) int32, weights (B, N, top_k) fp32, coreset (B, n_blocks, E) bool or None) for
    contiguous router_logits (B, N, E). block_size None: token-level routing in blocks of 32 tokens."""
    B, N, E = router_logits.shape
    vote = block_size is not None
    tokens_per_program = block_size if vote else 32
    n_blocks = triton.cdiv(N, tokens_per_program)
    ids = torch.empty((B, N, top_k), dtype=torch.int32, device=router_logits.device)
    weights = torch.empty((B, N, top_k), dtype=torch.float32, device=router_logits.device)
    coreset = torch.empty((B, n_blocks, E), dtype=torch.int8, device=router_logits.device) if vote else None
    if B * N == 0:
        return ids, weights, coreset.bool() if vote else None
    record_launch("block_route_kernel")
    block_route_kernel[(n_blocks, B)](
        router_logits, expert_bias if expert_bias is not None else router_logits, ids, weights,
        coreset if vote else ids, N, n_blocks, float(top_p), int(min_experts), float(routed_scaling),
        E=E, TOP_K=top_k, BLOCK_SIZE=tokens_per_program, T_LOG2=_log2_ceil(tokens_per_program),
        E_LOG2=_log2_ceil(E), K_LOG2=_log2_ceil(top_k), SOFTMAX=softmax, HAS_BIAS=expert_bias is not None,
        VOTE=vote, NORMALIZE=normalize, GROUP_SIZE=E // n_groups, N_GROUPS=n_groups, TOPK_GROUPS=topk_groups,
        G_PAD=triton.next_power_of_2(n_groups),
        num_warps=4,
    )
    return ids, weights, coreset.view(torch.bool) if vote else None
