"""Pure-PyTorch definition of the packed (varlen) attention ops: each sequence on its own.

A packed batch holds S sequences back to back, FlashAttention's layout: q (total_q, H, D), k, v
(total_k, Hkv, D), sequence s being rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) of q and
[cu_seqlens_k[s], cu_seqlens_k[s + 1]) of k and v. The op on a packed batch is, by definition, the padded op
of ``memops.reference`` run on each sequence alone (batch 1), its rows put back in place; the LSE is
(H, total_q). Memory is per sequence (S, Hkv, M, D) or shared (Hkv, M, D); mem_bias has S in place of B.

The boundaries are read to the host once (the loop runs over them), which is what the CPU path pays anyway;
the Triton kernels never read them back.
"""

from __future__ import annotations

import torch

from memops.reference.attention import memory_attention
from memops.reference.looped import looped_blend
from memops.reference.retention import retention_attention


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
