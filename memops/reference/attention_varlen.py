"""Pure-PyTorch definition of the packed (varlen) attention ops: each sequence on its own.

A packed batch holds S sequences back to back, FlashAttention's layout: q (total_q, H, D), k, v
(total_k, Hkv, D), sequence s being rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) of q and
[cu_seqlens_k[s], cu_seqlens_k[s + 1]) of k and v. The op on a packed batch is, by definition, the padded op
of ``memops.reference`` run on each sequence alone (batch 1), its rows put back in place; the LSE is
(H, total_q). Memory is per sequence (S, Hkv, M, D) or shared (Hkv, M, D); mem_bias has S in place of B.

The boundaries are read to the host once (the loop runs over them), which is what the CPU path pays anyway;
the Triton kernels never read them back. Where they cannot be read (meta and fake tensors, torch.compile's
tracing), the same ops are one attention over every packed row with a block-diagonal mask
(:func:`_masked_packed`): O(total^2) memory, equal results, no data-dependent branch.
"""

from __future__ import annotations

import torch

from memops._tensors import can_read_values
from memops.reference.attention import attention_lse, bias_3d, masked_attention, memory_attention
from memops.reference.looped import looped_blend
from memops.reference.retention import retention_attention


def _masked_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, mem_k, mem_v, mem_bias, *, causal, scale, log_beta,
                   return_lse):  # fmt: skip
    """Every sequence at once: one attention of all packed queries over [memory ; all packed keys], masked to
    each query's own sequence (bottom-right causal within it with ``causal``), plus each sequence's memory
    rows (no mask, no decay) and, with ``log_beta`` (total_k, Hkv), the decay (pos_i - j) * log_beta[j] with
    positions counted within the sequence. No value of the boundaries is read on the host."""
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    seq_q = torch.searchsorted(cu_seqlens_q[1:].long(), torch.arange(total_q, device=q.device), right=True)
    seq_k = torch.searchsorted(cu_seqlens_k[1:].long(), torch.arange(total_k, device=q.device), right=True)
    a = torch.arange(total_q, device=q.device) - cu_seqlens_q.long()[seq_q]  # the query's index in its sequence
    b = torch.arange(total_k, device=q.device) - cu_seqlens_k.long()[seq_k]
    shift = (cu_seqlens_k.long().diff() - cu_seqlens_q.long().diff())[seq_q]  # nk - nq of the query's sequence
    visible = seq_q[:, None] == seq_k[None, :]
    if causal or log_beta is not None:
        visible = visible & (b[None, :] <= (a + shift)[:, None])
    mask = torch.zeros(visible.shape, dtype=acc, device=q.device).masked_fill(~visible, float("-inf"))[None, None]
    if log_beta is not None:  # (pos_i - j) * log_beta[j] per kv head, repeated over its query heads
        distance = ((a + shift)[:, None] - b[None, :]).clamp_min(0).to(acc)
        decay = distance[None] * log_beta.to(acc).t()[:, None, :]  # (Hkv, total_q, total_k)
        mask = mask + decay.repeat_interleave(H // Hkv, dim=0)[None]
    keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if mem_k is not None and mem_k.shape[-2]:
        M = mem_k.shape[-2]
        if mem_k.dim() == 4:  # per sequence: S x M rows, each visible to its sequence's queries
            S = mem_k.shape[0]
            mem_keys = mem_k.transpose(0, 1).reshape(Hkv, S * M, D)[None]
            mem_values = mem_v.transpose(0, 1).reshape(Hkv, S * M, D)[None]
            owner = torch.arange(S, device=q.device).repeat_interleave(M)
            memory = torch.zeros(total_q, S * M, dtype=acc, device=q.device).masked_fill(
                seq_q[:, None] != owner[None, :], float("-inf"))[None, None]  # fmt: skip
        else:
            mem_keys, mem_values = mem_k[None], mem_v[None]
            memory = torch.zeros(1, 1, total_q, M, dtype=acc, device=q.device)
        if mem_bias is not None:  # (S|1, Hkv|1, M) -> per query row and head
            bias = bias_3d(mem_bias).to(acc)
            bias = bias[seq_q] if bias.shape[0] > 1 else bias.expand(total_q, -1, -1)  # (total_q, Hkv|1, M)
            bias = bias.repeat_interleave(H // Hkv, dim=1) if bias.shape[1] > 1 else bias
            bias = bias.permute(1, 0, 2)[None]  # (1, H|1, total_q, M)
            if mem_k.dim() == 4:
                bias = bias.repeat(1, 1, 1, mem_k.shape[0])  # one copy per sequence's block (masked elsewhere)
            memory = memory + bias
        keys, values = torch.cat([mem_keys, keys], 2), torch.cat([mem_values, values], 2)
        heads = max(memory.shape[1], mask.shape[1])  # 1 or H each
        mask = torch.cat([memory.expand(1, heads, -1, -1), mask.expand(1, heads, -1, -1)], -1)
    qh = q.transpose(0, 1)[None]
    out = masked_attention(qh.to(acc), keys.to(acc), values.to(acc), mask, scale).to(q.dtype)[0].transpose(0, 1)
    if not return_lse:
        return out
    return out, attention_lse(qh, keys, mask, scale)[0]


def sequence_bounds(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """[(q_start, q_end, k_start, k_end)] of every sequence, from one host read of the boundaries."""
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(q_bounds[s], q_bounds[s + 1], k_bounds[s], k_bounds[s + 1]) for s in range(len(q_bounds) - 1)]


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """Packed rows (n, heads, D) -> a batch of one (1, heads, n, D) view."""
    return t.transpose(0, 1).unsqueeze(0)


def _sequence_memory(mem: torch.Tensor | None, s: int) -> torch.Tensor | None:
    """Sequence s's memory rows: its (1, Hkv, M, D) slice of a per-sequence memory; a shared one as is."""
    return mem[s : s + 1] if mem is not None and mem.dim() == 4 else mem


def _sequence_bias(mem_bias: torch.Tensor | None, s: int) -> torch.Tensor | None:
    return mem_bias[s : s + 1] if mem_bias is not None and mem_bias.dim() == 3 and mem_bias.shape[0] > 1 else mem_bias


def _collect(result, with_lse: bool, outs: list, lses: list) -> None:
    """One sequence's (1, H, n, D) out (and (1, H, n) lse) as packed rows. The lse only when asked: the
    padded reference computes it separately, and without it square causal attention takes SDPA's causal path."""
    out, lse = result if with_lse else (result, None)
    outs.append(out[0].transpose(0, 1))
    if with_lse:
        lses.append(lse[0])


def _packed(q: torch.Tensor, outs: list, lses: list, lse_dtype: torch.dtype):
    """The per-sequence results back in packed rows: out (total_q, H, D) and lse (H, total_q)."""
    if not outs:  # no query at all: empty results, still attached to q's graph
        return q * 0, q.new_zeros((q.shape[1], 0), dtype=lse_dtype)
    return torch.cat(outs, dim=0), (torch.cat(lses, dim=1) if lses else None)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def memory_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None, *,
    causal: bool = False, scale: float | None = None, mem_bias: torch.Tensor | None = None,
    return_lse: bool = False,
):  # fmt: skip
    """``memops.memory_attention_varlen``: :func:`memops.reference.memory_attention` on each sequence."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not can_read_values(cu_seqlens_q):
        return _masked_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, mem_k, mem_v, mem_bias, causal=causal,
                              scale=scale, log_beta=None, return_lse=return_lse)  # fmt: skip
    outs, lses = [], []
    for s, (q0, q1, k0, k1) in enumerate(sequence_bounds(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0:
            continue
        result = memory_attention(
            _heads_first(q[q0:q1]), _heads_first(k[k0:k1]), _heads_first(v[k0:k1]),
            _sequence_memory(mem_k, s), _sequence_memory(mem_v, s),
            causal=causal, scale=scale, mem_bias=_sequence_bias(mem_bias, s), return_lse=return_lse,
        )  # fmt: skip
        _collect(result, return_lse, outs, lses)
    out, lse = _packed(q, outs, lses, _lse_dtype(q))
    return (out, lse) if return_lse else out


def retention_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False,
):  # fmt: skip
    """``memops.retention_attention_varlen``: :func:`memops.reference.retention_attention` on each sequence;
    log_beta (total_k, Hkv), so decay distances count within a sequence."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not can_read_values(cu_seqlens_q):
        return _masked_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, mem_k, mem_v, None, causal=True, scale=scale,
                              log_beta=log_beta, return_lse=return_lse)  # fmt: skip
    outs, lses = [], []
    for s, (q0, q1, k0, k1) in enumerate(sequence_bounds(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0:
            continue
        out = retention_attention(
            _heads_first(q[q0:q1]), _heads_first(k[k0:k1]), _heads_first(v[k0:k1]),
            log_beta[k0:k1].transpose(0, 1).unsqueeze(0),
            mem_k=_sequence_memory(mem_k, s), mem_v=_sequence_memory(mem_v, s), scale=scale, return_lse=return_lse,
        )  # fmt: skip
        _collect(out, return_lse, outs, lses)
    out, lse = _packed(q, outs, lses, _lse_dtype(q))
    return (out, lse) if return_lse else out


def looped_attention_varlen(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, *,
    causal: bool = True, scale: float | None = None,
):  # fmt: skip
    """``memops.looped_attention_varlen``: every packed row of the caches blended with the gate (the
    training path: each loop recomputes every token), then :func:`memory_attention_varlen` over the result
    with q's own boundaries. Returns (out, k, v)."""
    if k_cache is None:
        k, v = k_new, v_new
    else:
        k, v = looped_blend(k_cache, k_new, gate), looped_blend(v_cache, v_new, gate)
    return memory_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, causal=causal, scale=scale), k, v
