"""Triton kernels for TRIM-KV's retention capacity and the eviction of a retention-gated KV cache.

Capacity (per batch and KV head, over positions t, j of one sequence of log_beta[j] <= 0):

    R[t]            = sum_{j <= t} exp((t - j) * log_beta[j])
    dlog_beta[j]    = sum_{t >= j} dR[t] * (t - j) * exp((t - j) * log_beta[j])

Both stream tiles of the (t, j) triangle through registers: the N x N terms are never stored.

Eviction (per batch and KV head, over the L rows of a cache, the newest token at position t):

    score[j] = log_beta[j] * (t + 1 - pos[j]);   keep the `budget` rows of largest score, in their order

One program selects with a bitonic top-k over (score, row) packed into int64 (ties: the older row), then
writes the kept rows' indices in increasing order; the K/V/log_beta/position gather is a second kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops._launches import record_launch


@triton.jit(do_not_specialize=["N"])
def retention_capacity_fwd_kernel(
    log_beta_ptr, capacity_ptr, N,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (sequence, block of t); it walks the j blocks up to the block's last t.
    row = tl.program_id(1).to(tl.int64) * N
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_T,), dtype=ACC)
    end = tl.minimum((tl.program_id(0) + 1) * BLOCK_T, N)
    for start in range(0, end, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        log_beta = tl.load(log_beta_ptr + row + offs_j, mask=offs_j < N, other=0.0).to(ACC)
        distance = (offs_t[:, None] - offs_j[None, :]).to(ACC)
        visible = (offs_j[None, :] <= offs_t[:, None]) & (offs_j[None, :] < N)
        total += tl.sum(tl.where(visible, tl.exp(distance * log_beta[None, :]), 0.0), axis=1)
    tl.store(capacity_ptr + row + offs_t, total, mask=offs_t < N)


@triton.jit(do_not_specialize=["N"])
def retention_capacity_bwd_kernel(
    log_beta_ptr, grad_capacity_ptr, grad_log_beta_ptr, N,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (sequence, block of j); it walks the t blocks from the block's first j on.
    row = tl.program_id(1).to(tl.int64) * N
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    log_beta = tl.load(log_beta_ptr + row + offs_j, mask=offs_j < N, other=0.0).to(ACC)
    total = tl.zeros((BLOCK_J,), dtype=ACC)
    first = tl.program_id(0) * BLOCK_J // BLOCK_T * BLOCK_T
    for start in range(first, N, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        grad = tl.load(grad_capacity_ptr + row + offs_t, mask=offs_t < N, other=0.0).to(ACC)
        distance = (offs_t[None, :] - offs_j[:, None]).to(ACC)                  # (j, t)
        visible = (offs_j[:, None] <= offs_t[None, :]) & (offs_t[None, :] < N)
        terms = grad[None, :] * distance * tl.exp(distance * log_beta[:, None])
        total += tl.sum(tl.where(visible, terms, 0.0), axis=1)
    tl.store(grad_log_beta_ptr + row + offs_j, total.to(grad_log_beta_ptr.dtype.element_ty), mask=offs_j < N)


def _acc(t: torch.Tensor):
    return (tl.float64, torch.float64) if t.dtype == torch.float64 else (tl.float32, torch.float32)


def capacity_config(device: torch.device) -> dict:
    """Tile of the (t, j) triangle (not yet tuned on a GPU)."""
    if device.type != "cuda":
        return {"BLOCK_T": 64, "BLOCK_J": 64, "num_warps": 4}
    return {"BLOCK_T": 64, "BLOCK_J": 128, "num_warps": 4}


def retention_capacity_fwd(log_beta: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """R (..., N) fp32 (fp64 for fp64) from a contiguous log_beta (..., N)."""
    N = log_beta.shape[-1]
    rows = log_beta.numel() // max(N, 1)
    acc, acc_dtype = _acc(log_beta)
    capacity = torch.empty(log_beta.shape, dtype=acc_dtype, device=log_beta.device)
    if log_beta.numel() == 0:
        return capacity
    cfg = config or capacity_config(log_beta.device)
    record_launch("retention_capacity_fwd_kernel")
    retention_capacity_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]), rows)](
        log_beta, capacity, N, BLOCK_T=cfg["BLOCK_T"], BLOCK_J=cfg["BLOCK_J"], ACC=acc, num_warps=cfg["num_warps"],
    )
    return capacity


def retention_capacity_bwd(grad_capacity: torch.Tensor, log_beta: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """dlog_beta (..., N) in log_beta.dtype; both arguments contiguous (..., N)."""
    N = log_beta.shape[-1]
    rows = log_beta.numel() // max(N, 1)
    acc, _ = _acc(log_beta)
    grad_log_beta = torch.empty_like(log_beta)
    if log_beta.numel() == 0:
        return grad_log_beta
    cfg = config or capacity_config(log_beta.device)
    record_launch("retention_capacity_bwd_kernel")
    retention_capacity_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_J"]), rows)](
        log_beta, grad_capacity, grad_log_beta, N,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_J=cfg["BLOCK_J"], ACC=acc, num_warps=cfg["num_warps"],
    )
    return grad_log_beta
