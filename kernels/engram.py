"""Triton kernels for Engram's hashed n-gram memory: the n-gram hash, the fused hash + multi-head lookup, the
context gate and the short convolution.

Hash (token ids x of a (B, L) batch, max order N, h heads per order, odd int64 multipliers m_k, primes
p_{n,j}):

    x_k[t]     = x[t - k] if t >= k else pad_id                        (left padding within each row)
    mix_n[t]   = XOR_{k < n} (x_k[t] * m_k)            n = 2..N          (int64, two's-complement wrap)
    id_{n,j}   = mix_n mod p_{n,j}                     (floor mod, in [0, p))     column c = (n - 2) h + j

Lookup (a (rows, d) table holding every head's rows at offsets[c]):

    out[t, c*d : (c+1)*d] = table[offsets[c] + id_c[t], :]

An 8-bit table (memops.QuantizedTable) is read as the weighted gather reads one: data * block scale,
dequantized in registers (kernels/product_key.py's table_rows), written in the output dtype.

The lookup kernel recomputes the hash of its head from the ids (N int64 loads per token, against d
table elements it moves), so no id tensor is written or read back. Its table gradient is the weighted
gather's values grad with one row per (token, head) and weight 1: the backward hashes once more into
rows and hands them to ``memops.kernels.product_key.weighted_gather_bwd`` (atomic or sorted-segment).
Triton's ``%`` on signed ints truncates toward zero; a negative remainder gets p added back, which gives
NumPy's floor mod for the (positive) primes.

Context gate. Per token row r and stream g (C channels; w_k, w_q (G, C); value (R, C)):

    rk = rsqrt(mean(k^2) + eps),  rq = rsqrt(mean(q^2) + eps)
    s  = sum_c (k rk w_k)(q rq w_q) / sqrt(C),   a = sign(s) sqrt(max(|s|, 1e-6)),   gate = sigmoid(a)
    (a NaN s gives a NaN a, gate and grads, as torch's clamp_min and sign propagate it)
    out[r, g, :] = gate * value[r, :]

Backward (dout (R, G, C)): dvalue = sum_g gate_g dout_g; dgate = <dout_g, value>; ds = dgate gate (1 - gate)
/ (2 sqrt|s|) where |s| > 1e-6, else 0; with u = ds / sqrt(C), the normed key's grad is u (q rq w_q), so
    dw_k += u (q rq w_q)(k rk)      dk = rk (w_k dnk) - k rk^3 / C * sum_c (w_k dnk k)
and the query's alike. The weight grads are per-program partial sums, reduced over programs afterwards.

Short convolution. x (B, L, G, C); per stream g an RMSNorm (weight nw[g], eps), then a depthwise
causal conv over time with K taps at dilation dil on each of the G*C channels, SiLU, and the residual:

    xn[t]  = x[t] rsqrt(mean_c x[t]^2 + eps) nw[g]                   (per (b, t, g) row of C channels)
    y[t]   = sum_{j<K} w[:, K-1-j] xn[t - j dil]                     (xn = 0 before the row starts, eps 0 too)
    out[t] = x[t] + silu(y[t])            (without the residual: silu(y); without activation: y)

Backward, dy = dout silu'(y): dw[:, K-1-j] = sum_t dy[t] xn[t - j dil];  dxn[s] = sum_j w[:, K-1-j]
dy[s + j dil]; then the RMSNorm backward gives dx (plus dout for the residual) and dnw. Two kernels: the
first recomputes y and writes dy (fp32) with the conv-weight partials, the second reads dy at the K
later taps. A program reads its K shifted row tiles straight from memory (L2 serves the overlap).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator, accumulator_torch_dtype
from memops.kernels._launch import record_launch
from memops.kernels.product_key import table_args, table_rows, weighted_gather_bwd


@triton.jit
def _shifted_ids(ids_ptr, batch, pos, mask, stride_b, stride_l, pad_id, k: tl.constexpr):
    # x_k at the tokens (batch, pos): the id k positions back in the same row, pad_id before the row starts.
    back = pos - k
    inside = mask & (back >= 0)
    x = tl.load(ids_ptr + batch * stride_b + back * stride_l, mask=inside, other=0).to(tl.int64)
    return tl.where(inside, x, pad_id)


@triton.jit
def _floor_mod(mix, prime):
    r = mix % prime
    return tl.where(r < 0, r + prime, r)


@triton.jit
def ngram_hash_kernel(
    ids_ptr, multipliers_ptr, primes_ptr, offsets_ptr, out_ptr,
    n_tokens, L_out, context, stride_b, stride_l, pad_id,
    N_MAX: tl.constexpr, HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program per BLOCK_T tokens of the flattened (B, L) batch; it builds mix_n order by order and
    # writes that order's h heads as one (BLOCK_T, h) tile of out (n_tokens, (N - 1) * h). offsets_ptr None:
    # the bare hash ids; else each head's table offset added (the lookup's rows).
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    batch = offs_t // L_out
    pos = offs_t - batch * L_out + context  # output row t reads ids column context + t
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HEADS
    mask = mask_t[:, None] & mask_h[None, :]
    mix = _shifted_ids(ids_ptr, batch, pos, mask_t, stride_b, stride_l, pad_id, 0) * tl.load(multipliers_ptr)
    for k in tl.static_range(1, N_MAX):
        x_k = _shifted_ids(ids_ptr, batch, pos, mask_t, stride_b, stride_l, pad_id, k)
        mix = mix ^ (x_k * tl.load(multipliers_ptr + k))
        cols = (k - 1) * HEADS + offs_h
        primes = tl.load(primes_ptr + cols, mask=mask_h, other=1)
        hashed = _floor_mod(mix[:, None], primes[None, :])
        if offsets_ptr is not None:
            hashed += tl.load(offsets_ptr + cols, mask=mask_h, other=0)[None, :]
        tl.store(out_ptr + offs_t[:, None] * ((N_MAX - 1) * HEADS) + cols[None, :], hashed, mask=mask)


@triton.jit
def engram_lookup_fwd_kernel(
    ids_ptr, values_ptr, multipliers_ptr, primes_ptr, offsets_ptr, out_ptr,
    n_tokens, L_out, context, D, stride_b, stride_l, stride_values, pad_id, scales_ptr, stride_scales, block_size,
    N_MAX: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    E8M0: tl.constexpr, FP8_BYTES: tl.constexpr,
):
    # One program per (BLOCK_T tokens, hash head c). Head c is of order n = c // h + 2: it mixes the ids
    # x_0..x_{n-1}; the loads of higher orders are masked off, so they move no memory.
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    order = head // HEADS  # n - 2
    mask_t = offs_t < n_tokens
    batch = offs_t // L_out
    pos = offs_t - batch * L_out + context  # output row t reads ids column context + t
    mix = _shifted_ids(ids_ptr, batch, pos, mask_t, stride_b, stride_l, pad_id, 0) * tl.load(multipliers_ptr)
    for k in tl.static_range(1, N_MAX):
        used = (tl.zeros_like(pos) + order) >= k - 1  # block-shaped: a scalar bool mask trips the interpreter
        x_k = _shifted_ids(ids_ptr, batch, pos, mask_t & used, stride_b, stride_l, pad_id, k)
        mix = tl.where(used, mix ^ (x_k * tl.load(multipliers_ptr + k)), mix)
    rows = tl.load(offsets_ptr + head) + _floor_mod(mix, tl.load(primes_ptr + head))
    out_row = offs_t * ((N_MAX - 1) * HEADS * D) + head * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_t[:, None] & (offs_d < D)[None, :]
        # (a float table's rows as they are; an 8-bit table's dequantized: kernels/product_key.py's table_rows)
        tile = table_rows(values_ptr, scales_ptr, rows, offs_d, mask, stride_values, stride_scales, block_size, E8M0,
                           FP8_BYTES, ACC)
        tl.store(out_ptr + out_row[:, None] + offs_d[None, :], tile.to(out_ptr.dtype.element_ty), mask=mask)


def _hash_config(heads: int) -> dict:
    return {"BLOCK_T": 128, "BLOCK_H": triton.next_power_of_2(heads), "num_warps": 4}


def _lookup_config(D: int, element_size: int) -> dict:
    # About 16 KiB of table rows in flight per program: a 64-wide bf16 head is 128 B a token.
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    block_t = max(16, min(128, 16384 // (block_d * element_size)))
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 4}


def ngram_hash(
    ids: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, pad_id: int,
    offsets: torch.Tensor | None = None, context: int = 0,
) -> torch.Tensor:
    """(B, L_ids) int ids (any strides) -> (B, L_ids - context, (N - 1) * h) int64 hash ids, plus ``offsets``
    per column when given (the lookup's table rows); the first ``context`` ids only feed later hashes.
    multipliers (N,), primes (N - 1, h), offsets ((N - 1) * h,): int64, contiguous."""
    B, L = ids.shape[0], ids.shape[1] - context
    orders, heads = primes.shape
    out = torch.empty((B, L, orders * heads), dtype=torch.int64, device=ids.device)
    n_tokens = B * L
    if n_tokens == 0 or heads == 0:
        return out
    cfg = _hash_config(heads)
    record_launch("ngram_hash_kernel")
    ngram_hash_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_T"]),)](
        ids, multipliers, primes, offsets, out,
        n_tokens, L, context, ids.stride(0), ids.stride(1), pad_id,
        N_MAX=orders + 1, HEADS=heads, BLOCK_H=cfg["BLOCK_H"], BLOCK_T=cfg["BLOCK_T"],
        num_warps=cfg["num_warps"],
    )
    return out


def engram_lookup_fwd(
    ids: torch.Tensor, table: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
    offsets: torch.Tensor, pad_id: int, context: int = 0, *, config: dict | None = None,
    scales: torch.Tensor | None = None, block_size: int = 1, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, L, (N - 1) * h * d) in table.dtype (or ``out_dtype``) from ids (B, context + L), a (rows, d) table with
    unit column stride and the hash parameters (int64, contiguous). An 8-bit table: its data and ``scales`` as
    for :func:`memops.kernels.product_key.weighted_gather_fwd`. ``config`` overrides the launch parameters."""
    B, L = ids.shape[0], ids.shape[1] - context
    orders, heads = primes.shape
    D = table.shape[1]
    out = torch.empty((B, L, orders * heads * D), dtype=out_dtype or table.dtype, device=table.device)
    n_tokens = B * L
    if out.numel() == 0:
        return out
    # (an 8-bit table's tile is dequantized to fp32 in registers: sized as an fp32 one, or it takes 255 registers)
    cfg = config or _lookup_config(D, table.element_size() if scales is None else 4)
    record_launch("engram_lookup_fwd_kernel")
    engram_lookup_fwd_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_T"]), orders * heads)](
        ids_ptr=ids, multipliers_ptr=multipliers, primes_ptr=primes, offsets_ptr=offsets, out_ptr=out,
        n_tokens=n_tokens, L_out=L, context=context, D=D, stride_b=ids.stride(0), stride_l=ids.stride(1),
        pad_id=pad_id, **table_args(table, scales, block_size), N_MAX=orders + 1, HEADS=heads,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], ACC=accumulator(table), num_warps=cfg["num_warps"],
    )
    return out


def engram_lookup_bwd(
    grad_out: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, multipliers: torch.Tensor,
    primes: torch.Tensor, offsets: torch.Tensor, pad_id: int, context: int = 0, *, deterministic: bool,
) -> torch.Tensor:
    """Dense (rows, d) table grad in table.dtype: grad_table[offsets[c] + id_c[t]] += grad_out[t, c*d:(c+1)*d].
    ``deterministic``: the sorted segment reduction (no atomics, the same bits every run)."""
    D = table.shape[1]
    rows = ngram_hash(ids, multipliers, primes, pad_id, offsets, context).reshape(-1, 1)
    ones = torch.ones(rows.shape, dtype=torch.float32, device=table.device)
    grad_table, _ = weighted_gather_bwd(
        grad_out.reshape(-1, D).contiguous(), table, rows, ones,
        values_grad_algorithm="segment" if deterministic else "auto", weights_grad=False,
    )
    return grad_table


# ---------------------------------------------------------------------------------------------------------
# The context gate (its math: the module docstring)


@triton.jit
def _gate_of(k, q, wk, wq, C, eps, inv_sqrt_c):
    rk = 1.0 / tl.sqrt(tl.sum(k * k, axis=1) / C + eps)
    rq = 1.0 / tl.sqrt(tl.sum(q * q, axis=1) / C + eps)
    score = tl.sum((k * wk[None, :]) * (q * wq[None, :]), axis=1) * (rk * rq * inv_sqrt_c)
    magnitude = tl.sqrt(tl.maximum(tl.abs(score), 1e-6))
    signed = tl.where(score > 0, magnitude, tl.where(score < 0, -magnitude, 0.0))
    # + score * 0: a NaN score (a NaN or inf input, or a zero row at eps = 0) stays NaN, as torch's clamp and
    # sign keep it (0 for every finite score; a select here cost the backward registers)
    return rk, rq, score, tl.sigmoid(signed + score * 0.0)


@triton.jit
def _stream_operands(key_ptr, query_ptr, wk_ptr, wq_ptr, rows, g, G, C, offs_c, mask, mask_c, ACC: tl.constexpr):
    # Stream g's key and query tiles (BLOCK_R, C) of the (R, G, C) operands, its two norm weights, and the
    # tile's offsets (the output and grads share the layout).
    at = (rows[:, None] * G + g) * C + offs_c[None, :]
    k = tl.load(key_ptr + at, mask=mask, other=0).to(ACC)
    q = tl.load(query_ptr + at, mask=mask, other=0).to(ACC)
    wk = tl.load(wk_ptr + g * C + offs_c, mask=mask_c, other=0).to(ACC)
    wq = tl.load(wq_ptr + g * C + offs_c, mask=mask_c, other=0).to(ACC)
    return at, k, q, wk, wq


@triton.jit
def engram_gate_fwd_kernel(
    key_ptr, query_ptr, wk_ptr, wq_ptr, value_ptr, out_ptr,
    n_rows, G, C, eps, inv_sqrt_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    # One program per BLOCK_R token rows, all G streams: value's row is read once for the G outputs.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (rows < n_rows)[:, None] & mask_c[None, :]
    v = tl.load(value_ptr + rows[:, None] * C + offs_c[None, :], mask=mask, other=0).to(ACC)
    for g in range(G):
        at, k, q, wk, wq = _stream_operands(key_ptr, query_ptr, wk_ptr, wq_ptr, rows, g, G, C, offs_c, mask, mask_c,
                                            ACC)
        _, _, _, gate = _gate_of(k, q, wk, wq, C, eps, inv_sqrt_c)
        tl.store(out_ptr + at, (gate[:, None] * v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def engram_gate_bwd_kernel(
    grad_out_ptr, key_ptr, query_ptr, wk_ptr, wq_ptr, value_ptr,
    grad_key_ptr, grad_query_ptr, grad_value_ptr, grad_wk_partial_ptr, grad_wq_partial_ptr,
    n_rows, G, C, eps, inv_sqrt_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (rows < n_rows)[:, None] & mask_c[None, :]
    v = tl.load(value_ptr + rows[:, None] * C + offs_c[None, :], mask=mask, other=0).to(ACC)
    dv = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for g in range(G):
        at, k, q, wk, wq = _stream_operands(key_ptr, query_ptr, wk_ptr, wq_ptr, rows, g, G, C, offs_c, mask, mask_c,
                                            ACC)
        dout = tl.load(grad_out_ptr + at, mask=mask, other=0).to(ACC)
        rk, rq, score, gate = _gate_of(k, q, wk, wq, C, eps, inv_sqrt_c)
        dv += gate[:, None] * dout
        dgate = tl.sum(dout * v, axis=1)
        magnitude = tl.sqrt(tl.maximum(tl.abs(score), 1e-6))
        dscore = tl.where(tl.abs(score) > 1e-6, dgate * gate * (1 - gate) * 0.5 / magnitude, 0.0) * inv_sqrt_c
        dscore += score * 0.0  # a NaN score reaches the grads, as in autograd
        k_hat = k * rk[:, None]
        q_hat = q * rq[:, None]
        dk_hat = dscore[:, None] * (q_hat * wq[None, :]) * wk[None, :]  # grad of k_hat (through w_k)
        dq_hat = dscore[:, None] * (k_hat * wk[None, :]) * wq[None, :]
        dk = rk[:, None] * (dk_hat - k_hat * (tl.sum(dk_hat * k_hat, axis=1) / C)[:, None])
        dq = rq[:, None] * (dq_hat - q_hat * (tl.sum(dq_hat * q_hat, axis=1) / C)[:, None])
        tl.store(grad_key_ptr + at, dk.to(grad_key_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_query_ptr + at, dq.to(grad_query_ptr.dtype.element_ty), mask=mask)
        partial = (pid * G + g) * C + offs_c
        tl.store(grad_wk_partial_ptr + partial, tl.sum(dscore[:, None] * (q_hat * wq[None, :]) * k_hat, axis=0),
                 mask=mask_c)
        tl.store(grad_wq_partial_ptr + partial, tl.sum(dscore[:, None] * (k_hat * wk[None, :]) * q_hat, axis=0),
                 mask=mask_c)
    tl.store(grad_value_ptr + rows[:, None] * C + offs_c[None, :], dv.to(grad_value_ptr.dtype.element_ty), mask=mask)


def _row_tile(C: int, rows_cap: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_rows, BLOCK_C, num_warps) for a kernel holding whole C-channel rows. Forward: up to 4096
    elements per operand over 4 warps (32 a thread). Backward keeps about twice as many operands live, so
    2048 over 8 warps: the sm_80/sm_90 AOT check found 4096 over 4 spilling there (255 registers, 24-120 B
    of stack) at C = 1024."""
    block_c = triton.next_power_of_2(max(C, 1))
    elements, warps = (2048, 8) if backward else (4096, 4)
    block_rows = max(1, min(rows_cap, elements // block_c))
    per_thread = block_rows * block_c // (32 * warps)
    while per_thread > 32 and warps < 16:  # C past 4096: one row, more warps
        warps, per_thread = warps * 2, per_thread // 2
    return block_rows, block_c, max(1, min(warps, block_rows * block_c // 32))


def _gate_config(C: int, backward: bool = False) -> dict:
    block_r, block_c, warps = _row_tile(C, 16, backward)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps}


def engram_gate_fwd(key, query, w_k, w_q, value, eps: float) -> torch.Tensor:
    """out (R, G, C) in value.dtype from contiguous key, query (R, G, C), w_k, w_q (G, C), value (R, C)."""
    R, G, C = key.shape
    out = torch.empty((R, G, C), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    cfg = _gate_config(C)
    record_launch("engram_gate_fwd_kernel")
    engram_gate_fwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        key, query, w_k, w_q, value, out, R, G, C, eps, 1.0 / C**0.5,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], ACC=accumulator(key, query, value),
        num_warps=cfg["num_warps"],
    )
    return out


def engram_gate_bwd(grad_out, key, query, w_k, w_q, value, eps: float):
    """(grad_key, grad_query, grad_w_k, grad_w_q, grad_value), each in its input's dtype and shape."""
    R, G, C = key.shape
    cfg = _gate_config(C, backward=True)
    programs = triton.cdiv(R, cfg["BLOCK_R"])
    acc_dtype = accumulator_torch_dtype(key, query, value)
    grad_key, grad_query = torch.empty_like(key), torch.empty_like(query)
    grad_value = torch.empty_like(value)
    wk_partial = torch.empty((programs, G, C), dtype=acc_dtype, device=key.device)
    wq_partial = torch.empty((programs, G, C), dtype=acc_dtype, device=key.device)
    if R * G * C > 0:
        record_launch("engram_gate_bwd_kernel")
        engram_gate_bwd_kernel[(programs,)](
            grad_out, key, query, w_k, w_q, value, grad_key, grad_query, grad_value, wk_partial, wq_partial,
            R, G, C, eps, 1.0 / C**0.5,
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], ACC=accumulator(key, query, value),
            num_warps=cfg["num_warps"],
        )
    elif R * C > 0:
        grad_value.zero_()
    return grad_key, grad_query, wk_partial.sum(0).to(w_k.dtype), wq_partial.sum(0).to(w_q.dtype), grad_value


# ---------------------------------------------------------------------------------------------------------
# The short convolution (its math: the module docstring)


@triton.jit
def _normed_rows(x_ptr, nw, row0, t, L, offs_c, mask_c, C, GC, eps, ACC: tl.constexpr, PADDING: tl.constexpr):
    # xn at times t (a block; rows of this (b, g) before the start read as 0) and x itself. PADDING: t may
    # reach before the start, where the rows are the conv's zero padding: x = 0 there, and their rsqrt is of
    # 1, not of 0 + eps (0 * inf = NaN at eps = 0). (Without PADDING, the dx kernel: t >= 0, and the extra
    # term cost it a spill.)
    inside = (t >= 0) & (t < L)
    mask = inside[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + (row0 + t)[:, None] * GC + offs_c[None, :], mask=mask, other=0).to(ACC)
    if PADDING:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps + (1 - inside.to(ACC)))
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
    return x * rstd[:, None] * nw[None, :], x, rstd


@triton.jit
def _conv_tile(L, C, blocks_per_row, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # The (batch row b, BLOCK_T times, stream g) tile of program (pid, g): its times t, the first flat row of
    # b, its channels g*C + c and the masks. Shared by the forward and both backward kernels.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = pid // blocks_per_row
    t = (pid % blocks_per_row) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (t < L)[:, None] & mask_c[None, :]
    return pid, g, t, b.to(tl.int64) * L, offs_c, mask_c, g * C + offs_c, mask


@triton.jit
def short_conv_fwd_kernel(
    x_ptr, w_ptr, nw_ptr, out_ptr,
    L, C, GC, eps, dil, blocks_per_row,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    ACTIVATION: tl.constexpr, RESIDUAL: tl.constexpr,
):
    # One program per (batch row b, BLOCK_T times, stream g): a (BLOCK_T, C) tile of channels g*C..g*C+C.
    _, g, t, row0, offs_c, mask_c, channels, mask = _conv_tile(L, C, blocks_per_row, BLOCK_T, BLOCK_C)
    nw = tl.load(nw_ptr + channels, mask=mask_c, other=0).to(ACC)
    xn, x_here, _ = _normed_rows(x_ptr + g * C, nw, row0, t, L, offs_c, mask_c, C, GC, eps, ACC, False)
    y = tl.load(w_ptr + channels * K + (K - 1), mask=mask_c, other=0).to(ACC)[None, :] * xn
    for j in tl.static_range(1, K):
        xn, _, _ = _normed_rows(x_ptr + g * C, nw, row0, t - j * dil, L, offs_c, mask_c, C, GC, eps, ACC, True)
        tap = tl.load(w_ptr + channels * K + (K - 1 - j), mask=mask_c, other=0).to(ACC)
        y += tap[None, :] * xn
    if ACTIVATION:
        y = y * tl.sigmoid(y)
    if RESIDUAL:
        y += x_here
    tl.store(out_ptr + (row0 + t)[:, None] * GC + channels[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def short_conv_bwd_dy_kernel(
    grad_out_ptr, x_ptr, w_ptr, nw_ptr, dy_ptr, dw_partial_ptr,
    L, C, GC, eps, dil, blocks_per_row,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    pid, g, t, row0, offs_c, mask_c, channels, mask = _conv_tile(L, C, blocks_per_row, BLOCK_T, BLOCK_C)
    nw = tl.load(nw_ptr + channels, mask=mask_c, other=0).to(ACC)
    dy = tl.load(grad_out_ptr + (row0 + t)[:, None] * GC + channels[None, :], mask=mask, other=0).to(ACC)
    if ACTIVATION:
        y = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
        for j in tl.static_range(K):
            xn, _, _ = _normed_rows(x_ptr + g * C, nw, row0, t - j * dil, L, offs_c, mask_c, C, GC, eps, ACC, True)
            tap = tl.load(w_ptr + channels * K + (K - 1 - j), mask=mask_c, other=0).to(ACC)
            y += tap[None, :] * xn
        sig = tl.sigmoid(y)
        dy = dy * sig * (1 + y * (1 - sig))
    tl.store(dy_ptr + (row0 + t)[:, None] * GC + channels[None, :], dy, mask=mask)
    for j in tl.static_range(K):
        xn, _, _ = _normed_rows(x_ptr + g * C, nw, row0, t - j * dil, L, offs_c, mask_c, C, GC, eps, ACC, True)
        tl.store(dw_partial_ptr + (pid.to(tl.int64) * GC + channels) * K + (K - 1 - j), tl.sum(dy * xn, axis=0),
                 mask=mask_c)


@triton.jit
def short_conv_bwd_dx_kernel(
    grad_out_ptr, x_ptr, w_ptr, nw_ptr, dy_ptr, grad_x_ptr, dnw_partial_ptr,
    L, C, GC, eps, dil, blocks_per_row,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    pid, g, t, row0, offs_c, mask_c, channels, mask = _conv_tile(L, C, blocks_per_row, BLOCK_T, BLOCK_C)
    dxn = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for j in tl.static_range(K):
        later = t + j * dil
        tap = tl.load(w_ptr + channels * K + (K - 1 - j), mask=mask_c, other=0).to(ACC)
        dy = tl.load(dy_ptr + (row0 + later)[:, None] * GC + channels[None, :],
                     mask=(later < L)[:, None] & mask_c[None, :], other=0)
        dxn += tap[None, :] * dy
    nw = tl.load(nw_ptr + channels, mask=mask_c, other=0).to(ACC)
    _, x, rstd = _normed_rows(x_ptr + g * C, nw, row0, t, L, offs_c, mask_c, C, GC, eps, ACC, False)
    x_hat = x * rstd[:, None]
    dx_hat = dxn * nw[None, :]
    dx = rstd[:, None] * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / C)[:, None])
    if RESIDUAL:
        dx += tl.load(grad_out_ptr + (row0 + t)[:, None] * GC + channels[None, :], mask=mask, other=0).to(ACC)
    tl.store(grad_x_ptr + (row0 + t)[:, None] * GC + channels[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(dnw_partial_ptr + pid.to(tl.int64) * GC + channels, tl.sum(dxn * x_hat, axis=0), mask=mask_c)


def _conv_config(C: int, L: int, backward: bool = False) -> dict:
    block_t, block_c, warps = _row_tile(C, min(16, triton.next_power_of_2(max(L, 1))), backward)
    return {"BLOCK_T": block_t, "BLOCK_C": block_c, "num_warps": warps}


def _conv_grid(x: torch.Tensor, cfg: dict) -> tuple[tuple[int, int], int]:
    """The launch grid (one program per (b, block of BLOCK_T times), stream g) and the time blocks per row."""
    B, L, G, _ = x.shape
    blocks = triton.cdiv(L, cfg["BLOCK_T"])
    return (B * blocks, G), blocks


def _conv_meta(K: int, cfg: dict, **flags) -> dict:
    """The constexprs and num_warps every short-conv kernel takes."""
    return dict(K=K, BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], **flags)


def short_conv_fwd(x, weight, norm_weight, *, dilation: int, eps: float, activation: bool, residual: bool):
    """out (B, L, G, C) in x.dtype from contiguous x (B, L, G, C), weight (G*C, K), norm_weight (G, C)."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    _, L, G, C = x.shape
    cfg = _conv_config(C, L)
    grid, blocks = _conv_grid(x, cfg)
    meta = _conv_meta(weight.shape[1], cfg, ACTIVATION=activation, RESIDUAL=residual)
    record_launch("short_conv_fwd_kernel")
    short_conv_fwd_kernel[grid](x, weight, norm_weight, out, L, C, G * C, eps, dilation, blocks,
                                ACC=accumulator(x, weight), **meta)
    return out


def short_conv_bwd(grad_out, x, weight, norm_weight, *, dilation: int, eps: float, activation: bool,
                   residual: bool):
    """(grad_x, grad_weight (G*C, K), grad_norm_weight (G, C)), each in its input's dtype."""
    B, L, G, C = x.shape
    K = weight.shape[1]
    cfg = _conv_config(C, L, backward=True)
    grid, blocks = _conv_grid(x, cfg)
    meta = _conv_meta(K, cfg)
    acc_dtype = accumulator_torch_dtype(x, weight)
    programs = grid[0]
    dy = torch.empty(x.shape, dtype=acc_dtype, device=x.device)
    dw_partial = torch.empty((programs, G * C, K), dtype=acc_dtype, device=x.device)
    dnw_partial = torch.empty((programs, G * C), dtype=acc_dtype, device=x.device)
    grad_x = torch.empty_like(x)
    if x.numel() > 0:
        acc = accumulator(x, weight)
        record_launch("short_conv_bwd_dy_kernel")
        short_conv_bwd_dy_kernel[grid](grad_out, x, weight, norm_weight, dy, dw_partial, L, C, G * C, eps, dilation,
                                       blocks, ACC=acc, ACTIVATION=activation, **meta)
        record_launch("short_conv_bwd_dx_kernel")
        short_conv_bwd_dx_kernel[grid](grad_out, x, weight, norm_weight, dy, grad_x, dnw_partial, L, C, G * C, eps,
                                       dilation, blocks, ACC=acc, RESIDUAL=residual, **meta)
    return (grad_x, dw_partial.sum(0).to(weight.dtype), dnw_partial.sum(0).view(G, C).to(norm_weight.dtype))
