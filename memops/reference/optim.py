"""Row-sparse optimizer updates: the definition of memops.optim's kernels, and their CPU path.

A step touches only the rows a gradient names. ``rows`` (n,) int64 may repeat a row (one entry per lookup
that read it) and names no row where it is -1; entry e's gradient is ``scales[e] * grads[e // group_size]``
(scales absent: 1; a sparse_coo gradient is grads (n, D) with group_size 1, a weighted gather's fused backward
the output gradient (T, D) with its read weights as scales and group_size K), and a row's gradient is the sum
of its entries'. Every update below runs in
fp32 (fp64 for fp64 tables) on the touched rows alone and writes them back in the table's dtype; the states
are fp32 (fp64 for fp64 tables).

Lazy Adam (torch.optim.SparseAdam's math, plus AdamW's decoupled weight decay on the touched rows), for each
touched row r with summed gradient g (negated when maximizing) at the optimizer's step t:

    w_r   <- w_r * (1 - lr * weight_decay)
    m_r   <- m_r + (1 - beta1) * (g - m_r)
    v_r   <- v_r + (1 - beta2) * (g * g - v_r)
    w_r   <- w_r - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m_r / (sqrt(v_r) + eps)

Exact row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD, weight_decay in its L2 mode as torch.optim.Adagrad's),
one accumulator G_r per row:

    G_r   <- G_r + mean((g + weight_decay * w_r)^2)
    w_r   <- (1 - c * weight_decay) * w_r - c * g,     c = lr / (sqrt(G_r) + eps)

Stochastic rounding of bf16 / fp16 tables (``seed`` given): a uniform random integer below 2^drop is added to
the fp32 bits of the result and the low ``drop`` bits cleared (drop = 16 for bf16, 13 for fp16), so a value
rounds up with probability equal to its distance from the lower neighbour: unbiased. (The kernels draw their
bits from Philox, so the two backends agree in distribution, not bit for bit.)
"""

from __future__ import annotations

import math

import torch


def coalesce_rows(
    rows: torch.Tensor, grads: torch.Tensor, dtype: torch.dtype, scales: torch.Tensor | None = None,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(unique rows (u,) int64 ascending, their summed gradients (u, D) in ``dtype``); rows of -1 dropped."""
    entries = grads.to(dtype)
    if group_size != 1:
        entries = entries.repeat_interleave(group_size, dim=0)[: rows.shape[0]]
    if scales is not None:
        entries = entries * scales.to(dtype).unsqueeze(1)
    if rows.numel() and bool((rows < 0).any()):
        kept = rows >= 0
        rows, entries = rows[kept], entries[kept]
    unique, inverse = torch.unique(rows, return_inverse=True)
    summed = torch.zeros((unique.shape[0], grads.shape[1]), dtype=dtype, device=grads.device)
    return unique, summed.index_add_(0, inverse, entries)


def round_to_table(values: torch.Tensor, dtype: torch.dtype, seed: int | None) -> torch.Tensor:
    """values in the table's dtype: rounded to nearest, or stochastically with ``seed`` (bf16 / fp16)."""
    drop = {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0) if seed is not None else 0
    if not drop:
        return values.to(dtype)
    x = values.to(torch.float32)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << drop, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    rounded = ((x.view(torch.int32) + noise) & ~((1 << drop) - 1)).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(dtype)


def _state_dtype(table: torch.Tensor) -> torch.dtype:
    return torch.float64 if table.dtype == torch.float64 else torch.float32


def sparse_adam_update(
    table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
    *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
    maximize: bool = False, seed: int | None = None, scales: torch.Tensor | None = None, group_size: int = 1,
) -> None:  # fmt: skip
    """Lazy Adam on the rows named by ``rows``, in place: table (R, D), exp_avg and exp_avg_sq (R, D) fp32
    (fp64 for an fp64 table), rows (n,) int64 in [0, R) or -1, grads (ceil(n / group_size), D) and scales (n,)
    or None as above; ``step`` >= 1 is the step being taken; ``seed``: stochastic rounding of a bf16 / fp16
    table."""
    acc = _state_dtype(table)
    unique, g = coalesce_rows(rows, grads, acc, scales, group_size)
    if maximize:
        g = -g
    # (index_select / index_copy_ and in-place math: advanced indexing costs several times more on CPU)
    w = table.index_select(0, unique).to(acc)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    m = exp_avg.index_select(0, unique).lerp_(g, 1 - beta1)  # m + (1 - beta1) * (g - m)
    v = exp_avg_sq.index_select(0, unique).lerp_(g * g, 1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    w.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
    table.index_copy_(0, unique, round_to_table(w, table.dtype, seed))
    exp_avg.index_copy_(0, unique, m)
    exp_avg_sq.index_copy_(0, unique, v)


def rowwise_adagrad_update(
    table: torch.Tensor, sum_sq: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, *, lr: float, eps: float,
    weight_decay: float = 0.0, seed: int | None = None, scales: torch.Tensor | None = None, group_size: int = 1,
) -> None:  # fmt: skip
    """Exact row-wise Adagrad on the rows named by ``rows``, in place: table (R, D), sum_sq (R,) fp32 (fp64 for
    an fp64 table), rows, grads and scales as :func:`sparse_adam_update`."""
    acc = _state_dtype(table)
    unique, g = coalesce_rows(rows, grads, acc, scales, group_size)
    w = table.index_select(0, unique).to(acc)
    decayed = g + w * weight_decay if weight_decay else g
    total = sum_sq.index_select(0, unique) + decayed.square().mean(dim=1)
    c = (lr / (total.sqrt() + eps)).unsqueeze(1)
    table.index_copy_(0, unique, round_to_table((1 - c * weight_decay) * w - c * g, table.dtype, seed))
    sum_sq.index_copy_(0, unique, total)
