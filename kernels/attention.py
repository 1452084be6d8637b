"""Triton kernels for memory-token attention: flash attention over [memory ; sequence] keys, read from their
own pointers, so the concatenation is never materialised; and the same loop with retention decay (TRIM-KV)
and with the looped cache blend (MELT). The kernels:

- memory_attention_fwd_kernel: attention over [memory ; sequence] (memops.memory_attention, its packed
  form, and plain attention when there is no memory);
- retention_attention_fwd_kernel: causal attention with retention decay, optional memory and packed
  documents (memops.retention_attention);
- looped_attention_fwd_kernel: attention over a cache whose last rows are blended as they stream
  (memops.looped_attention);
- memory_attention_delta_kernel, memory_attention_dq_kernel, memory_attention_dkdv_kernel: the backward of
  all three (the looped blend's backward is plain attention over the blended cache, then kernels/looped.py).

The forward kernels share one flash loop made of @triton.jit helpers; each takes only its own inputs, and an
absent input (no memory, no bias, padded rather than packed) is None, which compiles its code out.

Math (one batch b, query head h, its kv head g = h // (H / Hkv); logits in the log2 domain internally):

    s[i, j]  = scale * q[i] . key[j] + bias[j]        key = [mem_k ; k], bias = [mem_bias ; 0]
    s[i, j]  = -inf for a sequence key j > i + Nk - N  (causal, bottom-right aligned)
    lse[i]   = log sum_j exp(s[i, j]);  p = exp(s - lse);  out[i] = sum_j p[i, j] value[j]
    backward (delta[i] = dout[i] . out[i] - dlse[i], the delta kernel):
    dp = dout value^T;  ds = p * (dp - delta);  dq = scale ds key;  dkey = scale ds^T q;
    dvalue = p^T dout;  dbias[j] = sum_i ds[i, j]

Retention decay (TRIM-KV): with a per-sequence-key log_beta[j] <= 0 the sequence logits also get
(pos_i - j) * log_beta[j], pos_i = i + Nk - N, computed on the fly (no N x Nk bias tensor); its grad is
dlog_beta[j] = sum_i (pos_i - j) ds[i, j], summed over the group's query heads. Packed documents: a query
sees only the sequence keys of its own document.

Looped blend (MELT): sequence keys j >= blend_start are read as g * cache[j] + (1 - g) * new[j - blend_start]
(K and V alike, g per row or per channel) while they stream, and one program per key row (the last query
block of the group's first head) writes the blended rows out.

The forward streams each key table in two loops: blocks every query of the program sees whole (in range and,
when causal, at or below the first query's diagonal) run without bounds or causal masks, and only the
diagonal and edge blocks pay for them. The logit scale is applied once per tile in fp32, folded with log2(e)
so the softmax uses exp2; it is not folded into a 16-bit q, which would round q * scale to 16 bits.

A query that sees no key (no memory, causal, N > Nk) has out = 0 and lse = -inf; one with a +inf logit has
lse = +inf and a NaN out. Batch-shared memory (one (Hkv, M, D) table for all samples) gets the sum of its
per-sample grads: atomics into an fp32 (Hkv, M, D) buffer, or per-sample partials summed in a fixed order
when determinism is asked for.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import LOG2E, accumulator, dot_precision, finite_log_beta, to_ln, to_log2
from memops.kernels._launch import dtype_class, launch_arch, record_launch


@triton.jit
def _varlen_rows(pid, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs):
    """Packed sequences: the sequence of this program, its block within the sequence, and the sequence's
    first query and key rows and lengths. The grid is an upper bound on the blocks (known from shapes alone,
    so no host sync); a program past the last block gets lengths 0 and computes nothing."""
    seq = tl.load(program_seq_ptr + pid)
    valid = seq < num_seqs
    seq = tl.minimum(seq, num_seqs - 1)
    block = pid - tl.load(first_block_ptr + seq)
    q_row0 = tl.load(cu_q_ptr + seq)
    k_row0 = tl.load(cu_k_ptr + seq)
    N = tl.where(valid, tl.load(cu_q_ptr + seq + 1) - q_row0, 0)
    Nk = tl.where(valid, tl.load(cu_k_ptr + seq + 1) - k_row0, 0)
    return seq.to(tl.int64), block, q_row0.to(tl.int64), k_row0.to(tl.int64), N, Nk, valid


@triton.jit
def _query_program(
    H, group, N, Nk, M, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs, BLOCK_M: tl.constexpr,
):
    """This program's query block: its index, batch (the sequence when packed: cu_q_ptr given), head and the
    kv head of its group, the first query and key rows of its batch entry (0 unless packed), the query
    offsets and mask, and the lengths N, Nk, M it sees (per sequence when packed)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if cu_q_ptr is not None:  # packed: grid (query-block programs over every sequence, H)
        h = bh.to(tl.int64)
        b, pid_m, q_row0, k_row0, N, Nk, valid = _varlen_rows(pid_m, program_seq_ptr, first_block_ptr, cu_q_ptr,
                                                              cu_k_ptr, num_seqs)
        M = tl.where(valid, M, 0)
    else:  # grid (query blocks, B * H)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_row0 = b * 0
        k_row0 = b * 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, b, h, h // group, q_row0, k_row0, offs_m, offs_m < N, N, Nk, M


@triton.jit
def _causal_key_end(pid_m, N, Nk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # The last query of the block sees sequence keys up to (its index + Nk - N).
    end = Nk
    if CAUSAL:
        end = tl.maximum(tl.minimum(Nk, (pid_m + 1) * BLOCK_M + Nk - N), 0)
    return end


@triton.jit
def _lse_log2(lse_ptrs, row_ok, ACC: tl.constexpr):
    """Saved log-sum-exp in the log2 domain. A row that saw no key stored -inf; +inf instead makes every
    exp2(s - lse) of that row 0 without forming inf - inf."""
    lse = tl.load(lse_ptrs, mask=row_ok, other=0.0).to(ACC)
    return tl.where(lse == float("-inf"), float("inf"), to_log2(lse))


@triton.jit
def _backward_rows(
    q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, q_row0, offs_m, offs_d, row_ok, q_strides, do_strides, lse_strides,
    ACC: tl.constexpr,
):
    """What the backward needs of a block of query rows: q, dout, the log2-domain lse and delta (lse and
    delta share one layout: (B, H, N), or (H, total) when packed)."""
    # (the packed row offset goes into the scalar base, so the per-row offsets stay int32 vectors)
    q = tl.load(q_ptr + b * q_strides[0] + h * q_strides[1] + q_row0 * q_strides[2] + offs_m[:, None] * q_strides[2]
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * do_strides[0] + h * do_strides[1] + q_row0 * do_strides[2]
                 + offs_m[:, None] * do_strides[2] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse_base = b * lse_strides[0] + h * lse_strides[1] + q_row0
    lse_log2 = _lse_log2(lse_ptr + lse_base + offs_m, row_ok, ACC)
    delta = tl.load(delta_ptr + lse_base + offs_m, mask=row_ok, other=0.0).to(ACC)
    return q, do, lse_log2, delta


@triton.jit
def _masked_logits(
    q, k_t, bias_base, decay_base, offs_n, in_range, offs_m, causal_shift, scale_log2, query_doc_start,
    CAUSAL: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True,
):
    """log2-domain logits of a query block against a key block (k_t: D x BLOCK_N), -inf where not visible.
    bias_base / decay_base: the block's key bias / retention log_beta row, or None. MASKED=False: a block
    every query of the block sees whole (in range, below the causal diagonal, inside every query's document),
    so nothing is masked. query_doc_start (per query row) or None: with packed documents, keys before a
    query's document start are hidden."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION).to(ACC) * scale_log2
    if bias_base is not None:
        if MASKED:
            s += to_log2(tl.load(bias_base + offs_n, mask=in_range, other=0.0).to(ACC))[None, :]
        else:
            s += to_log2(tl.load(bias_base + offs_n).to(ACC))[None, :]
    if decay_base is not None:
        if MASKED:
            log_beta = tl.load(decay_base + offs_n, mask=in_range, other=0.0).to(ACC)
        else:
            log_beta = tl.load(decay_base + offs_n).to(ACC)
        distance = (offs_m[:, None] + causal_shift - offs_n[None, :]).to(ACC)
        s += distance * to_log2(finite_log_beta(log_beta))[None, :]
    if MASKED:
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
        if query_doc_start is not None:
            visible = visible & (offs_n[None, :] >= query_doc_start[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _blend_keys(
    k_t, v, offs_n, in_range, offs_d, start, k_new_base, v_new_base, gate_base, stride_newn, stride_gn,
    ACC: tl.constexpr, GATE_PER_CHANNEL: tl.constexpr,
):
    """k_t (D x BLOCK_N) and v (BLOCK_N x D) with the rows at or past ``start`` replaced by
    g * cache + (1 - g) * new (new row j - start), in ACC and rounded once to the cache dtype."""
    fresh = in_range & (offs_n >= start)
    new_rows = offs_n - start
    # Rows not fresh read g = 1 and new = 0, which leaves them exactly as they are.
    if GATE_PER_CHANNEL:
        g_t = tl.load(gate_base + new_rows[None, :] * stride_gn + offs_d[:, None], mask=fresh[None, :],
                      other=1.0).to(ACC)
        g = tl.load(gate_base + new_rows[:, None] * stride_gn + offs_d[None, :], mask=fresh[:, None], other=1.0).to(ACC)
    else:
        g_row = tl.load(gate_base + new_rows * stride_gn, mask=fresh, other=1.0).to(ACC)
        g_t = g_row[None, :]
        g = g_row[:, None]
    k_new_t = tl.load(k_new_base + new_rows[None, :] * stride_newn + offs_d[:, None], mask=fresh[None, :], other=0.0)
    v_new = tl.load(v_new_base + new_rows[:, None] * stride_newn + offs_d[None, :], mask=fresh[:, None], other=0.0)
    k_t = (g_t * k_t.to(ACC) + (1.0 - g_t) * k_new_t.to(ACC)).to(k_t.dtype)
    v = (g * v.to(ACC) + (1.0 - g) * v_new.to(ACC)).to(v.dtype)
    return k_t, v, fresh


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q, start, k_base, v_base, stride_kn, stride_vn, bias_base, decay_base, num_keys, offs_m, offs_d,
    causal_shift, scale_log2, query_doc_start,
    blend_start, k_new_base, v_new_base, gate_base, stride_newn, stride_gn, k_out_base, v_out_base, stride_outn,
    is_writer,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, GATE_PER_CHANNEL: tl.constexpr,
    MASKED: tl.constexpr,
):
    # One online-softmax step over the key block at ``start``, in the log2 domain. k_new_base None: no looped
    # blend; else k_new and v_new share the row stride stride_newn, k_out and v_out stride_outn.
    offs_n = start + tl.arange(0, BLOCK_N)
    in_range = offs_n < num_keys
    if MASKED:
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
    else:
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
    if k_new_base is not None:
        k_t, v, fresh = _blend_keys(k_t, v, offs_n, in_range, offs_d, blend_start, k_new_base, v_new_base,
                                    gate_base, stride_newn, stride_gn, acc.dtype, GATE_PER_CHANNEL)
        # (an int product, not &: the interpreter turns bool block & bool scalar into int32)
        written = (fresh.to(tl.int32) * is_writer.to(tl.int32)) > 0
        tl.store(k_out_base + offs_n[None, :] * stride_outn + offs_d[:, None], k_t, mask=written[None, :])
        tl.store(v_out_base + offs_n[:, None] * stride_outn + offs_d[None, :], v, mask=written[:, None])
    s = _masked_logits(q, k_t, bias_base, decay_base, offs_n, in_range, offs_m, causal_shift, scale_log2,
                       query_doc_start, CAUSAL=CAUSAL, ACC=acc.dtype, DOT_PRECISION=DOT_PRECISION, MASKED=MASKED)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        # A row with nothing visible yet keeps max -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every logit of the block is finite, so the new max is too
        m_safe = m_new
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(acc.dtype)
    return acc, m_new, l_i


@triton.jit
def _fwd_key_range(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, decay_base, num_keys, first, full_start,
    full_end, end, offs_m, offs_d, causal_shift, scale_log2, query_doc_start,
    blend_start, k_new_base, v_new_base, gate_base, stride_newn, stride_gn, k_out_base, v_out_base, stride_outn,
    is_writer,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, GATE_PER_CHANNEL: tl.constexpr,
):
    # Online softmax over keys [first, end) of one key table (memory or sequence). Blocks in
    # [full_start, full_end) (multiples of BLOCK_N) are seen whole by every query of the block: no bounds,
    # causal or document masks there; only the edge blocks around them pay for masks. Without documents
    # (query_doc_start None) first = full_start = 0.
    # Three runs of blocks, unrolled at compile time: [first, full_start) (documents only: between the first
    # query's document start and the full blocks), [full_start, full_end) mask-free, [full_end, end).
    for part in tl.static_range(3):
        if part == 0:
            lo, hi = first, full_start
        elif part == 1:
            lo, hi = full_start, full_end
        else:
            lo, hi = full_end, end
        if part != 0 or query_doc_start is not None:
            for start in range(lo, hi, BLOCK_N):
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q, start, k_base, v_base, stride_kn, stride_vn, bias_base, decay_base, num_keys,
                    offs_m,
                    offs_d, causal_shift, scale_log2, query_doc_start, blend_start, k_new_base, v_new_base,
                    gate_base, stride_newn, stride_gn, k_out_base, v_out_base, stride_outn, is_writer,
                    CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, GATE_PER_CHANNEL=GATE_PER_CHANNEL,
                    MASKED=part != 1)
    return acc, m_i, l_i


@triton.jit
def _query_documents(doc_start_base, pid_m, offs_m, row_ok, N, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed documents (causal): each query row's document start (the key index of its position's
    document), the first key block any row of the program needs, and the first block every row sees whole.
    doc_start is non-decreasing, so the block's first and last rows bound it."""
    last_key = tl.maximum(Nk - 1, 0)
    row_start = tl.load(doc_start_base + tl.minimum(tl.maximum(offs_m + Nk - N, 0), last_key), mask=row_ok, other=0)
    first_row = tl.load(doc_start_base + tl.minimum(tl.maximum(pid_m * BLOCK_M + Nk - N, 0), last_key))
    last_row = tl.load(doc_start_base + tl.minimum(tl.maximum(tl.minimum((pid_m + 1) * BLOCK_M, N) - 1 + Nk - N, 0),
                                                   last_key))
    return row_start, first_row // BLOCK_N * BLOCK_N, tl.cdiv(last_row, BLOCK_N) * BLOCK_N


# The three forward kernels (memory, retention, looped) are one flash-attention loop assembled from the
# helpers below: _fwd_start (the program's queries and the empty softmax state), _fwd_memory_keys (the memory
# table, if any), _fwd_sequence_keys (the sequence keys, with retention decay, packed documents or the looped
# blend when given) and _fwd_store. Each kernel takes only its own family's inputs; an absent one is None, and
# the helpers compile its code out. Packed sequences (varlen): cu_q_ptr and cu_k_ptr given, b is then the
# sequence, whose rows start at q_row0 / k_row0 of the packed tensors (their batch strides are 0), and the
# lengths are that sequence's.


@triton.jit
def _fwd_start(
    q_ptr, q_strides, H, group, N, Nk, M, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    """The program's query block (see _query_program), its q tile, and the empty online-softmax state."""
    pid_m, b, h, g, q_row0, k_row0, offs_m, row_ok, N, Nk, M = _query_program(
        H, group, N, Nk, M, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # (packed row offsets go into the scalar bases: no int64 row vector lives across the key loop)
    q = tl.load(q_ptr + b * q_strides[0] + h * q_strides[1] + q_row0 * q_strides[2] + offs_m[:, None] * q_strides[2]
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    return pid_m, b, h, g, q_row0, k_row0, offs_m, offs_d, row_ok, N, Nk, M, q, acc, m_i, l_i


@triton.jit
def _fwd_memory_keys(
    acc, m_i, l_i, q, mem_k_base, mem_v_base, stride_mkn, stride_mvn, bias_base, M, offs_m, offs_d, scale_log2,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The M memory keys (every query sees all of them: no causal mask), with their bias (or None)."""
    return _fwd_key_range(
        acc, m_i, l_i, q, mem_k_base, mem_v_base, stride_mkn, stride_mvn, bias_base, None, M, 0, 0,
        M // BLOCK_N * BLOCK_N, M,
        offs_m, offs_d, 0, scale_log2, None, 0, None, None, None, 0, 0, None, None, 0, False,
        CAUSAL=False, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, GATE_PER_CHANNEL=False,
    )


@triton.jit
def _fwd_sequence_keys(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, decay_base, doc_start_base, pid_m, offs_m, offs_d, row_ok,
    N, Nk,
    scale_log2, blend_start, k_new_base, v_new_base, gate_base, stride_newn, stride_gn, k_out_base, v_out_base,
    stride_outn, is_writer,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GATE_PER_CHANNEL: tl.constexpr,
):
    """The Nk sequence keys (bottom-right aligned causal mask when CAUSAL); decay_base: retention log_beta
    row or None; doc_start_base: packed documents' starts (causal) or None; k_new_base ... is_writer: the
    looped blend (k_new_base None: none)."""
    end = _causal_key_end(pid_m, N, Nk, BLOCK_M, CAUSAL)
    full_end = Nk // BLOCK_N * BLOCK_N
    if CAUSAL:  # the block's first query sees keys up to pid_m * BLOCK_M + Nk - N: so do all its queries
        full_end = tl.minimum(full_end, tl.maximum(pid_m * BLOCK_M + Nk - N + 1, 0) // BLOCK_N * BLOCK_N)
    first = 0
    full_start = 0
    query_doc_start = None
    if doc_start_base is not None:  # causal only: keys [first, full_start) and past full_end are masked
        query_doc_start, first, full_start = _query_documents(doc_start_base, pid_m, offs_m, row_ok, N, Nk, BLOCK_M,
                                                              BLOCK_N)
        # no block seen whole by every row: all blocks from first on are masked
        none_whole = full_start >= full_end
        full_start = tl.where(none_whole, first, full_start)
        full_end = tl.where(none_whole, first, full_end)
    return _fwd_key_range(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, None, decay_base, Nk, first, full_start, full_end, end,
        offs_m,
        offs_d, Nk - N, scale_log2, query_doc_start, blend_start, k_new_base, v_new_base, gate_base, stride_newn,
        stride_gn, k_out_base, v_out_base, stride_outn, is_writer,
        CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, GATE_PER_CHANNEL=GATE_PER_CHANNEL,
    )


@triton.jit
def _fwd_store(acc, m_i, l_i, out_ptr, out_strides, lse_ptr, lse_strides, b, h, q_row0, offs_m, offs_d, row_ok):
    """out = acc / l (strides (batch, head, row)) and lse (strides (batch, head)), for the rows of the block."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), to_ln(m_i + tl.math.log2(tl.where(empty, 1.0, l_i))))
    # a +inf logit: the log-sum-exp is +inf (l_i is inf - inf = NaN there); out is NaN, as the reference's
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    out_base = out_ptr + b * out_strides[0] + h * out_strides[1] + q_row0 * out_strides[2]
    tl.store(out_base + offs_m[:, None] * out_strides[2] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    lse_base = lse_ptr + b * lse_strides[0] + h * lse_strides[1] + q_row0
    tl.store(lse_base + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)


# Each kernel takes a tensor's strides as one tuple: (batch, head, row) for the (B, H, L, D) tensors (batch 0
# when packed or batch-shared), (batch, head) for lse and mem_bias.


@triton.jit(do_not_specialize=["N", "Nk", "M"])
def memory_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mem_k_ptr, mem_v_ptr, bias_ptr, out_ptr, lse_ptr,
    q_strides, k_strides, v_strides, mem_k_strides, mem_v_strides, bias_strides, out_strides, lse_strides,
    program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
    H, N, Nk, M, group, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Attention over [memory ; sequence]: mem_k / mem_v None = plain attention; bias_ptr None = no bias.
    pid_m, b, h, g, q_row0, k_row0, offs_m, offs_d, row_ok, n_q, n_k, n_mem, q, acc, m_i, l_i = _fwd_start(
        q_ptr, q_strides, H, group, N, Nk, M, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
        HEAD_DIM, BLOCK_M, ACC)
    if mem_k_ptr is not None:
        bias_base = None
        if bias_ptr is not None:
            bias_base = bias_ptr + b * bias_strides[0] + g * bias_strides[1]
        acc, m_i, l_i = _fwd_memory_keys(
            acc, m_i, l_i, q, mem_k_ptr + b * mem_k_strides[0] + g * mem_k_strides[1],
            mem_v_ptr + b * mem_v_strides[0] + g * mem_v_strides[1], mem_k_strides[2], mem_v_strides[2], bias_base,
            n_mem, offs_m, offs_d, scale_log2, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_sequence_keys(
        acc, m_i, l_i, q, k_ptr + b * k_strides[0] + g * k_strides[1] + k_row0 * k_strides[2],
        v_ptr + b * v_strides[0] + g * v_strides[1] + k_row0 * v_strides[2], k_strides[2], v_strides[2], None, None,
        pid_m, offs_m, offs_d, row_ok, n_q, n_k, scale_log2, 0, None, None, None, 0, 0, None, None, 0, False,
        CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, False)
    _fwd_store(acc, m_i, l_i, out_ptr, out_strides, lse_ptr, lse_strides, b, h, q_row0, offs_m, offs_d, row_ok)


@triton.jit(do_not_specialize=["N", "Nk", "M"])
def retention_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mem_k_ptr, mem_v_ptr, log_beta_ptr, doc_start_ptr, out_ptr, lse_ptr,
    q_strides, k_strides, v_strides, mem_k_strides, mem_v_strides, log_beta_strides, doc_start_stride, out_strides,
    lse_strides, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
    H, N, Nk, M, group, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # TRIM-KV: causal attention whose sequence logits decay by (pos_i - j) * log_beta[j] (log_beta strides
    # (batch, kv head), unit along keys); mem_k / mem_v None = no memory; doc_start_ptr None = no packed
    # documents, else (B|1, Nk) with batch stride doc_start_stride.
    pid_m, b, h, g, q_row0, k_row0, offs_m, offs_d, row_ok, n_q, n_k, n_mem, q, acc, m_i, l_i = _fwd_start(
        q_ptr, q_strides, H, group, N, Nk, M, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
        HEAD_DIM, BLOCK_M, ACC)
    if mem_k_ptr is not None:
        acc, m_i, l_i = _fwd_memory_keys(
            acc, m_i, l_i, q, mem_k_ptr + b * mem_k_strides[0] + g * mem_k_strides[1],
            mem_v_ptr + b * mem_v_strides[0] + g * mem_v_strides[1], mem_k_strides[2], mem_v_strides[2], None, n_mem,
            offs_m, offs_d, scale_log2, BLOCK_N, DOT_PRECISION)
    doc_start_base = None
    if doc_start_ptr is not None:
        doc_start_base = doc_start_ptr + b * doc_start_stride
    acc, m_i, l_i = _fwd_sequence_keys(
        acc, m_i, l_i, q, k_ptr + b * k_strides[0] + g * k_strides[1] + k_row0 * k_strides[2],
        v_ptr + b * v_strides[0] + g * v_strides[1] + k_row0 * v_strides[2], k_strides[2], v_strides[2],
        log_beta_ptr + b * log_beta_strides[0] + g * log_beta_strides[1] + k_row0, doc_start_base, pid_m, offs_m,
        offs_d, row_ok, n_q, n_k, scale_log2, 0, None, None, None, 0, 0, None, None, 0, False,
        True, BLOCK_M, BLOCK_N, DOT_PRECISION, False)
    _fwd_store(acc, m_i, l_i, out_ptr, out_strides, lse_ptr, lse_strides, b, h, q_row0, offs_m, offs_d, row_ok)


@triton.jit(do_not_specialize=["N", "Nk"])
def looped_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, k_new_ptr, v_new_ptr, gate_ptr, k_out_ptr, v_out_ptr, out_ptr, lse_ptr,
    q_strides, k_strides, v_strides, new_strides, gate_strides, kv_out_strides, out_strides, lse_strides,
    program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
    H, N, Nk, group, scale_log2, blend_start,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, GATE_PER_CHANNEL: tl.constexpr,
):
    # MELT: attention over the cache whose rows j >= blend_start are read as g * cache + (1 - g) * new, and
    # written to k_out / v_out. k_new and v_new share new_strides, k_out and v_out kv_out_strides (the
    # launchers allocate them alike).
    pid_m, b, h, g, q_row0, k_row0, offs_m, offs_d, row_ok, n_q, n_k, _, q, acc, m_i, l_i = _fwd_start(
        q_ptr, q_strides, H, group, N, Nk, 0, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
        HEAD_DIM, BLOCK_M, ACC)
    new_row = b * new_strides[0] + g * new_strides[1] + k_row0 * new_strides[2]
    out_row = b * kv_out_strides[0] + g * kv_out_strides[1] + k_row0 * kv_out_strides[2]
    # The last query block sees every key (also when causal); the group's first head writes the rows.
    is_writer = (pid_m == tl.cdiv(n_q, BLOCK_M) - 1) & (h % group == 0)
    acc, m_i, l_i = _fwd_sequence_keys(
        acc, m_i, l_i, q, k_ptr + b * k_strides[0] + g * k_strides[1] + k_row0 * k_strides[2],
        v_ptr + b * v_strides[0] + g * v_strides[1] + k_row0 * v_strides[2], k_strides[2], v_strides[2], None, None,
        pid_m, offs_m, offs_d, row_ok, n_q, n_k, scale_log2, blend_start, k_new_ptr + new_row, v_new_ptr + new_row,
        gate_ptr + b * gate_strides[0] + g * gate_strides[1] + k_row0 * gate_strides[2], new_strides[2],
        gate_strides[2], k_out_ptr + out_row, v_out_ptr + out_row, kv_out_strides[2], is_writer,
        CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, GATE_PER_CHANNEL)
    _fwd_store(acc, m_i, l_i, out_ptr, out_strides, lse_ptr, lse_strides, b, h, q_row0, offs_m, offs_d, row_ok)


@triton.jit(do_not_specialize=["N"])
def memory_attention_delta_kernel(
    out_ptr, do_ptr, grad_lse_ptr, delta_ptr,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    # delta[i] = dout[i] . out[i] - dlse[i]: the softmax backward's row term (a grad on lse adds p * dlse
    # to ds, the same as lowering delta by dlse; grad_lse_ptr None: no grad on lse). One read of O and dO,
    # fp32 math, no fp32 copies.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(ACC)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(ACC)
    delta = tl.sum(o * do, axis=1)
    if grad_lse_ptr is not None:
        delta -= tl.load(grad_lse_ptr + bh * N + offs_m, mask=row_ok, other=0.0).to(ACC)
    tl.store(delta_ptr + bh * N + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_key_range(
    dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, bias_base, decay_base, num_keys, first, end,
    offs_m, offs_d, causal_shift, scale_log2, query_doc_start,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start in range(first, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < num_keys
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None], mask=in_range[None, :], other=0.0)
        s = _masked_logits(q, tl.trans(k), bias_base, decay_base, offs_n, in_range, offs_m, causal_shift, scale_log2,
                           query_doc_start, CAUSAL=CAUSAL, ACC=dq.dtype, DOT_PRECISION=DOT_PRECISION)
        p = tl.math.exp2(s - lse_log2[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION).to(dq.dtype)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION).to(dq.dtype)
    return dq


@triton.jit(do_not_specialize=["N", "Nk", "M"])
def memory_attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, mem_k_ptr, mem_v_ptr, bias_ptr, decay_ptr, doc_start_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr, q_strides, k_strides, v_strides, mem_k_strides, mem_v_strides, bias_strides, decay_strides, do_strides,
    dq_strides, doc_stride, lse_strides, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
    H, N, Nk, M, group, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # dQ of every attention path: mem_k / mem_v, bias_ptr, decay_ptr (retention log_beta), doc_start_ptr
    # (packed documents) and cu_q_ptr / cu_k_ptr (packed sequences) are None when absent.
    pid_m, b, h, g, q_row0, k_row0, offs_m, row_ok, N, Nk, M = _query_program(
        H, group, N, Nk, M, program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q, do, lse_log2, delta = _backward_rows(
        q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, q_row0, offs_m, offs_d, row_ok, q_strides, do_strides,
        lse_strides, ACC)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=ACC)
    if mem_k_ptr is not None:
        bias_base = None
        if bias_ptr is not None:
            bias_base = bias_ptr + b * bias_strides[0] + g * bias_strides[1]
        dq = _dq_key_range(
            dq, q, do, lse_log2, delta, mem_k_ptr + b * mem_k_strides[0] + g * mem_k_strides[1],
            mem_v_ptr + b * mem_v_strides[0] + g * mem_v_strides[1], mem_k_strides[2], mem_v_strides[2], bias_base,
            None, M, 0, M, offs_m, offs_d, 0, scale_log2, None, CAUSAL=False, BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION,
        )
    end = _causal_key_end(pid_m, N, Nk, BLOCK_M, CAUSAL)
    first = 0
    query_doc_start = None
    if doc_start_ptr is not None:  # keys before the first row's document start are seen by no row
        query_doc_start, first, _ = _query_documents(doc_start_ptr + b * doc_stride, pid_m, offs_m, row_ok, N, Nk,
                                                     BLOCK_M, BLOCK_N)
    decay_base = None
    if decay_ptr is not None:
        decay_base = decay_ptr + b * decay_strides[0] + g * decay_strides[1] + k_row0
    dq = _dq_key_range(
        dq, q, do, lse_log2, delta, k_ptr + b * k_strides[0] + g * k_strides[1] + k_row0 * k_strides[2],
        v_ptr + b * v_strides[0] + g * v_strides[1] + k_row0 * v_strides[2], k_strides[2], v_strides[2], None,
        decay_base, Nk, first, end, offs_m, offs_d, Nk - N, scale_log2, query_doc_start,
        CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
    )
    tl.store(dq_ptr + b * dq_strides[0] + h * dq_strides[1] + q_row0 * dq_strides[2] + offs_m[:, None] * dq_strides[2]
             + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _store_key_grads(dk, dv, ddecay, dk_ptr, dv_ptr, ddecay_ptr, b, g, k_row0, offs_n, offs_d, in_range, dk_strides,
                     ddecay_strides):
    """A sequence key block's dk, dv (and dlog_beta unless ddecay_ptr is None). dk and dv are allocated alike
    (contiguous), so they share one set of strides."""
    row_base = b * dk_strides[0] + g * dk_strides[1] + k_row0 * dk_strides[2]
    mask = in_range[:, None]
    tl.store(dk_ptr + row_base + offs_n[:, None] * dk_strides[2] + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dv_ptr + row_base + offs_n[:, None] * dk_strides[2] + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=mask)
    if ddecay_ptr is not None:
        tl.store(ddecay_ptr + b * ddecay_strides[0] + g * ddecay_strides[1] + k_row0 + offs_n, ddecay, mask=in_range)


@triton.jit(do_not_specialize=["N", "Nk", "M"])
def memory_attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mem_k_ptr, mem_v_ptr, bias_ptr, decay_ptr, doc_end_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dmem_k_ptr, dmem_v_ptr, dbias_ptr, ddecay_ptr,
    q_strides, k_strides, v_strides, mem_k_strides, mem_v_strides, bias_strides, decay_strides, do_strides,
    dmem_strides, dk_strides, doc_stride, lse_strides, ddecay_strides,
    program_seq_ptr, first_block_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
    H, Hkv, N, Nk, M, group, scale, scale_log2, memory_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MEMORY_GRAD_ATOMIC: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (key block, batch, kv head): memory key blocks first, then sequence key blocks.
    # It sums over the query heads of its group and over every query block that can see its keys. Packed
    # (cu_q_ptr given): grid (key-block programs over every sequence, Hkv), each sequence's memory blocks
    # first. Absent inputs (memory and its grads, bias and dbias, decay and ddecay, doc_end) are None.
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    if cu_q_ptr is not None:
        g = bg.to(tl.int64)
        b, pid_n, q_row0, k_row0, N, Nk, valid = _varlen_rows(pid_n, program_seq_ptr, first_block_ptr, cu_q_ptr,
                                                              cu_k_ptr, num_seqs)
        M = tl.where(valid, M, 0)
    else:
        b = (bg // Hkv).to(tl.int64)
        g = (bg % Hkv).to(tl.int64)
        q_row0 = b * 0
        k_row0 = b * 0
    # Branch-free selection between the two key tables keeps every value one type for the compiler.
    is_memory = pid_n < memory_blocks
    key_start = tl.where(is_memory, pid_n, pid_n - memory_blocks) * BLOCK_N
    offs_n = key_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_n < tl.where(is_memory, M, Nk)
    key_rows = offs_n[:, None].to(tl.int64)
    k_ptrs = (k_ptr + b * k_strides[0] + g * k_strides[1] + k_row0 * k_strides[2] + key_rows * k_strides[2]
              + offs_d[None, :])
    v_ptrs = (v_ptr + b * v_strides[0] + g * v_strides[1] + k_row0 * v_strides[2] + key_rows * v_strides[2]
              + offs_d[None, :])
    if mem_k_ptr is not None:
        k_ptrs = tl.where(is_memory, mem_k_ptr + b * mem_k_strides[0] + g * mem_k_strides[1]
                          + key_rows * mem_k_strides[2] + offs_d[None, :], k_ptrs)
        v_ptrs = tl.where(is_memory, mem_v_ptr + b * mem_v_strides[0] + g * mem_v_strides[1]
                          + key_rows * mem_v_strides[2] + offs_d[None, :], v_ptrs)
    k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    first_query = 0
    if CAUSAL:  # queries before this one cannot see any sequence key of the block
        first_query = tl.where(is_memory, 0, tl.maximum(key_start - (Nk - N), 0) // BLOCK_M * BLOCK_M)
    query_end = N
    key_doc_end = offs_n
    if doc_end_ptr is not None:  # (causal) queries past the end of the block's last document see none of its keys
        doc_end_base = doc_end_ptr + b * doc_stride
        key_doc_end = tl.load(doc_end_base + offs_n, mask=offs_n < tl.where(is_memory, 0, Nk), other=0)
        last_end = tl.load(doc_end_base + tl.maximum(tl.minimum(key_start + BLOCK_N, Nk) - 1, 0))
        query_end = tl.where(is_memory, N, tl.minimum(tl.maximum(last_end - (Nk - N), 0), N))
    bias_log2 = tl.zeros((BLOCK_N,), dtype=ACC)
    if bias_ptr is not None:
        bias_log2 = to_log2(tl.load(bias_ptr + b * bias_strides[0] + g * bias_strides[1] + offs_n,
                                    mask=offs_n < tl.where(is_memory, M, 0), other=0.0).to(ACC))
    decay_log2 = tl.zeros((BLOCK_N,), dtype=ACC)
    if decay_ptr is not None:  # sequence keys only
        decay_log2 = finite_log_beta(tl.load(decay_ptr + b * decay_strides[0] + g * decay_strides[1] + k_row0 + offs_n,
                                             mask=offs_n < tl.where(is_memory, 0, Nk), other=0.0).to(ACC))
        decay_log2 = to_log2(decay_log2)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=ACC)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=ACC)
    dbias = tl.zeros((BLOCK_N,), dtype=ACC)
    ddecay = tl.zeros((BLOCK_N,), dtype=ACC)
    for head in range(0, group):
        h = g * group + head
        for start_m in range(first_query, query_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            q, do, lse_log2, delta = _backward_rows(
                q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, q_row0, offs_m, offs_d, row_ok, q_strides, do_strides,
                lse_strides, ACC)
            # Transposed tiles (keys x queries), so the key-side sums are row sums.
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION).to(ACC) * scale_log2 + bias_log2[:, None]
            if decay_ptr is not None:
                distance_t = (offs_m[None, :] + (Nk - N) - offs_n[:, None]).to(ACC)
                s_t += distance_t * decay_log2[:, None]
            visible = in_range[:, None] & row_ok[None, :]
            if CAUSAL:  # memory keys are visible to every query
                visible = visible & ((offs_n[:, None] <= offs_m[None, :] + (Nk - N)) | is_memory)
            if doc_end_ptr is not None:  # a query sees the key only inside the key's document
                visible = visible & ((offs_m[None, :] + (Nk - N) < key_doc_end[:, None]) | is_memory)
            p_t = tl.where(visible, tl.math.exp2(s_t - lse_log2[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION).to(ACC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(ACC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION).to(ACC)
            dbias += tl.sum(ds_t, axis=1)
            if decay_ptr is not None:
                ddecay += tl.sum(ds_t * distance_t, axis=1)
    dk = dk * scale
    mask = in_range[:, None]
    if dmem_k_ptr is not None:
        if is_memory:
            dk_out = (dmem_k_ptr + b * dmem_strides[0] + g * dmem_strides[1] + offs_n[:, None] * dmem_strides[2]
                      + offs_d[None, :])
            dv_out = (dmem_v_ptr + b * dmem_strides[0] + g * dmem_strides[1] + offs_n[:, None] * dmem_strides[2]
                      + offs_d[None, :])
            if MEMORY_GRAD_ATOMIC:
                tl.atomic_add(dk_out, dk, mask=mask)
                tl.atomic_add(dv_out, dv, mask=mask)
            else:
                tl.store(dk_out, dk.to(dmem_k_ptr.dtype.element_ty), mask=mask)
                tl.store(dv_out, dv.to(dmem_v_ptr.dtype.element_ty), mask=mask)
            if dbias_ptr is not None:
                tl.store(dbias_ptr + (b * Hkv + g) * M + offs_n, dbias, mask=in_range)
        else:
            _store_key_grads(dk, dv, ddecay, dk_ptr, dv_ptr, ddecay_ptr, b, g, k_row0, offs_n, offs_d, in_range,
                             dk_strides, ddecay_strides)
    else:
        _store_key_grads(dk, dv, ddecay, dk_ptr, dv_ptr, ddecay_ptr, b, g, k_row0, offs_n, offs_d, in_range,
                         dk_strides, ddecay_strides)


# ---------------------------------------------------------------------------------------------------------
# Launch configs on CUDA: one table per kernel (forward, dQ, dK/dV), keyed (arch class, dtype class, head dim),
# an entry per code path ("*": every path not named). Values are (BLOCK_M, BLOCK_N, num_warps, num_stages),
# or None where no config compiles clean: the public ops' "auto" backend then runs the reference instead
# (:func:`reference_instead`). Every entry was chosen from `memops gpu-check` compile figures (registers,
# stack and LDL/STL, shared memory against the per-block limit, how each dot lowered) under Triton 3.6 and
# 3.9: the largest tile among the candidates tried that has no spill, fits, and keeps 16-bit and tf32 dots
# on wgmma (sm_90) / mma.sync (sm_80). Timing on a GPU may reorder clean candidates
# (benchmarks/tune_attention.py); it must not bring back a spilling one. docs/gpu-compile.md has the figures.
#
# arch class: 90 = sm_90 and newer (227 KiB shared memory per block, wgmma needs 64 rows per warpgroup);
#             80 = sm_80 to sm_89 (163 KiB on sm_80, mma.sync). Older GPUs take the sm_80 table.
# dtype class: "16" = bf16 / fp16; "tf32" = fp32 inputs with torch.get_float32_matmul_precision() "high" or
#             "medium"; "fp32" = fp32 with "highest": ieee dots, which Triton lowers to FMA with a full K row
#             per thread, so only D=64 (and D=128 on sm_80) fit in registers.
# path (forward): "memory" (memory tokens and/or a bias, or plain), "decay" (retention), "blend-row" /
#             "blend-channel" (looped: the gate per row / per channel); (backward): "memory", "decay". Both:
#             "documents" (retention over packed documents), the "decay" entry unless listed; "varlen-<path>"
#             (packed sequences, cu_seqlens), the <path> entry unless listed.
_Config = tuple[int, int, int, int]
FWD_CONFIGS: dict[tuple[int, str, int], tuple[dict[str, _Config | None], str]] = {
    (90, "16", 64): ({"*": (128, 64, 8, 3)}, "4 warps spill 32-40 B with a bias or decay; 8: 128-187 regs"),
    (90, "16", 128): ({"*": (128, 64, 8, 3), "blend-channel": (128, 64, 8, 2)},
                      "4 warps spill ~400 B; the per-channel gate at 3 stages needs 256 KiB (2 stages: 160 KiB)"),
    (90, "16", 256): ({"*": (128, 32, 8, 2), "memory": (128, 32, 8, 1), "blend-row": (128, 16, 8, 2),
                       "blend-channel": (128, 16, 8, 2), "varlen-blend-channel": None},
                      "BLOCK_N 64 spills 48-112 B or passes 227 KiB; 128x32: 204-236 regs; with a bias and causal, "
                      "2 stages spill 8 B under Triton 3.9 (1 stage: 240-249 regs); the looped blend at 128x32 "
                      "spills 8 B under Triton 3.6 (128x16: 244 regs)"),
    (80, "16", 64): ({"*": (128, 64, 8, 3), "blend-row": (64, 32, 4, 2), "blend-channel": (64, 32, 8, 2),
                      "varlen-blend-channel": None},
                     "the looped blend at 128 rows spills 400-660 B on sm_80, at 64x64 40-544 B"),
    (80, "16", 128): ({"*": (128, 32, 8, 2), "blend-row": (64, 32, 4, 2), "blend-channel": (64, 32, 8, 2),
                       "varlen-blend-row": None},
                      "128x64 sits at 255 regs; the looped blend spills 30-9,500 B at 64 keys or 128 rows"),
    (80, "16", 256): ({"*": (64, 32, 8, 1), "blend-row": (64, 16, 8, 1), "blend-channel": None,
                       "varlen-blend-row": None},
                      "2 stages or 128 rows spill 8-24 B; the per-row blend spills 24-88 B at 64x32 (64x16: 255 "
                      "regs, no stack); the per-channel blend spills 32-740 B at every tile tried, down to 16x32"),
    (90, "tf32", 64): ({"*": (128, 64, 8, 2)}, "clean on every path (177-230 regs, <=160 KiB)"),
    (90, "tf32", 128): ({"*": (128, 32, 8, 2)}, "BLOCK_N 64 passes 227 KiB with the looped blend"),
    (90, "tf32", 256): ({"*": (128, 16, 8, 2), "blend-row": None, "blend-channel": None},
                        "64-row tiles spill 16 B-1 KB; the looped blend spills 16-744 B at every tile tried "
                        "(128x16 x2: 144 B under Triton 3.6) or, per channel, passes 227 KiB"),
    (80, "tf32", 64): ({"*": (128, 32, 8, 3), "memory": (64, 32, 8, 3), "blend-channel": (32, 32, 4, 2),
                        "varlen-memory": (32, 32, 8, 2)},
                       "the per-channel blend spills 176-5,600 B at 4 warps or 128 rows; memory attention at 128 "
                       "rows spills 8 B under Triton 3.6"),
    (80, "tf32", 128): ({"*": (64, 32, 8, 2), "memory": (32, 32, 8, 2), "blend-row": (64, 16, 8, 2),
                         "blend-channel": (64, 16, 8, 2), "varlen-blend-channel": None},
                        "4 warps sit at 255 regs; 128 rows spill with the looped blend; memory attention and the "
                        "blend at 64x32 spill 8 B under Triton 3.6 (32x32: 128 regs; blend 64x16: 236-250)"),
    (80, "tf32", 256): ({"*": (64, 32, 8, 1), "blend-row": None, "blend-channel": None},
                        "the looped blend spills 136 B-5 KB at every tile tried"),
    (90, "fp32", 64): ({"*": (64, 32, 8, 1), "varlen-blend-row": None, "varlen-blend-channel": None},
                       "FMA dots: 94-244 regs, no stack; the packed (varlen) looped blend spills 8-24 B under Triton "
                       "3.9 at 64x16"),
    (90, "fp32", 128): ({"*": None}, "FMA dots spill 40-800 B at every tile down to 16x32"),
    (90, "fp32", 256): ({"*": None}, "FMA dots spill 2-8.7 KB at every tile tried"),
    (80, "fp32", 64): ({"*": (64, 32, 8, 1), "memory": (32, 32, 8, 1), "varlen-blend-row": None,
                        "varlen-blend-channel": None},
                       "FMA dots: 80-226 regs, no stack; memory attention at 64x32 spills 16 B under Triton 3.6 "
                       "(32x32: 74 regs)"),
    (80, "fp32", 128): ({"*": (32, 32, 8, 1)}, "FMA dots: 78-219 regs; 4 warps or 64 rows spill 500+ B"),
    (80, "fp32", 256): ({"*": None}, "FMA dots spill 1-1.3 KB at every tile tried"),
}
# dQ: one program per BLOCK_M queries streaming BLOCK_N keys. wgmma needs BLOCK_M >= 64 on sm_90.
DQ_CONFIGS: dict[tuple[int, str, int], tuple[dict[str, _Config | None], str]] = {
    (90, "16", 64): ({"*": (64, 64, 4, 2)}, "142-161 regs on every path"),
    (90, "16", 128): ({"*": (64, 64, 4, 2)}, "213-232 regs; the H100 DiT-Mem timing chose 4 warps"),
    (90, "16", 256): ({"*": (64, 32, 8, 2)}, "4 warps or BLOCK_N 64 spill 8-264 B; 32x32 was mma.sync"),
    (80, "16", 64): ({"*": (64, 64, 4, 2), "memory": (64, 32, 4, 2)},
                     "183-202 regs; memory attention at 64x64 spills 8 B under Triton 3.6 (64x32: 166-168 regs)"),
    (80, "16", 128): ({"*": (64, 32, 4, 2), "varlen-memory": (64, 32, 8, 2), "varlen-decay": None},
                      "64x64 sits at 255 regs, 128x64 spills 32 B; packed (varlen) memory attention at 4 warps spills "
                      "24-64 B at 1 or 2 stages; with decay 8 warps too (8 B under Triton 3.6)"),
    (80, "16", 256): ({"*": (64, 32, 8, 2)}, "4 warps or 1 stage spill 1-4.7 KB"),
    (90, "tf32", 64): ({"*": (64, 64, 4, 2), "documents": (64, 32, 4, 2)},
                       "150-168 regs; with packed documents 64x64 spills 16 B under Triton 3.6 (64x32: 123-153 regs)"),
    (90, "tf32", 128): ({"*": (64, 32, 8, 2)},
                        "137-251 regs; 4 warps spill 40-56 B under Triton 3.6, BLOCK_N 64 48-80 B"),
    (90, "tf32", 256): ({"*": None}, "see DKDV_CONFIGS: the backward has no clean dK/dV config at D=256"),
    (80, "tf32", 64): ({"*": (64, 32, 8, 2)}, "4 warps spill 16 B with a bias"),
    (80, "tf32", 128): ({"*": (64, 32, 8, 2), "varlen-memory": None, "varlen-decay": None},
                        "4 warps sit at 255 regs; packed (varlen) spills 400+ B at 1 stage"),
    (80, "tf32", 256): ({"*": None}, "see DKDV_CONFIGS"),
    (90, "fp32", 64): ({"*": (32, 16, 4, 1)}, "FMA dots: 78-106 regs"),
    (90, "fp32", 128): ({"*": None}, "FMA dots spill 250-660 B at 32x32, 32x16 and 16x32"),
    (90, "fp32", 256): ({"*": None}, "FMA dots spill at D=128 already"),
    (80, "fp32", 64): ({"*": (32, 16, 4, 1), "varlen-memory": None},
                       "FMA dots: 72-80 regs; packed (varlen) memory attention spills 8-16 B"),
    (80, "fp32", 128): ({"*": (32, 16, 4, 1)}, "FMA dots: 108-120 regs"),
    (80, "fp32", 256): ({"*": None}, "FMA dots spill at every tile tried"),
}
# dK/dV: one program per BLOCK_N keys (memory rows first, then sequence keys) streaming BLOCK_M queries; its
# dots have BLOCK_N rows, and the dK and dV accumulators (2 x BLOCK_N x D fp32) set the register budget.
DKDV_CONFIGS: dict[tuple[int, str, int], tuple[dict[str, _Config | None], str]] = {
    (90, "16", 64): ({"*": (32, 128, 8, 2)}, "152-187 regs; 64x64 at 4 warps reaches 255 with decay"),
    (90, "16", 128): ({"*": (32, 64, 8, 2)}, "210-230 regs (GQA); 32x128 spills 32 B with decay, 4 warps 8-80 B"),
    (90, "16", 256): ({"*": None}, "every tile tried (16-64 x 64, 4-8 warps, 1-2 stages) spills 200 B-1 KB"),
    (80, "16", 64): ({"*": (32, 128, 8, 1)}, "202-252 regs; 2 stages spill 16-24 B under Triton 3.6 with a bias or "
                     "decay, 32x64 and 64x64 8-144 B"),
    (80, "16", 128): ({"*": (64, 64, 8, 2), "decay": (32, 64, 8, 2)},
                      "the only tile tried without a spill on every path (atomics: 1 KB); with decay it spills 16 B "
                      "under Triton 3.9 (32x64: 240-255 regs)"),
    (80, "16", 256): ({"*": None}, "every tile tried spills 24 B-5 KB"),
    (90, "tf32", 64): ({"*": (32, 64, 4, 2), "decay": (16, 64, 4, 2)},
                       "164-216 regs; with decay 32x64 spills 16 B under Triton 3.6 (16x64: 168-204 regs)"),
    (90, "tf32", 128): ({"*": None}, "no tile tried is clean under both Triton versions: 16x64x8w x1 stage "
                        "spills 40-112 B under 3.9, 16x128x8w 16-72 B under 3.6 (decay, atomics)"),
    (90, "tf32", 256): ({"*": None}, "the accumulators alone are 128 regs per thread at 64 keys x 8 warps"),
    (80, "tf32", 64): ({"*": (32, 32, 4, 2), "documents": (32, 32, 4, 1)},
                       "168-186 regs; 32x64 spills 32-80 B, 16x64 24 B under 3.6, 8 warps 430 B-1.2 KB; with packed "
                       "documents 2 stages spill 8 B under 3.9 (1 stage: 168 regs)"),
    (80, "tf32", 128): ({"*": (32, 64, 8, 1), "varlen-memory": None}, "248-255 regs; 2 stages spill 8-40 B under "
                        "Triton 3.6, 4 warps 64 B-1 KB; packed (varlen) at 32x32 spills"),
    (80, "tf32", 256): ({"*": None}, "as on sm_90"),
    (90, "fp32", 64): ({"*": (32, 16, 4, 1), "decay": (16, 16, 4, 1)},
                       "FMA dots: 90 regs; 16x32 spills 8 B under Triton 3.6, 32x32 24-288 B; with decay 32x16 spills "
                       "8 B under Triton 3.6 (16x16: 77-80 regs)"),
    (90, "fp32", 128): ({"*": None}, "FMA dots spill 88 B-8 KB at every tile tried"),
    (90, "fp32", 256): ({"*": None}, "FMA dots spill at D=128 already"),
    (80, "fp32", 64): ({"*": (16, 16, 4, 1)}, "FMA dots: 80 regs; 16x32 and 32x16 spill 8-24 B"),
    (80, "fp32", 128): ({"*": None}, "no tile tried is clean on both the bias and the atomic path (16-1,300 B)"),
    (80, "fp32", 256): ({"*": None}, "FMA dots spill at every tile tried"),
}
# The interpreter: few, large programs.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _lookup(table, arch: int, dtype: torch.dtype, head_dim: int, path: str) -> _Config | None:
    key = (90 if arch >= 90 else 80, dtype_class(dtype), 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256)
    by_path = table[key][0]
    if path.startswith("varlen-") and path not in by_path:
        # Packed sequences hold a few more registers (each program's lengths and row offsets are values, not
        # arguments), and the padded tiles sit at the register limit: one pipeline stage less, or half the
        # key block at one stage, unless the table lists the path.
        config = _lookup(table, arch, dtype, head_dim, path[len("varlen-") :])
        if config is None:
            return None
        block_m, block_n, warps, stages = config
        return (block_m, block_n, warps, stages - 1) if stages > 1 else (block_m, max(block_n // 2, 16), warps, 1)
    if path == "documents" and path not in by_path:  # packed documents: the decay path's tile unless listed
        path = "decay"
    return by_path.get(path, by_path["*"])


def _as_dict(config: _Config) -> dict:
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), config))


# fp64 (gradcheck on CUDA) is not a speed path: the smallest tiles, which fit at every head dim.
_FP64_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _pick(table, device, dtype, head_dim: int, path: str) -> dict:
    arch = launch_arch(device)
    if arch is None:
        return dict(_INTERPRETER_CONFIG)
    if dtype == torch.float64:
        return dict(_FP64_CONFIG)
    config = _lookup(table, arch, dtype, head_dim, path)
    if config is None:  # backend="triton" asked for a kernel with no clean config: the smallest tile
        return {"BLOCK_M": 64 if arch >= 90 else 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return _as_dict(config)


def fwd_path(*, decay: bool = False, gate_per_channel: bool | None = None) -> str:
    """The forward table's path name: gate_per_channel None = no looped blend."""
    if gate_per_channel is not None:
        return "blend-channel" if gate_per_channel else "blend-row"
    return "decay" if decay else "memory"


def attention_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                     path: str = "memory") -> dict:
    """The forward kernel's launch config (see FWD_CONFIGS)."""
    return _pick(FWD_CONFIGS, device, dtype, head_dim, path)


def attention_bwd_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                         path: str = "memory") -> dict:
    """{"dq": ..., "dkdv": ...}: the backward kernels' launch configs (see DQ_CONFIGS, DKDV_CONFIGS)."""
    return {"dq": _pick(DQ_CONFIGS, device, dtype, head_dim, path),
            "dkdv": _pick(DKDV_CONFIGS, device, dtype, head_dim, path)}


def reference_instead(q: torch.Tensor, path: str, *, backward: bool) -> str | None:
    """Why the "auto" backend should run the reference for attention on q's device, or None: a table has no
    clean config for (arch, dtype, head dim, path). ``backward``: the backward kernels are needed too."""
    arch = launch_arch(q.device)
    if arch is None or q.dtype == torch.float64:
        return None
    # the backward tables know two paths: the looped blend's backward is plain memory attention
    packed = "varlen-" if path.startswith("varlen-") else ""
    bwd_path = packed + ("decay" if path.removeprefix("varlen-") == "decay" else "memory")
    tables = [("forward", FWD_CONFIGS, path)]
    if backward:
        tables += [("dQ", DQ_CONFIGS, bwd_path), ("dK/dV", DKDV_CONFIGS, bwd_path)]
    for name, table, table_path in tables:
        if _lookup(table, arch, q.dtype, q.shape[-1], table_path) is None:
            return f"no {name} config for sm_{arch} {q.dtype} D={q.shape[-1]} ({path})"
    return None


def _strides3(t: torch.Tensor | None):
    """(batch, head, row) strides of a (B, H, L, D) tensor or a batch-shared (H, L, D) one (batch stride 0)."""
    if t is None:
        return 0, 0, 0
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _row_strides(t: torch.Tensor, packed: bool):
    """(batch, head, row) strides of the sequence tensors: (B, H, L, D), or packed (total, H, D) with batch
    stride 0 (the kernels add each sequence's first row instead)."""
    return (0, t.stride(1), t.stride(0)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def _decay_strides(log_beta: torch.Tensor | None):
    """(batch, kv head) strides of a (B, Hkv, Nk) log_beta, or of a packed (Hkv, total_k) one (batch 0); unit
    last stride."""
    if log_beta is None:
        return 0, 0
    return (0, log_beta.stride(0)) if log_beta.dim() == 2 else (log_beta.stride(0), log_beta.stride(1))


def _bias_strides(bias: torch.Tensor | None):
    """mem_bias already shaped (B|1, Hkv|1, M) with unit last stride; broadcast dims get stride 0."""
    if bias is None:
        return 0, 0
    return (bias.stride(0) if bias.shape[0] > 1 else 0), (bias.stride(1) if bias.shape[1] > 1 else 0)


def _document_strides(bounds: torch.Tensor | None) -> int:
    """Batch stride of a (B|1, Nk) int32 document-bounds tensor (0 when shared by every batch row)."""
    return 0 if bounds is None or bounds.shape[0] == 1 else bounds.stride(0)


def _lse_strides(lse: torch.Tensor):
    """(batch, head) strides of the (B, H, N) log-sum-exp, or of a packed (H, total) one (batch 0)."""
    return (0, lse.stride(0)) if lse.dim() == 2 else (lse.stride(0), lse.stride(1))


def varlen_programs(cu_seqlens: torch.Tensor, total: int, block: int, blocks_per_seq: int = 0):
    """Programs over packed sequences: sequence s gets ``blocks_per_seq + cdiv(len_s, block)`` programs, in
    order. Returns (program_seq (grid,) int32, first_block (S + 1,) int32, grid): program p belongs to the
    sequence s with first_block[s] <= p < first_block[s + 1] (found on the device, so nothing is read back).
    The grid is an upper bound known from shapes alone, ``(total + S (block - 1)) // block + S *
    blocks_per_seq`` >= the programs needed; those past them see length 0 and return at once."""
    num_seqs = cu_seqlens.shape[0] - 1
    grid = (total + num_seqs * (block - 1)) // block + num_seqs * blocks_per_seq
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + block - 1) // block + blocks_per_seq
    first_block = torch.zeros(num_seqs + 1, dtype=torch.int32, device=cu_seqlens.device)
    first_block[1:] = torch.cumsum(counts, 0)
    programs = torch.arange(grid, dtype=torch.int32, device=cu_seqlens.device)
    program_seq = torch.searchsorted(first_block[1:], programs, right=True, out_int32=True)
    return program_seq, first_block, grid


def _packing_args(cu_seqlens_q, cu_seqlens_k, num_queries: int, block: int):
    """The query-block kernels' (program_seq, first_block, cu_q, cu_k, S) arguments and the grid's first axis;
    padded (cu_seqlens_q None): Nones, 0 and cdiv(N, block)."""
    if cu_seqlens_q is None:
        return (None, None, None, None, 0), triton.cdiv(num_queries, block)
    program_seq, first_block, grid = varlen_programs(cu_seqlens_q, num_queries, block)
    return (program_seq, first_block, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1), grid


def _fwd_outputs(q, k, packed: bool):
    """((B, H, N, D), (Hkv, Nk), out, lse) of a forward launch: out contiguous in q.dtype, lse (B, H, N), or
    packed (H, total_q), fp32 (fp64 for fp64). The kernels derive both outputs' strides from these shapes.
    Packed: B = 1, N = total_q, Nk = total_k."""
    if packed:
        (_, H, D), (Hkv, Nk), B, N = q.shape, (k.shape[1], k.shape[0]), 1, q.shape[0]
    else:
        B, H, N, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((H, N) if packed else (B, H, N), dtype=lse_dtype, device=q.device)
    return (B, H, N, D), (Hkv, Nk), out, lse


def _fwd_launch_options(q, path: str, packed: bool, config: dict | None) -> dict:
    """The constexprs and launch options every forward kernel takes (HEAD_DIM, tiles, ACC, DOT_PRECISION)."""
    cfg = config or attention_config(q.shape[-1], q.device, q.dtype, f"varlen-{path}" if packed else path)
    return dict(HEAD_DIM=q.shape[-1], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], ACC=accumulator(q),
                DOT_PRECISION=dot_precision(q), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def memory_attention_fwd(
    q, k, v, mem_k, mem_v, mem_bias, *, causal: bool, scale: float, cu_seqlens_q=None, cu_seqlens_k=None,
    config: dict | None = None,
):
    """out (B, H, N, D) in q.dtype and lse (B, H, N) fp32 (fp64 for fp64) of attention over [memory ;
    sequence] (:func:`memory_attention_fwd_kernel`).

    q (B, H, N, D); k, v (B, Hkv, Nk, D); mem_k, mem_v (B, Hkv, M, D), (Hkv, M, D) or None; mem_bias
    (B|1, Hkv|1, M) or None. Every tensor has unit stride in its last dim.

    Packed (varlen): cu_seqlens_q, cu_seqlens_k, int32 (S + 1,) each, contiguous; q (total_q, H, D), k, v
    (total_k, Hkv, D); memory and mem_bias with S in place of B. lse is then (H, total_q).
    """
    packed = cu_seqlens_q is not None
    (B, H, N, D), (Hkv, Nk), out, lse = _fwd_outputs(q, k, packed)
    if B * H * N == 0:
        return out, lse
    M = 0 if mem_k is None else mem_k.shape[-2]
    if M == 0:
        mem_k = mem_v = mem_bias = None
    options = _fwd_launch_options(q, "memory", packed, config)
    packing, programs = _packing_args(cu_seqlens_q, cu_seqlens_k, N, options["BLOCK_M"])
    record_launch("memory_attention_fwd_kernel")
    memory_attention_fwd_kernel[(programs, H if packed else B * H)](
        q, k, v, mem_k, mem_v, mem_bias, out, lse,
        _row_strides(q, packed), _row_strides(k, packed), _row_strides(v, packed), _strides3(mem_k),
        _strides3(mem_v), _bias_strides(mem_bias), _row_strides(out, packed), _lse_strides(lse), *packing,
        H, N, Nk, M, H // Hkv, scale * LOG2E, CAUSAL=causal, **options,
    )
    return out, lse


def retention_attention_fwd(
    q, k, v, log_beta, mem_k, mem_v, *, scale: float, doc_start=None, cu_seqlens_q=None, cu_seqlens_k=None,
    config: dict | None = None,
):
    """out and lse (as :func:`memory_attention_fwd`) of causal attention whose sequence logits decay by
    (pos_i - j) * log_beta[j] (:func:`retention_attention_fwd_kernel`).

    log_beta (B, Hkv, Nk), or packed (Hkv, total_k), unit last stride; mem_k, mem_v as for
    :func:`memory_attention_fwd` or None. doc_start (B|1, Nk) int32 contiguous, Nk > 0, not packed: each
    key's packed-document start; a query sees the sequence keys of its own document only.
    """
    packed = cu_seqlens_q is not None
    (B, H, N, D), (Hkv, Nk), out, lse = _fwd_outputs(q, k, packed)
    if B * H * N == 0:
        return out, lse
    if doc_start is not None and not (Nk > 0 and not packed):
        raise ValueError("retention_attention_fwd: doc_start needs Nk > 0 keys, not packed")
    M = 0 if mem_k is None else mem_k.shape[-2]
    if M == 0:
        mem_k = mem_v = None
    options = _fwd_launch_options(q, "documents" if doc_start is not None else "decay", packed, config)
    packing, programs = _packing_args(cu_seqlens_q, cu_seqlens_k, N, options["BLOCK_M"])
    record_launch("retention_attention_fwd_kernel")
    retention_attention_fwd_kernel[(programs, H if packed else B * H)](
        q, k, v, mem_k, mem_v, log_beta, doc_start, out, lse,
        _row_strides(q, packed), _row_strides(k, packed), _row_strides(v, packed), _strides3(mem_k),
        _strides3(mem_v), _decay_strides(log_beta), _document_strides(doc_start), _row_strides(out, packed),
        _lse_strides(lse), *packing, H, N, Nk, M, H // Hkv, scale * LOG2E, **options,
    )
    return out, lse


def looped_attention_fwd(
    q, k, v, k_new, v_new, gate, k_out, v_out, *, causal: bool, scale: float, cu_seqlens_q=None,
    cu_seqlens_k=None, config: dict | None = None,
):
    """out and lse (as :func:`memory_attention_fwd`) of attention over the cache k, v whose last
    n = k_new.shape[2] rows are read as g * cache + (1 - g) * new, and written to k_out, v_out
    (:func:`looped_attention_fwd_kernel`).

    k, v (B, Hkv, Nk, D); k_out, v_out alike, sharing strides; k_new, v_new (B, Hkv, n, D), sharing strides;
    gate (B, Hkv, n, 1 or D). Packed: (total_k, Hkv, D | 1) for all of them, every sequence's n equal to its
    key count.
    """
    packed = cu_seqlens_q is not None
    (B, H, N, D), (Hkv, Nk), out, lse = _fwd_outputs(q, k, packed)
    if B * H * N == 0:
        return out, lse
    if k_new.stride() != v_new.stride() or k_out.stride() != v_out.stride():
        raise ValueError("looped_attention_fwd: k_new and v_new, and k_out and v_out, must share strides")
    gate_per_channel = gate.shape[-1] != 1
    options = _fwd_launch_options(q, fwd_path(gate_per_channel=gate_per_channel), packed, config)
    packing, programs = _packing_args(cu_seqlens_q, cu_seqlens_k, N, options["BLOCK_M"])
    blend_start = 0 if packed else Nk - k_new.shape[2]
    record_launch("looped_attention_fwd_kernel")
    looped_attention_fwd_kernel[(programs, H if packed else B * H)](
        q, k, v, k_new, v_new, gate, k_out, v_out, out, lse,
        _row_strides(q, packed), _row_strides(k, packed), _row_strides(v, packed), _row_strides(k_new, packed),
        _row_strides(gate, packed), _row_strides(k_out, packed), _row_strides(out, packed), _lse_strides(lse),
        *packing, H, N, Nk, H // Hkv, scale * LOG2E, blend_start,
        CAUSAL=causal, GATE_PER_CHANNEL=gate_per_channel, **options,
    )
    return out, lse


def memory_attention_bwd(
    grad_out, q, k, v, mem_k, mem_v, mem_bias, out, lse, *, causal: bool, scale: float, deterministic: bool,
    grad_lse: torch.Tensor | None = None, log_beta=None, doc_start=None, doc_end=None, cu_seqlens_q=None,
    cu_seqlens_k=None, config: dict | None = None,
):
    """(dq, dk, dv, dmem_k, dmem_v, dmem_bias, dlog_beta), the backward of all three forwards (the looped
    blend's backward is plain attention over the blended cache, then the blend's own kernel); dmem_* None
    without memory; dmem_bias is (B, Hkv, M) fp32 and the caller sums it down to mem_bias' shape; dlog_beta
    (B, Hkv, Nk) fp32 or None. Arguments as for :func:`memory_attention_fwd` and
    :func:`retention_attention_fwd`, grad_out (B, H, N, D) with unit last stride, grad_lse (B, H, N) or None;
    packed documents give doc_start and doc_end (B|1, Nk) int32 (one past each key's document end) together.
    Packed (cu_seqlens_q, cu_seqlens_k): the layouts of :func:`memory_attention_fwd`, S in place of B for the
    memory grads, dlog_beta (Hkv, total_k)."""
    packed = cu_seqlens_q is not None
    if packed:
        (_, H, D), (Hkv, Nk), N = q.shape, (k.shape[1], k.shape[0]), q.shape[0]
        B = cu_seqlens_q.shape[0] - 1  # the memory grads' batch: one per sequence
    else:
        B, H, N, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
    M = 0 if mem_k is None else mem_k.shape[-2]
    if not M:
        mem_k = mem_v = None
    bias = mem_bias if M else None
    acc, precision = accumulator(q), dot_precision(q)
    path = "documents" if doc_start is not None else "decay" if log_beta is not None else "memory"
    cfg = config or attention_bwd_config(D, q.device, q.dtype, f"varlen-{path}" if packed else path)
    # one config for both kernels, or {"dq": ..., "dkdv": ...}
    dq_cfg, dkdv_cfg = (cfg["dq"], cfg["dkdv"]) if "dq" in cfg else (cfg, cfg)
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    shared = M > 0 and mem_k.dim() == 3
    atomic = shared and not deterministic
    if M == 0:
        dmem_k = dmem_v = None
    elif atomic:  # fp32 (Hkv, M, D) accumulators, summed over the batch by atomics
        dmem_k, dmem_v = (torch.zeros((Hkv, M, D), dtype=lse.dtype, device=q.device) for _ in range(2))
    else:  # per-sample grads (summed over the batch afterwards in a fixed order when shared)
        buffer_dtype = lse.dtype if shared else mem_k.dtype
        dmem_k, dmem_v = (torch.empty((B, Hkv, M, D), dtype=buffer_dtype, device=q.device) for _ in range(2))
    dbias = torch.empty((B, Hkv, M), dtype=lse.dtype, device=q.device) if mem_bias is not None else None
    ddecay = torch.empty(log_beta.shape, dtype=lse.dtype, device=q.device) if log_beta is not None else None
    if H * N > 0 and B > 0:
        common = (
            _row_strides(q, packed), _row_strides(k, packed), _row_strides(v, packed), _strides3(mem_k),
            _strides3(mem_v), _bias_strides(bias), _decay_strides(log_beta), _row_strides(grad_out, packed),
        )
        # delta's rows: every (batch, head, query) row, packed ones as one batch of total rows
        rows = (lambda t: t.transpose(0, 1).unsqueeze(0)) if packed else (lambda t: t)
        row_out, row_grad = rows(out), rows(grad_out)
        record_launch("memory_attention_delta_kernel")
        memory_attention_delta_kernel[(triton.cdiv(N, 64), (1 if packed else B) * H)](
            row_out, row_grad, None if grad_lse is None else grad_lse.contiguous(), delta,
            row_out.stride(0), row_out.stride(1), row_out.stride(2),
            row_grad.stride(0), row_grad.stride(1), row_grad.stride(2),
            H, N, HEAD_DIM=D, BLOCK_M=64, ACC=acc,
        )
        packing, programs = _packing_args(cu_seqlens_q, cu_seqlens_k, N, dq_cfg["BLOCK_M"])
        record_launch("memory_attention_dq_kernel")
        memory_attention_dq_kernel[(programs, H if packed else B * H)](
            q, k, v, mem_k, mem_v, bias, log_beta, doc_start, grad_out, lse, delta, dq,
            *common, _row_strides(dq, packed), _document_strides(doc_start), _lse_strides(lse),
            *packing, H, N, Nk, M, H // Hkv, scale, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=dq_cfg["BLOCK_M"], BLOCK_N=dq_cfg["BLOCK_N"], CAUSAL=causal, ACC=acc,
            DOT_PRECISION=precision, num_warps=dq_cfg["num_warps"], num_stages=dq_cfg["num_stages"],
        )
        memory_blocks = triton.cdiv(M, dkdv_cfg["BLOCK_N"])
        if packed:  # key-block programs: each sequence's memory blocks, then its key blocks
            program_seq, first_block, programs = varlen_programs(cu_seqlens_k, Nk, dkdv_cfg["BLOCK_N"], memory_blocks)
            packing = (program_seq, first_block, cu_seqlens_q, cu_seqlens_k, B)
        else:
            packing, programs = (None, None, None, None, 0), memory_blocks + triton.cdiv(Nk, dkdv_cfg["BLOCK_N"])
        record_launch("memory_attention_dkdv_kernel")
        memory_attention_dkdv_kernel[(programs, Hkv if packed else B * Hkv)](
            q, k, v, mem_k, mem_v, bias, log_beta, doc_end, grad_out, lse, delta,
            dk, dv, dmem_k, dmem_v, None if bias is None else dbias, ddecay, *common,
            _strides3(dmem_k), _row_strides(dk, packed), _document_strides(doc_end), _lse_strides(lse),
            _decay_strides(ddecay), *packing,
            H, Hkv, N, Nk, M, H // Hkv, scale, scale * LOG2E, memory_blocks,
            HEAD_DIM=D, BLOCK_M=dkdv_cfg["BLOCK_M"], BLOCK_N=dkdv_cfg["BLOCK_N"], CAUSAL=causal,
            MEMORY_GRAD_ATOMIC=atomic, ACC=acc, DOT_PRECISION=precision,
            num_warps=dkdv_cfg["num_warps"], num_stages=dkdv_cfg["num_stages"],
        )
    else:  # no query: every grad is zero
        for t in (dq, dk, dv, dmem_k, dmem_v, dbias, ddecay):
            if t is not None:
                t.zero_()
    if M and shared and not atomic:  # fixed-order batch reduction (deterministic mode)
        dmem_k, dmem_v = dmem_k.sum(0), dmem_v.sum(0)
    if M:
        dmem_k, dmem_v = dmem_k.to(mem_k.dtype), dmem_v.to(mem_v.dtype)
    return dq, dk, dv, dmem_k, dmem_v, dbias, ddecay
