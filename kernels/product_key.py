"""Triton kernels for product-key memory: the product-key search, the weighted gather from the value
table, and their backward passes.

Search (per token t and memory head h; query q = [q1; q2], sub-key tables C1, C2 of n rows each):

    s1 = C1 q1,  s2 = C2 q2                                     (n scores per half, no scaling)
    (S1, I1) = top-k(s1),  (S2, I2) = top-k(s2)                  (sorted descending)
    scores, slots = top-k over (a, b) of S1[a] + S2[b],  slot = I1[a] * n + I2[b]

It is exact: a pair in the top-k of all n*n sums has both halves in their half's top-k. Its backward is
two weighted gathers over the sub-key tables: dq1 = sum_j dscore_j C1[i1_j] (and dq2 alike) is the forward
gather with weights dscore, and dC1[i1_j] += dscore_j q1 is the gather's values grad with q1 as dout.

Gather (T tokens, K selected rows each, a value table V of S rows by D columns):

    forward          out[t, :]  = sum_k w[t, k] * V[idx[t, k], :]                (fp32 accumulate)
    weights grad     dw[t, k]   = < dout[t, :], V[idx[t, k], :] >
    values grad      dV[s, :]   = sum_{(t, k) : idx[t, k] = s} w[t, k] * dout[t, :]   (zero elsewhere)

The values grad has two kernels: one adds each term with atomics as it goes (fast, order-dependent in
the last bits), the other reduces the terms of each row in a fixed order over the positions sorted by
row (deterministic, no atomics). Loads of 16-bit data are converted to the accumulator type at once,
and every index offset is int64, so tables past 2**31 elements are addressed correctly.

An 8-bit table (memops.QuantizedTable: e4m3 or int8 data with one scale per row per block of B columns)
is read by the forward and the weights grad through ``table_rows``: V[s, c] = data[s, c] * scale[s, c // B],
dequantized in registers, the product in fp32 as memops.dequantize_table defines it (an e8m0 scale byte b is
the float whose exponent field is b: 2^(b - 127), built from its bits, exact). GPUs before sm_89 have no e4m3
type: there the data is read as bytes and decoded from its bits (sign, 4 exponent bits of bias 7, 3 mantissa
bits; exponent 0 is subnormal: m * 2^-9), exact too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator, dot_precision
from memops.kernels._launch import launch_arch, record_launch
from memops.kernels.topk import empty_entries, merge_topk, pack_entries, topk_entries, unpack_entries


@triton.jit
def _e4m3_from_bytes(raw):
    """e4m3fn values from their bytes (uint8), in fp32: 1.m * 2^(e - 7), or m * 2^-9 where e = 0."""
    bits = raw.to(tl.int32)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    negative = (bits >> 7) == 1
    normal = (((bits >> 7) << 31) | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125
    return tl.where(exponent == 0, tl.where(negative, -subnormal, subnormal), normal)


@triton.jit
def table_rows(values_ptr, scales_ptr, rows, offs_d, mask, stride_values, stride_scales, block_size,
                E8M0: tl.constexpr, FP8_BYTES: tl.constexpr, ACC: tl.constexpr):
    """The (rows, offs_d) tile of the table in ACC: a float table's values, or an 8-bit table's data times its
    block scales (scales_ptr not None), multiplied in fp32 as dequantize_table defines it (exact for e8m0);
    FP8_BYTES: e4m3 data passed as bytes, decoded here (before sm_89)."""
    if FP8_BYTES:
        raw = tl.load(values_ptr + rows[:, None] * stride_values + offs_d[None, :], mask=mask, other=0)
        tile = _e4m3_from_bytes(raw)
    else:
        tile = tl.load(values_ptr + rows[:, None] * stride_values + offs_d[None, :], mask=mask, other=0.0)
    if scales_ptr is None:
        out = tile.to(ACC)
    else:
        tile = tile.to(tl.float32)  # (converted as soon as loaded: the raw bytes need not stay live with the scales)
        scale = tl.load(scales_ptr + rows[:, None] * stride_scales + (offs_d // block_size)[None, :], mask=mask,
                        other=0)
        if E8M0:  # the byte as a float's exponent field: 2^(b - 127) (b = 0: 2^-127, a subnormal)
            bits = scale.to(tl.int32)
            scale = tl.where(bits == 0, 0x00400000, bits << 23).to(tl.float32, bitcast=True)
        # the product in fp32, as dequantize_table defines it (also: there is no e4m3 -> fp64 cast)
        out = (tile * scale.to(tl.float32)).to(ACC)
    return out


@triton.jit
def weighted_gather_fwd_kernel(
    values_ptr, indices_ptr, weights_ptr, out_ptr,
    K, D, stride_values, scales_ptr, stride_scales, block_size,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, E8M0: tl.constexpr, FP8_BYTES: tl.constexpr,
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
        tile = table_rows(values_ptr, scales_ptr, rows, offs_d, mask_k[:, None] & mask_d[None, :], stride_values,
                           stride_scales, block_size, E8M0, FP8_BYTES, ACC)
        acc += tl.sum(tile * w[:, None], axis=0)
    tl.store(out_ptr + token * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def weighted_gather_bwd_kernel(
    grad_out_ptr, values_ptr, indices_ptr, weights_ptr, grad_values_ptr, grad_weights_ptr,
    K, D, stride_values, scales_ptr, stride_scales, block_size,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, E8M0: tl.constexpr, FP8_BYTES: tl.constexpr,
):
    # One program per (token, K-slice). It walks D once: each step reads one slice of dout[t] and, for
    # the weights grad, the same slice of the selected rows; the atomic values grad reuses that dout slice.
    # grad_weights_ptr None: no weights grad; grad_values_ptr None: no atomic values grad (none, or the
    # segment kernel's).
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
        if grad_weights_ptr is not None:
            tile = table_rows(values_ptr, scales_ptr, rows, offs_d, mask, stride_values, stride_scales, block_size,
                               E8M0, FP8_BYTES, ACC)
            dw += tl.sum(tile * g[None, :], axis=1)
        if grad_values_ptr is not None:
            # grad_values is dense, contiguous and in ACC precision (fp32 or fp64).
            tl.atomic_add(grad_values_ptr + rows[:, None] * D + offs_d[None, :], w[:, None] * g[None, :], mask=mask)
    if grad_weights_ptr is not None:
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
        g = tl.load(grad_out_ptr + tokens[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0).to(ACC)
        acc += tl.sum(g * w[:, None], axis=0)
    tl.store(grad_values_ptr + row * D + offs_d, acc.to(grad_values_ptr.dtype.element_ty), mask=mask_d)


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


def table_args(values: torch.Tensor, scales: torch.Tensor | None, block_size: int) -> dict:
    """The kernels' table arguments: the table (e4m3 data as bytes before sm_89, which has no e4m3 type), the
    scales (S, blocks) (None: a float table), their row stride, the block size, whether they are e8m0 bytes."""
    arch = launch_arch(values.device)
    fp8_bytes = values.dtype == torch.float8_e4m3fn and arch is not None and arch < 89
    table = dict(values_ptr=values.view(torch.uint8) if fp8_bytes else values, stride_values=values.stride(0),
                 FP8_BYTES=fp8_bytes)  # fmt: skip
    if scales is None:
        return dict(table, scales_ptr=None, stride_scales=0, block_size=1, E8M0=False)
    return dict(table, scales_ptr=scales, stride_scales=scales.stride(0), block_size=block_size,
                E8M0=scales.dtype == torch.uint8)  # fmt: skip


def weighted_gather_fwd(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *, config: dict | None = None,
    scales: torch.Tensor | None = None, block_size: int = 1, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """out (T, D) in values.dtype (or ``out_dtype``) from values (S, D) with unit column stride, indices (T, K)
    int32/int64 contiguous, weights (T, K) float contiguous. An 8-bit table: values its data (e4m3 or int8) and
    ``scales`` (S, ceil(D / block_size)) with unit column stride (uint8 e8m0 or fp32). ``config`` overrides the
    launch parameters (tuning)."""
    T, K = indices.shape
    D = values.shape[1]
    out = torch.empty((T, D), dtype=out_dtype or values.dtype, device=values.device)
    if T == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    cfg = config or gather_config(K, D, values.element_size())
    if scales is not None and config is None and cfg["BLOCK_K"] * cfg["BLOCK_D"] >= 8192:
        # 8-bit rows and their scales dequantized in fp32: 8 warps hold the tile (4 spill on sm_80, Triton 3.6)
        cfg = dict(cfg, num_warps=8)
    record_launch("weighted_gather_fwd_kernel")
    weighted_gather_fwd_kernel[(T, triton.cdiv(D, cfg["BLOCK_D"]))](
        indices_ptr=indices, weights_ptr=weights, out_ptr=out, K=K, D=D, **table_args(values, scales, block_size),
        BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], ACC=accumulator(values, weights),
        num_warps=cfg["num_warps"],
    )
    return out


# Longest run of one row the segment kernel takes under values_grad_algorithm="auto". H100, bf16,
# T=4096 K=128 D=1024 with a tenth of all picks on one row (52K): segment 14.8 ms, atomic 6.0 ms.
LONG_SEGMENT = 4096
# Up to this many (token, k) picks, sorting and its host syncs cost more than atomics save.
SMALL_PROBLEM = 1 << 16


def pick_values_grad_algorithm(values: torch.Tensor, indices: torch.Tensor) -> str:
    """The values-grad kernel for values_grad_algorithm="auto", from H100 measurements (docs/product_key_gather.md).

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
        _launch_segment_kernel(grad_out, weights, sorted_positions, segment_rows, starts, ends, grad_values, K, D, acc,
                               cfg)
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
    _launch_segment_kernel(grad_out, weights, sorted_positions, chunk_ids, chunk_starts, chunk_ends, partials, K, D,
                           acc, cfg)
    ones = torch.ones(chunk_ids.numel(), dtype=partial_dtype, device=grad_out.device)
    _launch_segment_kernel(partials, ones, chunk_ids, long_rows, first_chunk, first_chunk + chunks, grad_values, 1, D,
                           acc, cfg)


def weighted_gather_bwd(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *,
    values_grad_algorithm: str = "auto", values_grad: bool = True, weights_grad: bool = True,
    config: dict | None = None, segment_kernel_config: dict | None = None, scales: torch.Tensor | None = None,
    block_size: int = 1,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_values (S, D) in values.dtype, grad_weights (T, K) in weights.dtype); None where not asked.

    grad_out (T, D) contiguous; the other arguments as for :func:`weighted_gather_fwd` (an 8-bit table, with
    ``scales``, gives a weights grad only).
    ``values_grad_algorithm``: "segment" (sorted segment reduction: deterministic, each row written once
    straight into values.dtype), "atomic" (atomic adds into a dense fp32 buffer, then a cast), or "auto":
    :func:`pick_values_grad_algorithm`, and atomics after all when one row was chosen more than
    LONG_SEGMENT times, where a segment's serial loop would dominate. ``config`` and ``segment_kernel_config``
    override the launch parameters of the gather-grad and the segment kernels (tuning).
    """
    if values_grad_algorithm not in ("auto", "atomic", "segment"):
        raise ValueError(
            f"values_grad_algorithm: expected 'auto', 'atomic' or 'segment', got {values_grad_algorithm!r}")
    T, K = indices.shape
    S, D = values.shape
    acc = accumulator(values, weights, grad_out)
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
                grad_out_ptr=grad_out, indices_ptr=indices, weights_ptr=weights,
                grad_values_ptr=grad_values if atomic else None, grad_weights_ptr=grad_weights, K=K, D=D,
                **table_args(values, scales, block_size),
                BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], ACC=acc, num_warps=cfg["num_warps"],
            )
        if values_grad and not atomic:
            segment_launch = segment_kernel_config or segment_config(D)
            _segment_values_grad(grad_out, weights, *segments, grad_values, K, D, acc, segment_launch)
    elif weights_grad:
        grad_weights.zero_()
    if grad_values is not None:
        grad_values = grad_values.to(values.dtype)
    return grad_values, grad_weights


# ---------------------------------------------------------------------------------------------------------
# Product-key search (top-k entries packed into int64: see memops.kernels.topk)


@triton.jit
def _chunk(x, CHUNKS: tl.constexpr, WHICH: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr):
    """Columns [WHICH * w, (WHICH + 1) * w) of a (BLOCK_T, K_PAD) entry set, w = K_PAD // CHUNKS."""
    chunks = tl.reshape(x, (BLOCK_T, CHUNKS, K_PAD // CHUNKS))
    selected = tl.arange(0, CHUNKS)[None, :, None] == WHICH
    return tl.max(tl.where(selected, chunks, empty_entries(chunks)), axis=1)


@triton.jit
def _half_topk(
    q, keys_ptr, n_keys, half_dim, offs_h, mask_h,
    T_LOG2: tl.constexpr, N_LOG2: tl.constexpr, K_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Top 2**K_LOG2 of q @ keys.T per row of q (2**T_LOG2, BLOCK_H), streaming the (n_keys, half_dim)
    table 2**N_LOG2 rows at a time."""
    BLOCK_N: tl.constexpr = 1 << N_LOG2
    best = empty_entries(tl.zeros((1 << T_LOG2, 1 << K_LOG2), dtype=tl.int64))
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        keys_t = tl.load(keys_ptr + offs_n[None, :].to(tl.int64) * half_dim + offs_h[:, None],
                         mask=mask_h[:, None] & mask_n[None, :], other=0)
        scores = tl.dot(q, keys_t, input_precision=DOT_PRECISION).to(tl.float32)
        block_best = topk_entries(pack_entries(scores, offs_n[None, :], mask_n[None, :]), T_LOG2, N_LOG2, K_LOG2)
        best = merge_topk(best, block_best, T_LOG2, K_LOG2)
    return best


@triton.jit
def _pair_candidates(rows, cols, n_keys, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr):
    """Entries for every (a, b) of rows (BLOCK_T, R) x cols (BLOCK_T, K_PAD // R): score S1[a] + S2[b],
    slot I1[a] * n_keys + I2[b], flattened to (BLOCK_T, K_PAD)."""
    s1, i1, ok1 = unpack_entries(rows)
    s2, i2, ok2 = unpack_entries(cols)
    packed = pack_entries(s1[:, :, None] + s2[:, None, :], i1[:, :, None] * n_keys + i2[:, None, :],
                   ok1[:, :, None] & ok2[:, None, :])
    return tl.reshape(packed, (BLOCK_T, K_PAD))


@triton.jit(do_not_specialize=["T"])
def product_key_search_kernel(
    queries_ptr, sub_keys_ptr, scores_ptr, indices_ptr,
    T, n_keys,
    HEADS: tl.constexpr, HALF_DIM: tl.constexpr, TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
    T_LOG2: tl.constexpr, N_LOG2: tl.constexpr, K_LOG2: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (block of 2**T_LOG2 tokens, memory head). Neither the (T, n_keys) half scores nor the
    # k x k candidate sums ever reach global memory.
    BLOCK_T: tl.constexpr = 1 << T_LOG2
    K_PAD: tl.constexpr = 1 << K_LOG2
    head = tl.program_id(1)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF_DIM
    q_rows = queries_ptr + (offs_t[:, None] * HEADS + head) * (2 * HALF_DIM) + offs_h[None, :]
    q_mask = mask_t[:, None] & mask_h[None, :]
    table = sub_keys_ptr + head.to(tl.int64) * 2 * n_keys * HALF_DIM
    best1 = _half_topk(tl.load(q_rows, mask=q_mask, other=0), table, n_keys, HALF_DIM, offs_h, mask_h,
                       T_LOG2, N_LOG2, K_LOG2, DOT_PRECISION)
    best2 = _half_topk(tl.load(q_rows + HALF_DIM, mask=q_mask, other=0), table + n_keys * HALF_DIM, n_keys,
                       HALF_DIM, offs_h, mask_h, T_LOG2, N_LOG2, K_LOG2, DOT_PRECISION)
    # Both lists are sorted, so pair (a, b) is beaten by the (a + 1)(b + 1) - 1 pairs (a' <= a, b' <= b):
    # only pairs with (a + 1)(b + 1) <= K_PAD can make the top K_PAD. Row a = 0 pairs with every b; rows
    # [2^j, 2^(j+1)) pair with b < K_PAD / 2^j. That is K_PAD (1 + log2 K_PAD) candidates instead of K_PAD^2.
    final = _pair_candidates(_chunk(best1, K_PAD, 0, BLOCK_T, K_PAD), best2, n_keys, BLOCK_T, K_PAD)
    for j in tl.static_range(K_LOG2):
        rows = _chunk(best1, K_PAD >> j, 1, BLOCK_T, K_PAD)
        cols = _chunk(best2, 1 << j, 0, BLOCK_T, K_PAD)
        final = merge_topk(final, _pair_candidates(rows, cols, n_keys, BLOCK_T, K_PAD), T_LOG2, K_LOG2)
    scores, slots, _ = unpack_entries(final)
    offs_k = tl.arange(0, K_PAD)
    out = (offs_t[:, None] * HEADS + head) * TOPK + offs_k[None, :]
    out_mask = mask_t[:, None] & (offs_k[None, :] < TOPK)
    tl.store(scores_ptr + out, scores, mask=out_mask)
    tl.store(indices_ptr + out, slots, mask=out_mask)


def search_reference_instead(queries: torch.Tensor) -> str | None:
    """Why the "auto" backend should run the reference search on queries' device, or None. fp32 on CUDA:
    at matmul precision "highest" the score dots are ieee, lowered to FMA, which spill 16 KB at half dim 256
    (and take ptxas 10 minutes); with tf32 dots the 64-token top-32 merge spills 770-1,000 B at every half dim
    from 64 (`memops gpu-check`). cuBLAS's GEMM plus torch.topk is the better fp32 path."""
    arch = launch_arch(queries.device)
    if arch is None:
        return None
    if queries.dtype == torch.float32:
        return "fp32: FMA score dots (ieee) or the tf32 top-k merge spill"
    if arch < 90 and queries.shape[-1] // 2 > 32:
        # sm_80 from half dim 64: at 32 tokens x 8 warps Triton 3.6 spills 5.5 KB (3.9: 40 B at half dim 256),
        # at 4 warps 3.9 spills 8-96 B, 64 tokens spill from half dim 128; ptxas takes 2-6 minutes per variant
        return "sm_80, half dim > 32: the score tile and the top-k merge spill"
    return None


def search_config(n_keys: int, k_pad: int, device: torch.device) -> dict:
    """Launch parameters of the search kernel. On CUDA, 64 tokens per program so the score dots reach wgmma
    (64 rows per warpgroup) on sm_90, and 8 warps so the (64, BLOCK_N) packed-entry sort fits in registers
    (`memops gpu-check`; the order among clean configs still needs a GPU timing)."""
    block_n = max(k_pad, min(triton.next_power_of_2(n_keys), 128))
    arch = launch_arch(device)
    if arch is None:  # the interpreter: few, large programs
        return {"BLOCK_T": 32, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    if arch >= 90:  # 2 stages: 3 need 228 KiB at half dim 256, 1 KiB over the limit
        return {"BLOCK_T": 64, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 2}
    # sm_80: 64 rows spill 48-128 B at half dim >= 128 and 32 rows at 4 warps 8-96 B (mma.sync needs only 16
    # rows per warp); 32 rows at 8 warps halve the entries each thread sorts
    return {"BLOCK_T": 32, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 2}


def _log2(n: int) -> int:
    return n.bit_length() - 1


def product_key_search(
    queries: torch.Tensor, sub_keys: torch.Tensor, topk: int, *, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (T, Hm, topk) fp32 sorted descending and slot indices (T, Hm, topk) int64.

    queries (T, Hm, Dk) contiguous; sub_keys (Hm, 2, n_keys, Dk // 2) contiguous, same dtype;
    1 <= topk <= n_keys, n_keys**2 < 2**31. Scores are computed in fp32 (also for fp64 inputs).
    """
    T, heads, key_dim = queries.shape
    n_keys, half_dim = sub_keys.shape[2], sub_keys.shape[3]
    scores = torch.empty((T, heads, topk), dtype=torch.float32, device=queries.device)
    indices = torch.empty((T, heads, topk), dtype=torch.int64, device=queries.device)
    if T * heads == 0:
        return scores, indices
    k_pad = max(2, triton.next_power_of_2(topk))  # the bitonic network works on powers of two
    cfg = config or search_config(n_keys, k_pad, queries.device)
    record_launch("product_key_search_kernel")
    product_key_search_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), heads)](
        queries, sub_keys, scores, indices, T, n_keys,
        HEADS=heads, HALF_DIM=half_dim, TOPK=topk, BLOCK_H=max(16, triton.next_power_of_2(half_dim)),
        T_LOG2=_log2(cfg["BLOCK_T"]), N_LOG2=_log2(cfg["BLOCK_N"]), K_LOG2=_log2(k_pad),
        DOT_PRECISION=dot_precision(queries), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
    )
    return scores, indices
