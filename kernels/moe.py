"""Triton kernels for block-level MoE (dMoE): the fused block routing.

One program per (batch row, block of BLOCK_SIZE tokens) computes, for the block's router logits (T x E):

    s = sigmoid(logits) or softmax(logits)  (fp32);   r = s + expert_bias
    token top-k mask of r (group-limited: groups ranked by the sum of their two largest r)
    S̃ = Σ_tokens (r on the mask) / (Σ + 1e-20);   coreset C = prefix of S̃ sorted descending with exclusive
    cumsum <= top_p (voted experts only), at least min_experts long
    ids = (group-limited) top-k of r restricted to C;   w = s[ids] / (Σ s[ids] + 1e-20) * scaling

Top-k selections use int64 entries (score, inverted index) and the bitonic network of memops.kernels.topk,
so ties go to the lower expert index, as in the reference's stable sorts. Without a coreset (coreset_ptr
None) the vote is skipped (token-level routing); without bias_ptr no expert bias is added.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator, dot_precision
from memops.kernels._launch import dtype_class, launch_arch, record_launch
from memops.kernels.topk import pack_entries, topk_entries, unpack_entries


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
    largest scores, its only score for groups of one; ties: lower group)."""
    offs_g = tl.arange(0, G_PAD)
    # Padding groups score below everything (NaN-free: -inf compares false with >, and they come last).
    group_scores = tl.full((BLOCK_T, G_PAD), float("-inf"), dtype=tl.float32)
    for g in tl.static_range(N_GROUPS):
        in_group = valid & ((offs_e[None, :] // GROUP_SIZE) == g)
        member = tl.where(in_group, scores, float("-inf"))
        group_score = tl.max(member, axis=1)
        if GROUP_SIZE > 1:  # a group of one scores its only member (the reference's top-min(2, size) sum)
            first = tl.argmax(member, axis=1)
            group_score += tl.max(tl.where(offs_e[None, :] == first[:, None], float("-inf"), member), axis=1)
        group_scores = tl.where(offs_g[None, :] == g, group_score[:, None], group_scores)
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
    SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr, N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, G_PAD: tl.constexpr,
    GROUP_LIMITED_VOTE: tl.constexpr,
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
    if bias_ptr is not None:
        routing += tl.load(bias_ptr + offs_e, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    if coreset_ptr is not None:
        # The vote: each token's plain top-k over all experts (the official gate), or its group-limited one
        if GROUP_LIMITED_VOTE:
            mask, _ = _routing_top(routing, valid, offs_e, TOP_K, T_LOG2, E_LOG2, K_LOG2, GROUP_SIZE, N_GROUPS,
                                   TOPK_GROUPS, G_PAD)
        else:
            mask, _ = _top_entries_mask(routing, valid, offs_e, TOP_K, T_LOG2, E_LOG2, K_LOG2)
        votes = tl.sum(tl.where(mask, routing, 0.0), axis=0)                          # (E_PAD,)
        shares = votes / (tl.sum(votes, axis=0) + 1e-20)
        entries = pack_entries(shares, 0x7FFFFFFF - offs_e, expert_ok)[None, :]       # (1, E_PAD)
        ranked = topk_entries(entries, 0, E_LOG2, E_LOG2)                             # all, descending
        ranked_shares, _, ranked_ok = unpack_entries(ranked)
        ranked_shares = tl.where(ranked_ok, ranked_shares, 0.0)
        before = tl.cumsum(ranked_shares, axis=1) - ranked_shares
        keep = ranked_ok & (((before <= top_p) & (ranked_shares > 0)) | (offs_e[None, :] < min_experts))
        size = tl.sum(keep.to(tl.int32), axis=1)                                      # (1,)
        last = tl.sum(tl.where(offs_e[None, :] == size[:, None] - 1, ranked, 0), axis=1)
        coreset = (entries >= last[:, None]) & expert_ok[None, :]                     # (1, E_PAD)
        tl.store(coreset_ptr + (b * n_blocks + block) * E + offs_e[None, :], coreset.to(tl.int8),
                 mask=expert_ok[None, :])
        routing = tl.where(coreset, routing, float("-inf"))
    _, best = _routing_top(routing, valid, offs_e, TOP_K, T_LOG2, E_LOG2, K_LOG2, GROUP_SIZE, N_GROUPS, TOPK_GROUPS,
                           G_PAD)
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
    normalize: bool, group_limited_vote: bool = False,
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
        router_logits, expert_bias, ids, weights, coreset,
        N, n_blocks, float(top_p), int(min_experts), float(routed_scaling),
        E=E, TOP_K=top_k, BLOCK_SIZE=tokens_per_program, T_LOG2=_log2_ceil(tokens_per_program),
        E_LOG2=_log2_ceil(E), K_LOG2=_log2_ceil(top_k), SOFTMAX=softmax,
        NORMALIZE=normalize, GROUP_SIZE=E // n_groups, N_GROUPS=n_groups, TOPK_GROUPS=topk_groups,
        G_PAD=triton.next_power_of_2(n_groups), GROUP_LIMITED_VOTE=group_limited_vote and n_groups > 1,
        # The (tokens, experts) packed-entry sorts set the register budget: at 4 warps E = 256 spilled 1-3 KB.
        num_warps=8 if E > 64 else 4,
    )
    return ids, weights, coreset.view(torch.bool) if vote else None


# ---------------------------------------------------------------------------------------------------------
# Expert FFN: grouped GEMMs over the (token, k) slots sorted by expert
#
# Slots t * k + j are sorted by expert and each expert's run padded to a multiple of BLOCK_M (the
# moe_align_block_size layout of vLLM): position p of the sorted layout holds slot sorted_slot[p] (or -1),
# and every BLOCK_M block of positions belongs to one expert, block_expert[block] (or -1 past the end).
# Only the experts that tokens use are ever read.


@triton.jit
def _gather_rows(slot, positions, top_k, MODE: tl.constexpr):
    """Row of an operand for each position: 0 the token (slot // k), 1 the slot, 2 the position itself."""
    if MODE == 0:
        return slot // top_k
    if MODE == 1:
        return slot
    return positions


@triton.jit(do_not_specialize=["K_in", "N_out", "top_k"])
def grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, preact_ptr, sorted_slot_ptr, block_expert_ptr,
    K_in, N_out, top_k, stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_pm,
    A_ROWS: tl.constexpr, C_ROWS: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    # C[rows] = A[rows] @ B_e with B_e[k, n] = w[e, n * stride_wn + k * stride_wk] (so W_e^T or W_e by strides).
    # SWIGLU: C = SiLU(A @ B_e[:, :N]) * (A @ B_e[:, N:2N]), the pre-activations optionally saved.
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_slot_ptr + offs_m)
    # (expert broadcast before comparing: the interpreter turns bool block & bool scalar into int32)
    row_ok = (slot >= 0) & ((expert + tl.zeros_like(slot)) >= 0)
    a_rows = _gather_rows(tl.maximum(slot, 0).to(tl.int64), offs_m.to(tl.int64), top_k, A_ROWS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_out
    w_base = w_ptr + tl.maximum(expert, 0).to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    k_end = tl.where(expert >= 0, K_in, 0)   # padding blocks past the last expert do no work
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K_in
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        if SWIGLU:
            w_up = tl.load(w_base + (offs_n[None, :] + N_out) * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask,
                           other=0.0)
            acc_up += tl.dot(a, w_up, input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & n_ok[None, :]
    if SWIGLU:
        if preact_ptr is not None:
            pre = preact_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
            tl.store(pre, acc.to(preact_ptr.dtype.element_ty), mask=mask)
            tl.store(pre + N_out, acc_up.to(preact_ptr.dtype.element_ty), mask=mask)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    c_rows = _gather_rows(tl.maximum(slot, 0).to(tl.int64), offs_m.to(tl.int64), top_k, C_ROWS)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N_rows", "K_cols", "top_k"])
def grouped_weight_grad_kernel(
    g_ptr, a_ptr, dw_ptr, sorted_slot_ptr, expert_start_ptr, expert_end_ptr,
    N_rows, K_cols, top_k, stride_gm, stride_am, stride_we,
    G_ROWS: tl.constexpr, A_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    # dW[e][n, k] = sum over the positions p of expert e of G[row(p), n] * A[row(p), k]; every expert's
    # tile is written (zeros for an expert no token chose).
    expert = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N_rows
    k_ok = offs_k < K_cols
    start = tl.load(expert_start_ptr + expert)
    end = tl.load(expert_end_ptr + expert)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for p0 in range(start, end, BLOCK_M):
        positions = p0 + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slot_ptr + positions, mask=positions < end, other=-1)
        row_ok = slot >= 0
        safe_slot = tl.maximum(slot, 0).to(tl.int64)
        g_rows = _gather_rows(safe_slot, positions.to(tl.int64), top_k, G_ROWS)
        a_rows = _gather_rows(safe_slot, positions.to(tl.int64), top_k, A_ROWS)
        g = tl.load(g_ptr + g_rows[:, None] * stride_gm + offs_n[None, :], mask=row_ok[:, None] & n_ok[None, :],
                    other=0.0)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += tl.dot(tl.trans(g), a, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + expert * stride_we + offs_n[:, None] * K_cols + offs_k[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


BY_TOKEN, BY_SLOT, BY_POSITION = 0, 1, 2


# Tiles of the grouped GEMMs on CUDA per (arch class, dtype class), from `memops gpu-check` compile figures
# (docs/gpu-compile.md). BLOCK_M is the slot layout's block and stays 64 everywhere. The dtype classes are
# memops.kernels._launch.dtype_class: "16" (bf16/fp16), "tf32" (fp32, matmul precision high/medium) and
# "fp32" (fp32 at "highest": ieee dots, lowered to FMA, which hold a full BLOCK_K row per thread).
GEMM_CONFIGS = {
    (90, "16"): ((64, 64, 64, 4, 3), "wgmma, no stack on every GEMM"),
    (80, "16"): ((64, 32, 64, 4, 3), "mma.sync, 216 regs; the SwiGLU GEMM at 64x64 spills 8-136 B (two accumulators)"),
    (90, "tf32"): ((64, 64, 32, 4, 3), "BLOCK_K 64 spills 48 B in the SwiGLU GEMM (two accumulators)"),
    (80, "tf32"): ((64, 64, 32, 4, 3), "as on sm_90"),
    (90, "fp32"): ((64, 32, 16, 4, 2), "FMA: 64x64x64 spills 16-384 B with SwiGLU"),
    (80, "fp32"): ((64, 32, 16, 4, 2), "FMA: 64x64x64 spills 576 B-6.7 KB"),
}


def gemm_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles of the grouped GEMMs (see GEMM_CONFIGS)."""
    arch = launch_arch(device)
    if arch is None:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}
    config = GEMM_CONFIGS[(90 if arch >= 90 else 80, dtype_class(dtype))][0]
    return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), config))


@triton.jit(do_not_specialize=["slots", "num_blocks"])
def align_kernel(
    ids_ptr, sorted_slot_ptr, block_expert_ptr, expert_start_ptr, expert_end_ptr, slots, num_blocks,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    # One program, no atomics: pass 1 counts the slots per expert, pass 2 gives every slot its position
    # (its expert's padded start + its rank among that expert's slots, counted in slot order), so the layout
    # is the same on every run and equals a stable sort by expert.
    offs_e = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, slots, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < slots, other=-1)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    tl.store(expert_start_ptr + offs_e, start.to(tl.int64), mask=offs_e < E)
    tl.store(expert_end_ptr + offs_e, end.to(tl.int64), mask=offs_e < E)
    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        # the expert of block b: how many experts end at or before its first position
        owner = tl.sum((((blocks[:, None] * BLOCK_M) >= end[None, :]) & (offs_e[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(owner < E, owner, -1).to(tl.int32), mask=blocks < num_blocks)
    seen = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, slots, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ok = offs < slots
        ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot + seen[None, :]            # earlier slots of the expert
        position = tl.sum(onehot * (before + start[None, :]), axis=1)
        tl.store(sorted_slot_ptr + position, offs.to(tl.int32), mask=ok)
        seen += tl.sum(onehot, axis=0)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The sorted, padded slot layout (memops.reference.moe.align_slots defines it): sorted_slot (P,) int32
    with -1 padding, block_expert (P / block_m,) int32 with -1 past the last expert's blocks, and
    expert_start, expert_end (E,) int64. One Triton launch after a fill; no host sync."""
    flat = topk_ids.reshape(-1).to(torch.int32).contiguous()
    slots = flat.numel()
    num_blocks = triton.cdiv(slots, block_m) + num_experts
    sorted_slot = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    expert_start = torch.empty(num_experts, dtype=torch.int64, device=flat.device)
    expert_end = torch.empty(num_experts, dtype=torch.int64, device=flat.device)
    record_launch("align_kernel")
    align_kernel[(1,)](
        flat, sorted_slot, block_expert, expert_start, expert_end, slots, num_blocks,
        E=num_experts, E_PAD=triton.next_power_of_2(num_experts), BLOCK_M=block_m,
        # 128 slots per chunk spill 328 B at E = 256 on sm_80 (Triton 3.9): the (CHUNK, E_PAD) one-hot counts
        CHUNK=64, num_warps=4,
    )
    return sorted_slot, block_expert, expert_start, expert_end


def grouped_gemm(a, w, out, layout, *, k_in, n_out, top_k, w_strides, a_rows, c_rows, swiglu=False, preact=None,
                 config=None):
    """One grouped GEMM over the sorted layout (see grouped_gemm_kernel); w_strides = (stride_wn, stride_wk)."""
    sorted_slot, block_expert = layout[0], layout[1]
    cfg = config or gemm_config(a.device, a.dtype)
    record_launch("grouped_gemm_kernel")
    grouped_gemm_kernel[(block_expert.numel(), triton.cdiv(n_out, cfg["BLOCK_N"]))](
        a, w, out, preact, sorted_slot, block_expert,
        k_in, n_out, top_k, a.stride(0), w.stride(0), w_strides[0], w_strides[1], out.stride(0),
        preact.stride(0) if preact is not None else 0,
        A_ROWS=a_rows, C_ROWS=c_rows, SWIGLU=swiglu,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=dot_precision(a),
        ACC=accumulator(a), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
    )


def grouped_weight_grad(g, a, dw, layout, *, top_k, g_rows, a_rows, config=None):
    """dw (E, N, K) = per expert, G^T A over its positions (see grouped_weight_grad_kernel)."""
    sorted_slot, _, expert_start, expert_end = layout
    E, N, K = dw.shape
    cfg = config or gemm_config(g.device, g.dtype)
    record_launch("grouped_weight_grad_kernel")
    grouped_weight_grad_kernel[(E, triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))](
        g, a, dw, sorted_slot, expert_start, expert_end, N, K, top_k, g.stride(0), a.stride(0), dw.stride(0),
        G_ROWS=g_rows, A_ROWS=a_rows, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        DOT_PRECISION=dot_precision(g), ACC=accumulator(g), num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3),
    )


def moe_experts_fwd(x, w_gate_up, w_down, topk_ids, *, save_preact: bool, down: bool = True):
    """Unweighted per-slot expert outputs y_slots (T * k, d) in x.dtype (None with down=False: the backward's
    recomputation needs only the hidden layer), plus what the backward needs: (layout, h (P, I), preact
    (P, 2I) or None). x (T, d), w_gate_up (E, 2I, d), w_down (E, d, I) contiguous."""
    T, d = x.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    cfg = gemm_config(x.device, x.dtype)
    layout = align(topk_ids, E, cfg["BLOCK_M"])
    positions = layout[0].numel()
    h = torch.empty((positions, inter), dtype=x.dtype, device=x.device)
    # Zeroed: padding positions then give zero, not garbage, in the SwiGLU backward.
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    preact = torch.zeros((positions, two_i), dtype=acc_dtype, device=x.device) if save_preact else None
    y_slots = torch.empty((T * top_k, d), dtype=x.dtype, device=x.device) if down else None
    if T * top_k == 0:
        return y_slots, (layout, h, preact)
    # h = SiLU(x W_gate^T) * (x W_up^T): w_gate_up[e] is (2I, d), read transposed.
    grouped_gemm(x, w_gate_up, h, layout, k_in=d, n_out=inter, top_k=top_k, w_strides=(d, 1),
                 a_rows=BY_TOKEN, c_rows=BY_POSITION, swiglu=True, preact=preact)
    if not down:
        return None, (layout, h, preact)
    # y_slot = h W_down^T: w_down[e] is (d, I), read transposed.
    grouped_gemm(h, w_down, y_slots, layout, k_in=inter, n_out=d, top_k=top_k, w_strides=(inter, 1),
                 a_rows=BY_POSITION, c_rows=BY_SLOT)
    return y_slots, (layout, h, preact)


def moe_experts_bwd(grad_slots, x, w_gate_up, w_down, topk_ids, layout, h, preact):
    """(dx (T, d), dw_gate_up (E, 2I, d), dw_down (E, d, I)) from grad_slots (T * k, d), the gradient of the
    unweighted per-slot outputs."""
    T, d = x.shape
    E, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    positions = layout[0].numel()
    dw_down = torch.empty_like(w_down)
    dw_gate_up = torch.empty_like(w_gate_up)
    # dW_down[e] = sum over e's slots of dy_slot^T h
    grouped_weight_grad(grad_slots, h, dw_down, layout, top_k=top_k, g_rows=BY_SLOT, a_rows=BY_POSITION)
    # dh = dy_slot W_down[e] (w_down[e] is (d, I): B[k, n] = w_down[e][k, n])
    grad_slots = grad_slots.to(x.dtype)
    dh = torch.zeros((positions, inter), dtype=preact.dtype, device=x.device)
    grouped_gemm(grad_slots, w_down, dh, layout, k_in=d, n_out=inter, top_k=top_k, w_strides=(1, inter),
                 a_rows=BY_SLOT, c_rows=BY_POSITION)
    # SwiGLU backward on the saved pre-activations (padding positions stay zero)
    gate, up = preact[:, :inter], preact[:, inter:]
    silu = torch.nn.functional.silu(gate)
    sigmoid = torch.sigmoid(gate)
    d_gate = dh * up * (sigmoid * (1 + gate * (1 - sigmoid)))
    d_preact = torch.cat([d_gate, dh * silu], dim=1).to(x.dtype)
    # dW_gate_up[e] = sum over e's slots of d_preact^T x
    grouped_weight_grad(d_preact, x, dw_gate_up, layout, top_k=top_k, g_rows=BY_POSITION, a_rows=BY_TOKEN)
    # dx_slot = d_preact W_gate_up[e] (w_gate_up[e] is (2I, d): B[k, n] = w_gate_up[e][k, n]), summed over k
    dx_slots = torch.empty((T * top_k, d), dtype=preact.dtype, device=x.device)
    grouped_gemm(d_preact, w_gate_up, dx_slots, layout, k_in=two_i, n_out=d, top_k=top_k, w_strides=(1, d),
                 a_rows=BY_POSITION, c_rows=BY_SLOT)
    dx = dx_slots.view(T, top_k, d).sum(1).to(x.dtype)
    return dx, dw_gate_up, dw_down
