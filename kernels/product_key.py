"""Triton kernels for product-key memory: the weighted gather from the value table and its backward.

Math (T tokens, K selected rows each, a value table V of S rows by D columns):

    forward          out[t, :]  = sum_k w[t, k] * V[idx[t, k], :]                (fp32 accumulate)
    weights grad     dw[t, k]   = < dout[t, :], V[idx[t, k], :] >
    values grad      dV[s, :]   = sum_{(t, k) : idx[t, k] = s} w[t, k] * dout[t, :]   (zero elsewhere)

The values grad has two kernels: one adds each term with atomics as it goes (fast, order-dependent in
the last bits), the other reduces the terms of each row in a fixed order over the positions sorted by
row (deterministic, no atomics). Loads of 16-bit data are converted to the accumulator type at once,
and every index offset is int64, so tables past 2**31 elements are addressed correctly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops._launches import record_launch


@triton.jit
def weighted_gather_fwd_kernel(
    values_ptr, indices_ptr, weights_ptr, out_ptr,
    K, D, stride_values,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (token, D-slice): BLOCK_K rows of BLOCK_D contiguous columns are in flight at once.
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(indices_ptr + token * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(weights_ptr + token * K + offs_k, mask=mask_k, other=0).to(ACC)
        tile = tl.load(
            values_ptr + rows[:, None] * stride_values + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :], other=0,
        ).to(ACC)
        acc += tl.sum(tile * w[:, None], axis=0)
    tl.store(out_ptr + token * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def weighted_gather_bwd_kernel(
    grad_out_ptr, values_ptr, indices_ptr, weights_ptr, grad_values_ptr, grad_weights_ptr,
    K, D, stride_values,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    WEIGHTS_GRAD: tl.constexpr, ATOMIC_VALUES_GRAD: tl.constexpr,
):
    # One program per (token, K-slice). It walks D once: each step reads one slice of dout[t] and, for
    # the weights grad, the same slice of the selected rows; the atomic values grad reuses that dout slice.
    token = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows = tl.load(indices_ptr + token * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    w = tl.load(weights_ptr + token * K + offs_k, mask=mask_k, other=0).to(ACC)
    dw = tl.zeros((BLOCK_K,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = mask_k[:, None] & mask_d[None, :]
        g = tl.load(grad_out_ptr + token * D + offs_d, mask=mask_d, other=0).to(ACC)
        if WEIGHTS_GRAD:
            tile = tl.load(values_ptr + rows[:, None] * stride_values + offs_d[None, :], mask=mask, other=0).to(ACC)
            dw += tl.sum(tile * g[None, :], axis=1)
        if ATOMIC_VALUES_GRAD:
            # grad_values is dense, contiguous and in ACC precision (fp32 or fp64).
            tl.atomic_add(grad_values_ptr + rows[:, None] * D + offs_d[None, :], w[:, None] * g[None, :], mask=mask)
    if WEIGHTS_GRAD:
        tl.store(grad_weights_ptr + token * K + offs_k, dw.to(grad_weights_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def values_grad_segment_kernel(
    grad_out_ptr, weights_ptr, sorted_positions_ptr, segment_rows_ptr, segment_starts_ptr, segment_ends_ptr,
    grad_values_ptr,
    K, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (segment, D-slice). The positions t*K+k that chose a row sit in [start, end) of the
    # sorted order; they are summed BLOCK_N at a time in that fixed order, so the result is the same bits
    # on every run, and the row is written once, straight into the output dtype.
    segment = tl.program_id(0)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = tl.load(segment_rows_ptr + segment).to(tl.int64)
    start = tl.load(segment_starts_ptr + segment)
    end = tl.load(segment_ends_ptr + segment)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        positions = tl.load(sorted_positions_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        w = tl.load(weights_ptr + positions, mask=mask_n, other=0).to(ACC)
        tokens = positions // K
        g = tl.load(grad_out_ptr + tokens[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0).to(ACC)
        acc += tl.sum(g * w[:, None], axis=0)
    tl.store(grad_values_ptr + row * D + offs_d, acc.to(grad_values_ptr.dtype.element_ty), mask=mask_d)


def _accumulator(*tensors: torch.Tensor):
    # fp64 inputs keep fp64 math, so fp64 gradcheck can run on the Triton path; everything else is fp32.
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _block_d(D: int, cap: int) -> int:
    return min(triton.next_power_of_2(D), cap)


def gather_config(K: int, D: int, element_size: int) -> dict:
    """Forward launch parameters: about 16 KiB of value rows in flight per program."""
    block_d = _block_d(D, 1024 if element_size <= 2 else 512)
    block_k = min(triton.next_power_of_2(K), max(1, 8192 // block_d), 32)
    return {"BLOCK_K": block_k, "BLOCK_D": block_d, "num_warps": 4 if block_k * block_d >= 4096 else 2}


def gather_bwd_config(K: int, D: int) -> dict:
    """Launch parameters of the weights-grad (+ atomic values-grad) kernel."""
    # H100, T=4096 K=128 D=1024/4096: 128-wide D slices with 8 warps were 4-17% faster than 256 with 4.
    block_d = _block_d(D, 128)
    block_k = min(triton.next_power_of_2(K), 16)
    return {"BLOCK_K": block_k, "BLOCK_D": block_d, "num_warps": 8 if block_k * block_d >= 2048 else 4}


def segment_config(D: int) -> dict:
    """Launch parameters of the deterministic values-grad kernel."""
    # Rows are mostly short segments (T*K draws from S rows), so a narrow BLOCK_N wastes fewer lanes:
    # on H100 BLOCK_N=2 with 1024-wide D slices was 1.5-4x faster than BLOCK_N=8 with 512.
    return {"BLOCK_N": 2, "BLOCK_D": _block_d(D, 1024), "num_warps": 4}


def weighted_gather_fwd(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *, config: dict | None = None
) -> torch.Tensor:
    """out (T, D) in values.dtype from values (S, D) with unit column stride, indices (T, K) int32/int64
    contiguous, weights (T, K) float contiguous. ``config`` overrides the launch parameters (tuning)."""
    T, K = indices.shape
    D = values.shape[1]
    out = torch.empty((T, D), dtype=values.dtype, device=values.device)
    if T == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    cfg = config or gather_config(K, D, values.element_size())
    record_launch("weighted_gather_fwd_kernel")
    weighted_gather_fwd_kernel[(T, triton.cdiv(D, cfg["BLOCK_D"]))](
        values, indices, weights, out, K, D, values.stride(0),
        BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], ACC=_accumulator(values, weights),
        num_warps=cfg["num_warps"],
    )
    return out


# Longest run of one row the segment kernel takes under values_grad_algorithm="auto". H100, bf16,
# T=4096 K=128 D=1024 with a tenth of all picks on one row (52K): segment 14.8 ms, atomic 6.0 ms.
LONG_SEGMENT = 4096
# Up to this many (token, k) picks, sorting and its host syncs cost more than atomics save.
SMALL_PROBLEM = 1 << 16


def pick_values_grad_algorithm(values: torch.Tensor, indices: torch.Tensor) -> str:
    """The values-grad kernel for values_grad_algorithm="auto", from H100 measurements (docs/weighted_gather.md).

    fp32/fp64 tables: atomics write the grad in place (T=4096 K=128 D=1024: 4.0 ms vs 3.7 ms segment,
    and 0.04 vs 0.26 ms at T=256 K=32). 16-bit tables: atomics need a dense fp32 buffer, zeroed then
    cast, so the segment kernel wins (bf16 D=1024: 1.8 vs 5.8 ms; D=4096: 6.5 vs 23 ms).
    """
    if values.element_size() >= 4 or indices.numel() <= SMALL_PROBLEM:
        return "atomic"
    return "segment"


def _segments(indices: torch.Tensor):
    """Positions t*K+k sorted by the row they chose (stable), the distinct rows, CSR offsets into the
    sorted positions, and the longest segment."""
    sorted_rows, sorted_positions = torch.sort(indices.reshape(-1), stable=True)
    segment_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    segment_starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=segment_starts[1:])
    return sorted_positions, segment_rows, segment_starts, counts.max()


# Longest run of one row the deterministic kernel sums in one program; longer runs are cut into chunks of
# this size, summed in parallel into fp32 partials, then added up in order by a second pass.
SEGMENT_CHUNK = 1024


def _launch_segment_kernel(src, weights, positions, rows, starts, ends, out, K, D, acc, cfg):
    """out[rows[s]] = sum over i in [starts[s], ends[s]) of weights[positions[i]] * src[positions[i] // K]."""
    record_launch("values_grad_segment_kernel")
    values_grad_segment_kernel[(rows.numel(), triton.cdiv(D, cfg["BLOCK_D"]))](
        src, weights, positions, rows, starts, ends, out, K, D,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], ACC=acc, num_warps=cfg["num_warps"],
    )


def _segment_values_grad(grad_out, weights, sorted_positions, segment_rows, segment_starts, longest, grad_values,
                         K, D, acc, cfg):
    starts, ends = segment_starts[:-1], segment_starts[1:]
    if int(longest) <= SEGMENT_CHUNK:
        _launch_segment_kernel(grad_out, weights, sorted_positions, segment_rows, starts, ends, grad_values, K, D, acc, cfg)
        return
    # A hot row would be one long serial loop. Short segments go straight to their rows; long ones are cut
    # into chunks whose fp32 partial sums are then added in chunk order: still a fixed order, so still
    # bit-identical between runs.
    long = (ends - starts) > SEGMENT_CHUNK
    short = ~long
    if bool(short.any()):
        _launch_segment_kernel(grad_out, weights, sorted_positions, segment_rows[short], starts[short], ends[short],
                               grad_values, K, D, acc, cfg)
    long_starts, long_ends, long_rows = starts[long], ends[long], segment_rows[long]
    chunks = (long_ends - long_starts + SEGMENT_CHUNK - 1) // SEGMENT_CHUNK
    chunk_segment = torch.repeat_interleave(torch.arange(chunks.numel(), device=chunks.device), chunks)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    chunk_ids = torch.arange(chunk_segment.numel(), device=chunks.device)
    chunk_starts = long_starts[chunk_segment] + (chunk_ids - first_chunk[chunk_segment]) * SEGMENT_CHUNK
    chunk_ends = torch.minimum(chunk_starts + SEGMENT_CHUNK, long_ends[chunk_segment])
    partial_dtype = torch.float64 if acc == tl.float64 else torch.float32
    partials = torch.empty((chunk_ids.numel(), D), dtype=partial_dtype, device=grad_out.device)
    _launch_segment_kernel(grad_out, weights, sorted_positions, chunk_ids, chunk_starts, chunk_ends, partials, K, D, acc, cfg)
    ones = torch.ones(chunk_ids.numel(), dtype=partial_dtype, device=grad_out.device)
    _launch_segment_kernel(partials, ones, chunk_ids, long_rows, first_chunk, first_chunk + chunks, grad_values, 1, D, acc, cfg)


def weighted_gather_bwd(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *,
    values_grad_algorithm: str = "auto", values_grad: bool = True, weights_grad: bool = True,
    config: dict | None = None, segment: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_values (S, D) in values.dtype, grad_weights (T, K) in weights.dtype); None where not asked.

    grad_out (T, D) contiguous; the other arguments as for :func:`weighted_gather_fwd`.
    ``values_grad_algorithm``: "segment" (sorted segment reduction: deterministic, each row written once
    straight into values.dtype), "atomic" (atomic adds into a dense fp32 buffer, then a cast), or "auto":
    :func:`pick_values_grad_algorithm`, and atomics after all when one row was chosen more than
    LONG_SEGMENT times, where a segment's serial loop would dominate.
    """
    if values_grad_algorithm not in ("auto", "atomic", "segment"):
        raise ValueError(f"values_grad_algorithm: expected 'auto', 'atomic' or 'segment', got {values_grad_algorithm!r}")
    T, K = indices.shape
    S, D = values.shape
    acc = _accumulator(values, weights, grad_out)
    algorithm = values_grad_algorithm
    if algorithm == "auto":
        algorithm = pick_values_grad_algorithm(values, indices)
    segments = None
    if values_grad and algorithm == "segment" and T * K > 0:
        segments = _segments(indices)
        if values_grad_algorithm == "auto" and int(segments[3]) > LONG_SEGMENT:
            segments = None
    atomic = values_grad and segments is None
    grad_weights = torch.empty((T, K), dtype=weights.dtype, device=weights.device) if weights_grad else None
    grad_values = None
    if values_grad:
        # Atomics need a buffer in accumulator precision; the segment kernel writes each touched row once
        # in values' own dtype, so it only needs the untouched rows zeroed.
        buffer_dtype = (torch.float64 if acc == tl.float64 else torch.float32) if atomic else values.dtype
        grad_values = torch.zeros((S, D), dtype=buffer_dtype, device=values.device)

    if T * K > 0 and D > 0:
        if weights_grad or atomic:
            cfg = config or gather_bwd_config(K, D)
            record_launch("weighted_gather_bwd_kernel")
            weighted_gather_bwd_kernel[(T, triton.cdiv(K, cfg["BLOCK_K"]))](
                grad_out, values, indices, weights,
                grad_values if atomic else grad_out,  # placeholder pointers are never dereferenced
                grad_weights if weights_grad else grad_out,
                K, D, values.stride(0),
                BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], ACC=acc,
                WEIGHTS_GRAD=weights_grad, ATOMIC_VALUES_GRAD=atomic, num_warps=cfg["num_warps"],
            )
        if values_grad and not atomic:
            _segment_values_grad(grad_out, weights, *segments, grad_values, K, D, acc, segment or segment_config(D))
    elif weights_grad:
        grad_weights.zero_()
    if grad_values is not None:
        grad_values = grad_values.to(values.dtype)
    return grad_values, grad_weights
