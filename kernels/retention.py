"""Triton kernels for TRIM-KV's retention capacity and the eviction of a retention-gated KV cache.

Capacity (per batch and KV head, over positions t, j of one sequence of log_beta[j] <= 0):

    R[t]            = sum_{start[t] <= j <= t} exp((t - j) * log_beta[j])
    dlog_beta[j]    = sum_{j <= t < end[j]} dR[t] * (t - j) * exp((t - j) * log_beta[j])

start[t] / end[j] bound the token's packed document (0 and N without documents). Both stream tiles of the
(t, j) triangle through registers, and only the tiles that touch the block's documents: the N x N terms are
never stored.

Eviction (per batch and KV head, over the L rows of a cache, the newest token at position t):

    score[j] = log_beta[j] * (t + 1 - pos[j]);   keep the `budget` rows of largest score, in their order

One program selects with a bitonic top-k over (score, row) packed into int64 (ties: the older row), then
writes the kept rows' indices in increasing order; the K/V/log_beta/position gather is a second kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator, accumulator_torch_dtype, finite_log_beta
from memops.kernels._launch import launch_arch, record_launch
from memops.kernels.topk import empty_entries, merge_topk, pack_entries, topk_entries


@triton.jit(do_not_specialize=["N", "rows_per_batch"])
def retention_capacity_fwd_kernel(
    log_beta_ptr, capacity_ptr, starts_ptr, N, rows_per_batch, stride_starts,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (sequence, block of t); it walks the j blocks up to the block's last t. With packed
    # documents it starts at the block's first document (starts[t] is non-decreasing in t), not at 0.
    pid_t = tl.program_id(0)
    sequence = tl.program_id(1).to(tl.int64)
    row = sequence * N
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_T,), dtype=ACC)
    end = tl.minimum((pid_t + 1) * BLOCK_T, N)
    first = 0
    if starts_ptr is not None:  # packed documents
        starts_row = starts_ptr + sequence // rows_per_batch * stride_starts
        t_start = tl.load(starts_row + offs_t, mask=offs_t < N, other=N)
        first = tl.load(starts_row + pid_t * BLOCK_T) // BLOCK_J * BLOCK_J
    for start in range(first, end, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        log_beta = finite_log_beta(tl.load(log_beta_ptr + row + offs_j, mask=offs_j < N, other=0.0).to(ACC))
        distance = (offs_t[:, None] - offs_j[None, :]).to(ACC)
        visible = (offs_j[None, :] <= offs_t[:, None]) & (offs_j[None, :] < N)
        if starts_ptr is not None:
            visible = visible & (offs_j[None, :] >= t_start[:, None])
        # Masked before the exp: (t - j) < 0 with a very negative log_beta would overflow.
        total += tl.sum(tl.exp(tl.where(visible, distance * log_beta[None, :], float("-inf"))), axis=1)
    tl.store(capacity_ptr + row + offs_t, total, mask=offs_t < N)


@triton.jit(do_not_specialize=["N", "rows_per_batch"])
def retention_capacity_bwd_kernel(
    log_beta_ptr, grad_capacity_ptr, grad_log_beta_ptr, ends_ptr, N, rows_per_batch, stride_ends,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (sequence, block of j); it walks the t blocks from the block's first j on, up to the
    # end of the block's last document when documents are packed.
    pid_j = tl.program_id(0)
    sequence = tl.program_id(1).to(tl.int64)
    row = sequence * N
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    log_beta = finite_log_beta(tl.load(log_beta_ptr + row + offs_j, mask=offs_j < N, other=0.0).to(ACC))
    total = tl.zeros((BLOCK_J,), dtype=ACC)
    first = pid_j * BLOCK_J // BLOCK_T * BLOCK_T
    last = N
    if ends_ptr is not None:  # packed documents
        ends_row = ends_ptr + sequence // rows_per_batch * stride_ends
        j_end = tl.load(ends_row + offs_j, mask=offs_j < N, other=0)
        last = tl.load(ends_row + tl.minimum((pid_j + 1) * BLOCK_J, N) - 1)
    for start in range(first, last, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        grad = tl.load(grad_capacity_ptr + row + offs_t, mask=offs_t < N, other=0.0).to(ACC)
        distance = (offs_t[None, :] - offs_j[:, None]).to(ACC)                  # (j, t)
        visible = (offs_j[:, None] <= offs_t[None, :]) & (offs_t[None, :] < N)
        if ends_ptr is not None:
            visible = visible & (offs_t[None, :] < j_end[:, None])
        decay = tl.exp(tl.where(visible, distance * log_beta[:, None], float("-inf")))
        total += tl.sum(tl.where(visible, grad[None, :] * distance * decay, 0.0), axis=1)
    tl.store(grad_log_beta_ptr + row + offs_j, total.to(grad_log_beta_ptr.dtype.element_ty), mask=offs_j < N)


def capacity_config(device: torch.device) -> dict:
    """Tile of the (t, j) triangle (not yet timed on a GPU). On CUDA 8 warps: at 4 the backward sits at 255
    registers and spills 8 B on sm_80 under Triton 3.6 (8 warps: 156-237)."""
    if launch_arch(device) is None:
        return {"BLOCK_T": 64, "BLOCK_J": 64, "num_warps": 4}
    return {"BLOCK_T": 64, "BLOCK_J": 128, "num_warps": 8}


def _capacity_launch(log_beta: torch.Tensor, bounds: torch.Tensor | None, config: dict | None):
    """(N, rows, config, bounds pointer, rows per batch row, batch stride) for a capacity kernel over a
    contiguous log_beta (..., N); bounds is a (B|1, N) int32 starts/ends tensor, or None (no documents)."""
    N = log_beta.shape[-1]
    rows = log_beta.numel() // max(N, 1)
    cfg = config or capacity_config(log_beta.device)
    if bounds is None:
        return N, rows, cfg, None, 1, 0
    batch = bounds.shape[0]
    return N, rows, cfg, bounds, max(rows // batch, 1), bounds.stride(0) if batch > 1 else 0


def retention_capacity_fwd(log_beta: torch.Tensor, starts: torch.Tensor | None = None, *,
                           config: dict | None = None) -> torch.Tensor:
    """R (..., N) fp32 (fp64 for fp64) from a contiguous log_beta (..., N); starts (B|1, N) int32 contiguous:
    each position's document start (packed documents, batch dim first), or None."""
    capacity = torch.empty(log_beta.shape, dtype=accumulator_torch_dtype(log_beta), device=log_beta.device)
    if log_beta.numel() == 0:
        return capacity
    N, rows, cfg, pointer, rows_per_batch, stride = _capacity_launch(log_beta, starts, config)
    record_launch("retention_capacity_fwd_kernel")
    retention_capacity_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_T"]), rows)](
        log_beta, capacity, pointer, N, rows_per_batch, stride,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_J=cfg["BLOCK_J"], ACC=accumulator(log_beta),
        num_warps=cfg["num_warps"],
    )
    return capacity


def retention_capacity_bwd(grad_capacity: torch.Tensor, log_beta: torch.Tensor, ends: torch.Tensor | None = None,
                           *, config: dict | None = None) -> torch.Tensor:
    """dlog_beta (..., N) in log_beta.dtype; both arguments contiguous (..., N); ends (B|1, N) int32
    contiguous: one past each position's document end, or None."""
    grad_log_beta = torch.empty_like(log_beta)
    if log_beta.numel() == 0:
        return grad_log_beta
    N, rows, cfg, pointer, rows_per_batch, stride = _capacity_launch(log_beta, ends, config)
    record_launch("retention_capacity_bwd_kernel")
    retention_capacity_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_J"]), rows)](
        log_beta, grad_capacity, grad_log_beta, pointer, N, rows_per_batch, stride,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_J=cfg["BLOCK_J"], ACC=accumulator(log_beta),
        num_warps=cfg["num_warps"],
    )
    return grad_log_beta


@triton.jit(do_not_specialize=["length", "budget", "newest_plus_one"])
def retention_select_kernel(
    log_beta_ptr, positions_ptr, kept_ptr, length, budget, newest_plus_one, stride_row,
    K_LOG2: tl.constexpr, CHUNK_LOG2: tl.constexpr,
):
    # One program per (batch, kv head) row of the cache. Pass 1 keeps a running top-2**K_LOG2 of the packed
    # (score, row) entries chunk by chunk; the budget-th largest entry is the threshold. Pass 2 writes the
    # rows at or above it (exactly `budget`, entries being distinct) in row order via a running prefix sum.
    CHUNK: tl.constexpr = 1 << CHUNK_LOG2
    row = tl.program_id(0).to(tl.int64)
    log_beta_row = log_beta_ptr + row * stride_row
    positions_row = positions_ptr + row * stride_row
    best = empty_entries(tl.zeros((1, 1 << K_LOG2), dtype=tl.int64))
    for start in range(0, length, CHUNK):
        entries = _eviction_entries(log_beta_row, positions_row, start, length, newest_plus_one, CHUNK)
        best = merge_topk(best, topk_entries(entries[None, :], 0, CHUNK_LOG2, K_LOG2), 0, K_LOG2)
    offs_k = tl.arange(0, 1 << K_LOG2)
    threshold = tl.sum(tl.where(offs_k[None, :] == budget - 1, best, 0), axis=1)
    written = 0
    for start in range(0, length, CHUNK):
        entries = _eviction_entries(log_beta_row, positions_row, start, length, newest_plus_one, CHUNK)
        offs = start + tl.arange(0, CHUNK)
        keep = (entries >= threshold) & (offs < length)
        destination = written + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(kept_ptr + row * budget + destination, offs.to(tl.int64), mask=keep)
        written += tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def _eviction_entries(log_beta_row, positions_row, start, length, newest_plus_one, CHUNK: tl.constexpr):
    """Packed (score, row) entries of rows [start, start + CHUNK): score log_beta * (t + 1 - pos), the
    index bits inverted so that equal scores rank the older (lower) row first."""
    offs = start + tl.arange(0, CHUNK)
    valid = offs < length
    log_beta = tl.load(log_beta_row + offs, mask=valid, other=0.0).to(tl.float32)
    age = (newest_plus_one - tl.load(positions_row + offs, mask=valid, other=0)).to(tl.float32)
    return pack_entries(log_beta * age, 0x7FFFFFFF - offs, valid)


@triton.jit(do_not_specialize=["budget", "width"])
def cache_gather_kernel(
    src_ptr, kept_ptr, dst_ptr, budget, width, stride_src_row, stride_dst_row,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # dst[row, r, :] = src[row, kept[row, r], :] for the kept rows of one (batch, kv head) row of the cache.
    row = tl.program_id(1).to(tl.int64)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < budget
    kept = tl.load(kept_ptr + row * budget + offs_r, mask=mask_r, other=0)
    for w0 in range(0, width, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        mask = mask_r[:, None] & (offs_w[None, :] < width)
        rows = tl.load(src_ptr + row * stride_src_row + kept[:, None] * width + offs_w[None, :], mask=mask)
        tl.store(dst_ptr + row * stride_dst_row + offs_r[:, None].to(tl.int64) * width + offs_w[None, :], rows,
                 mask=mask)


def retention_select(log_beta: torch.Tensor, positions: torch.Tensor, length: int, newest_position: int,
                     budget: int) -> torch.Tensor:
    """kept (rows, budget) int64: per row of the (rows, capacity) log_beta and positions buffers (unit last
    stride, the first `length` entries valid), the `budget` rows of largest eviction score in increasing
    order. 1 <= budget <= length < 2**31."""
    rows = log_beta.shape[0]
    kept = torch.empty((rows, budget), dtype=torch.int64, device=log_beta.device)
    k_pad = max(2, triton.next_power_of_2(budget))
    chunk = max(k_pad, 1024)
    record_launch("retention_select_kernel")
    retention_select_kernel[(rows,)](
        log_beta, positions, kept, length, budget, newest_position + 1, log_beta.stride(0),
        # 16 warps: at 8 Triton 3.6 spills 8 B (sm_90), at 4 its layout pass crashes for a 1024 budget
        K_LOG2=k_pad.bit_length() - 1, CHUNK_LOG2=chunk.bit_length() - 1, num_warps=16,
    )
    return kept


def cache_gather(src: torch.Tensor, kept: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[r, :budget] = src[r, kept[r]] for (rows, capacity, width) contiguous src/dst (width may be 1 for a
    (rows, capacity) buffer viewed with a trailing dim) and kept (rows, budget)."""
    rows, budget = kept.shape
    width = src.shape[2]
    block_w = min(triton.next_power_of_2(width), 256)
    # 16 elements per thread at most: width-1 rows (log_beta, positions) with 4096 rows per program sat at
    # 255 registers and spilled (memops gpu-check, sm_90/sm_80).
    block_r = max(1, min(2048, 4096 // block_w))
    record_launch("cache_gather_kernel")
    cache_gather_kernel[(triton.cdiv(budget, block_r), rows)](
        src, kept, dst, budget, width, src.stride(0), dst.stride(0), BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=4,
    )
