"""Pure-PyTorch definition of MELT's shared looped KV update: the spec of ``memops.looped_kv_update`` and
``memops.looped_attention``, and their CPU path.

A looped transformer applies its layer stack T times. MELT keeps one KV cache per layer for all loops and
updates it with a learned gate g in [0, 1] (per token and head, (B, Hkv, n, 1), or per channel,
(B, Hkv, n, D)) at the rows being computed:

    loop 1:      K = k_1,                                V = v_1
    loop r > 1:  K[rows] = g * K[rows] + (1 - g) * k_r,  V[rows] = g * V[rows] + (1 - g) * v_r

and the loop's queries attend over the updated cache (causal, bottom-right aligned).
"""

from __future__ import annotations

import torch

from memops.reference.attention import memory_attention


def looped_kv_update(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gate: torch.Tensor,
    rows: slice | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """New (k, v) caches: rows ``rows`` of the (B, Hkv, Nk, D) caches blended with the (B, Hkv, n, D) new rows,
    ``g * cache + (1 - g) * new``; the other rows copied. rows None: all rows (n = Nk)."""
    rows = slice(None) if rows is None else rows
    k_out, v_out = k_cache.clone(), v_cache.clone()
    k_out[:, :, rows] = looped_blend(k_cache[:, :, rows], k_new, gate)
    v_out[:, :, rows] = looped_blend(v_cache[:, :, rows], v_new, gate)
    return k_out, v_out


def looped_blend(cache_rows: torch.Tensor, new_rows: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """g * cache + (1 - g) * new, written as the formula (and the kernels) so that an inf in either input
    gives inf, not the NaN of lerp's new + g * (cache - new)."""
    g = gate.to(cache_rows.dtype)
    return g * cache_rows + (1 - g) * new_rows


def looped_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gate: torch.Tensor,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, *,
    causal: bool = True, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out (B, H, n, D), k, v): the last n rows of the caches updated with the gate, then q's attention over
    the whole updated cache. No cache: k, v = k_new, v_new (the gate is not used)."""
    if k_cache is None:
        k, v = k_new, v_new
    else:
        Nk, n = k_cache.shape[2], k_new.shape[2]
        k, v = looped_kv_update(k_cache, v_cache, k_new, v_new, gate, slice(Nk - n, Nk))
    return memory_attention(q, k, v, causal=causal, scale=scale), k, v


def looped_kv_update_backward(
    grad_k: torch.Tensor, grad_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
    v_new: torch.Tensor, gate: torch.Tensor, rows: slice | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dk_cache, dv_cache, dk_new, dv_new, dgate) of :func:`looped_kv_update` from the output caches' grads:
    updated rows pass g * grad to the cache and (1 - g) * grad to the new rows; the gate gets
    (cache - new) * grad, summed over D for a per-row gate; other rows pass their grad through."""
    rows = slice(None) if rows is None else rows
    g = gate.to(grad_k.dtype)
    grad_k_rows, grad_v_rows = grad_k[:, :, rows], grad_v[:, :, rows]
    grad_k_cache, grad_v_cache = grad_k.clone(), grad_v.clone()
    grad_k_cache[:, :, rows] = g * grad_k_rows
    grad_v_cache[:, :, rows] = g * grad_v_rows
    grad_gate = (k_cache[:, :, rows] - k_new) * grad_k_rows + (v_cache[:, :, rows] - v_new) * grad_v_rows
    if gate.shape[-1] == 1:
        grad_gate = grad_gate.sum(-1, keepdim=True)
    return (
        grad_k_cache,
        grad_v_cache,
        ((1 - g) * grad_k_rows).to(k_new.dtype),
        ((1 - g) * grad_v_rows).to(v_new.dtype),
        grad_gate.to(gate.dtype),
    )
