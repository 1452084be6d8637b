"""Triton kernels for row-sparse optimizer steps on a (R, D) table: only the rows a gradient names are read and
written, and duplicate entries of a row are summed inside the kernel (no dense temporary of the table's size).

Input of both kernels: ``rows`` (n,) int64 sorted ascending (the launcher sorts them) with ``order`` (n,) the
entry each sorted position came from, so entry e = order[i] belongs to row rows[i]. An entry's gradient is

    grad(e) = scales[e] * grads[e // group_size]        (scales absent: 1)

so a sparse_coo gradient is grads (n, D) with group_size 1, and the fused backward of a weighted gather passes
the output gradient (T, D), the read weights (T * K,) as scales and group_size K: the (T * K, D) entry
gradients are never formed. A row of -1 names no row (its entries are skipped). Program i owns row rows[i]
when i is the first position of that row (rows[i - 1] != rows[i]) and the row is not -1; it sums the row's run
of entries, g = sum_{j: rows[j] = row} grad(order[j]), and updates the row; every other program returns at
once. All math in fp32 (fp64 for fp64 tables); states fp32 (fp64); the table written back rounded to its
dtype. The hyperparameters arrive as a small tensor in the accumulator's dtype (as FBGEMM passes its learning
rate): fp64 tables get fp64 scalars, where a Python float argument would be rounded to fp32.

sparse_adam_kernel (lazy Adam, torch.optim.SparseAdam's math with AdamW's decoupled weight decay), one program
per (position, block of D columns), at step t:

    w <- w * (1 - lr * weight_decay)
    m <- m + (1 - beta1) * (g - m);   v <- v + (1 - beta2) * (g * g - v)
    w <- w - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)        (g negated when maximizing)

rowwise_adagrad_kernel (FBGEMM's exact row-wise Adagrad, weight decay in its L2 mode), one program per
position, over the row's D columns in two passes (the row mean needs all of them before any is written):

    G <- G + mean((g + weight_decay * w)^2);   c = lr / (sqrt(G) + eps)
    w <- (1 - c * weight_decay) * w - c * g

Stochastic rounding (``ROUND_DROP`` > 0: bf16 tables drop 16 bits of the fp32 result, fp16 tables 13): add a
uniform random integer below 2^drop to the fp32 bits and clear them, so the value rounds up with probability
equal to its distance from the lower neighbour (unbiased); the random bits are Philox's at (seed, element).
For fp16 this is exact in its normal range; below 2^-14 the cast then rounds to nearest. NaN stays NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator
from memops.kernels._launch import launch_arch, record_launch


@triton.jit
def _run_start(rows_ptr, i, n):
    """The row of sorted position i, and whether i is where that row's run of entries starts (never for the
    skipped row -1)."""
    row = tl.load(rows_ptr + i)
    previous = tl.load(rows_ptr + tl.maximum(i - 1, 0))
    return row, ((i == 0) | (previous != row)) & (row >= 0)


@triton.jit
def _run_sum(
    grads_ptr, stride_g, scales_ptr, group_size, order_ptr, rows_ptr, i, n, row, offs_d, d_ok, ACC: tl.constexpr
):
    """The summed gradient of ``row`` on columns offs_d: its run of sorted positions i, i + 1, ..."""
    g = tl.zeros(offs_d.shape, dtype=ACC)
    j = i
    current = row
    while current == row:
        entry = tl.load(order_ptr + j)
        grad = tl.load(grads_ptr + (entry // group_size) * stride_g + offs_d, mask=d_ok, other=0.0).to(ACC)
        if scales_ptr is not None:
            grad = grad * tl.load(scales_ptr + entry).to(ACC)
        g += grad
        j += 1
        current = tl.load(rows_ptr + j, mask=j < n, other=-1)  # row ids are >= 0: -1 ends the run
    return g


@triton.jit
def _store_rounded(ptrs, x, mask, seed, element, ROUND_DROP: tl.constexpr):
    """x (fp32 or fp64) stored in the table's dtype: rounded to nearest, or stochastically (ROUND_DROP > 0)."""
    if ROUND_DROP > 0:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        low = (1 << ROUND_DROP) - 1
        noise = tl.randint(seed, element) & low
        rounded = ((bits + noise) & ~low).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x.to(tl.float32))  # a NaN's bits could carry into the sign: keep it
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def sparse_adam_kernel(
    table_ptr, exp_avg_ptr, exp_avg_sq_ptr, rows_ptr, order_ptr, grads_ptr, scales_ptr, hyper_ptr, n, D, stride_t,
    stride_g, group_size, seed, BLOCK_D: tl.constexpr, MAXIMIZE: tl.constexpr, ACC: tl.constexpr,
    ROUND_DROP: tl.constexpr,
):
    # exp_avg and exp_avg_sq are contiguous (R, D). hyper: (1 - lr * weight_decay, 1 - beta1, 1 - beta2, eps,
    # -lr * sqrt(1 - beta2^t) / (1 - beta1^t)).
    decay_factor = tl.load(hyper_ptr)
    one_minus_beta1 = tl.load(hyper_ptr + 1)
    one_minus_beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3)
    neg_step_size = tl.load(hyper_ptr + 4)
    i = tl.program_id(0)
    row, first = _run_start(rows_ptr, i, n)
    if first:
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        g = _run_sum(grads_ptr, stride_g, scales_ptr, group_size, order_ptr, rows_ptr, i, n, row, offs_d, d_ok, ACC)
        if MAXIMIZE:
            g = -g
        w = tl.load(table_ptr + row * stride_t + offs_d, mask=d_ok, other=0.0).to(ACC) * decay_factor
        state = row * D + offs_d
        m = tl.load(exp_avg_ptr + state, mask=d_ok, other=0.0)
        v = tl.load(exp_avg_sq_ptr + state, mask=d_ok, other=0.0)
        m = m + (g - m) * one_minus_beta1
        v = v + (g * g - v) * one_minus_beta2
        w = w + (m / (tl.sqrt(v) + eps)) * neg_step_size
        _store_rounded(table_ptr + row * stride_t + offs_d, w, d_ok, seed, state, ROUND_DROP)
        tl.store(exp_avg_ptr + state, m, mask=d_ok)
        tl.store(exp_avg_sq_ptr + state, v, mask=d_ok)


@triton.jit
def rowwise_adagrad_kernel(
    table_ptr, sum_sq_ptr, rows_ptr, order_ptr, grads_ptr, scales_ptr, hyper_ptr, n, D, stride_t, stride_g,
    group_size, seed,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, ROUND_DROP: tl.constexpr,
):
    # hyper: (lr, eps, weight_decay)
    lr = tl.load(hyper_ptr)
    eps = tl.load(hyper_ptr + 1)
    weight_decay = tl.load(hyper_ptr + 2)
    i = tl.program_id(0)
    row, first = _run_start(rows_ptr, i, n)
    if first:
        squares = tl.zeros((BLOCK_D,), dtype=ACC)
        for start in range(0, D, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            g = _run_sum(
                grads_ptr, stride_g, scales_ptr, group_size, order_ptr, rows_ptr, i, n, row, offs_d, d_ok, ACC
            )
            w = tl.load(table_ptr + row * stride_t + offs_d, mask=d_ok, other=0.0).to(ACC)
            decayed = g + w * weight_decay
            squares += decayed * decayed
        total = tl.load(sum_sq_ptr + row) + tl.sum(squares, axis=0) / D
        tl.store(sum_sq_ptr + row, total)
        c = lr / (tl.sqrt(total) + eps)
        for start in range(0, D, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            g = _run_sum(
                grads_ptr, stride_g, scales_ptr, group_size, order_ptr, rows_ptr, i, n, row, offs_d, d_ok, ACC
            )
            w = tl.load(table_ptr + row * stride_t + offs_d, mask=d_ok, other=0.0).to(ACC)
            w = (1 - c * weight_decay) * w - c * g
            _store_rounded(table_ptr + row * stride_t + offs_d, w, d_ok, seed, row * D + offs_d, ROUND_DROP)


def _block_d(D: int, device: torch.device, cap: int) -> int:
    if launch_arch(device) is None:  # the interpreter: one block per row where it fits
        return min(triton.next_power_of_2(D), 1024)
    return min(triton.next_power_of_2(D), cap)


def _hyperparameters(table: torch.Tensor, *values: float) -> torch.Tensor:
    """The scalars as a tensor of the accumulator's dtype on the table's device (fp64 for fp64 tables)."""
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    return torch.tensor(values, dtype=dtype).to(table.device, non_blocking=True)


def round_drop(table: torch.Tensor, stochastic_rounding: bool) -> int:
    """The fp32 bits stochastic rounding clears for the table's dtype (0: round to nearest)."""
    if not stochastic_rounding:
        return 0
    return {torch.bfloat16: 16, torch.float16: 13}.get(table.dtype, 0)


def _sorted_rows(rows: torch.Tensor):
    sorted_rows, order = torch.sort(rows)
    return sorted_rows.contiguous(), order.contiguous()


def sparse_adam_step(
    table, exp_avg, exp_avg_sq, rows, grads, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, maximize: bool, seed: int | None = None, scales=None, group_size: int = 1,
) -> None:  # fmt: skip
    """Lazy Adam on the rows named by ``rows`` (n,) int64 (repeats summed, -1 skipped), in place. table (R, D)
    with unit last stride; exp_avg, exp_avg_sq (R, D) contiguous fp32 (fp64 for an fp64 table); grads
    (ceil(n / group_size), D) with unit last stride, entry e's gradient ``scales[e] * grads[e // group_size]``
    (scales (n,) contiguous, or None for 1); ``step`` >= 1 the step being taken; ``seed``: stochastic rounding
    of a bf16 / fp16 table (None: round to nearest)."""
    n, D = rows.shape[0], grads.shape[1]
    if n == 0 or D == 0:
        return
    sorted_rows, order = _sorted_rows(rows)
    block_d = _block_d(D, table.device, 256)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    hyper = _hyperparameters(table, 1 - lr * weight_decay, 1 - beta1, 1 - beta2, eps, -step_size)
    record_launch("sparse_adam_kernel")
    sparse_adam_kernel[(n, triton.cdiv(D, block_d))](
        table, exp_avg, exp_avg_sq, sorted_rows, order, grads, scales, hyper, n, D, table.stride(0), grads.stride(0),
        group_size, seed or 0, BLOCK_D=block_d, MAXIMIZE=maximize, ACC=accumulator(table),
        ROUND_DROP=round_drop(table, seed is not None), num_warps=4,
    )


def rowwise_adagrad_step(
    table, sum_sq, rows, grads, *, lr: float, eps: float, weight_decay: float, seed: int | None = None,
    scales=None, group_size: int = 1,
) -> None:  # fmt: skip
    """Exact row-wise Adagrad on the rows named by ``rows`` (n,) int64 (repeats summed, -1 skipped), in place.
    table (R, D) with unit last stride; sum_sq (R,) contiguous fp32 (fp64 for an fp64 table); grads, scales and
    group_size as :func:`sparse_adam_step`; ``seed``: stochastic rounding of a bf16 / fp16 table (None: round
    to nearest)."""
    n, D = rows.shape[0], grads.shape[1]
    if n == 0 or D == 0:
        return
    sorted_rows, order = _sorted_rows(rows)
    block_d = _block_d(D, table.device, 1024)
    hyper = _hyperparameters(table, lr, eps, weight_decay)
    record_launch("rowwise_adagrad_kernel")
    rowwise_adagrad_kernel[(n,)](
        table, sum_sq, sorted_rows, order, grads, scales, hyper, n, D, table.stride(0), grads.stride(0), group_size,
        seed or 0, BLOCK_D=block_d, ACC=accumulator(table), ROUND_DROP=round_drop(table, seed is not None),
        # (a 1024-column block on 4 warps spills 8 B on sm_80: 8 warps hold it)
        num_warps=8 if block_d >= 1024 else 4,
    )
