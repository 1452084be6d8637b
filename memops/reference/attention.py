"""Pure-PyTorch definition of memory-token attention: the spec of ``memops.memory_attention`` and its CPU path.

    out = softmax(scale * q @ [mem_k ; k]^T + mask + [mem_bias ; 0]) @ [mem_v ; v]

Memory columns are visible to every query; ``causal`` masks the sequence columns only, aligned bottom-right
(query i sees sequence key j when j <= i + Nk - N). A query that sees no key gets a zero output and an LSE
of -inf. Built as what users write today: concatenate the memory onto K/V and call SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memops._tensors import can_read_values


def _expand_memory(mem: torch.Tensor, batch: int) -> torch.Tensor:
    # A batch-shared (Hkv, M, D) memory becomes a (B, Hkv, M, D) view; no copy until the concatenation.
    return mem.unsqueeze(0).expand(batch, *mem.shape) if mem.dim() == 3 else mem


def _logit_mask(q, num_kv_heads, num_keys, memory_length, causal, mem_bias):
    """Additive (B|1, H|1, N, M + Nk) mask, or None when nothing is masked or biased."""
    if not causal and mem_bias is None:
        return None
    B, H, N, _ = q.shape
    sequence = torch.zeros(1, 1, N, num_keys, dtype=q.dtype, device=q.device)
    if causal:
        rows = torch.arange(N, device=q.device).unsqueeze(1)
        cols = torch.arange(num_keys, device=q.device).unsqueeze(0)
        sequence = sequence.masked_fill(cols > rows + (num_keys - N), float("-inf"))
    if not memory_length:
        return sequence
    if mem_bias is None:
        memory = torch.zeros(1, 1, 1, memory_length, dtype=q.dtype, device=q.device)
    else:
        memory = bias_3d(mem_bias).to(q.dtype).unsqueeze(2)  # (B|1, Hkv|1, 1, M)
        if memory.shape[1] != 1:  # per kv head -> per query head
            memory = memory.repeat_interleave(H // num_kv_heads, dim=1)
    batch, heads = memory.shape[0], memory.shape[1]
    return torch.cat([memory.expand(-1, -1, N, -1), sequence.expand(batch, heads, -1, -1)], dim=-1)


def bias_3d(mem_bias: torch.Tensor) -> torch.Tensor:
    """(M,), (Hkv, M) or (B, Hkv, M) -> a (B|1, Hkv|1, M) view (autograd maps its grad back)."""
    while mem_bias.dim() < 3:
        mem_bias = mem_bias.unsqueeze(0)
    return mem_bias


def memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None, *,
    causal: bool = False, scale: float | None = None, mem_bias: torch.Tensor | None = None,
    return_lse: bool = False,
):  # fmt: skip
    """Attention of q over [memory ; sequence] keys. Shapes as ``memops.memory_attention``.

    q (B, H, N, D); k, v (B, Hkv, Nk, D); mem_k, mem_v (B, Hkv, M, D) or (Hkv, M, D); mem_bias (M,),
    (Hkv, M) or (B, Hkv, M). Returns out (B, H, N, D) in q.dtype, and lse (B, H, N) fp32 (fp64 for fp64) if return_lse.
    """
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    M = 0 if mem_k is None else mem_k.shape[-2]
    if M:
        keys = torch.cat([_expand_memory(mem_k, B), k], dim=2)
        vals = torch.cat([_expand_memory(mem_v, B), v], dim=2)
    else:
        keys, vals = k, v
    if causal and not M and N == Nk and not return_lse and 0 < scale < float("inf") and _finite(q, keys):
        # Square causal attention: bottom-right and top-left alignment agree, and SDPA's own causal path
        # skips building the (N, Nk) mask. (Only at a positive finite scale: torch's CPU causal path gives NaN
        # rows at scale <= 0.)
        out = F.scaled_dot_product_attention(q, keys, vals, is_causal=True, scale=scale, enable_gqa=H != Hkv)
        return out if can_read_values(q) else nan_query_rows(out, q, None)  # (eager: q is finite here)
    mask = _logit_mask(q, Hkv, Nk, M, causal, mem_bias)
    out = masked_attention(q, keys, vals, mask, scale)
    if not return_lse:
        return out
    return out, attention_lse(q, keys, mask, scale)


def masked_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(scale * q @ keys^T + mask) @ values, keys and values (B, Hkv, L, ·) shared by groups of query
    heads, in q's dtype; a row with no visible key gets 0. SDPA computes it, except when q or the keys hold
    NaN or inf: SDPA then departs from the math (torch's CPU flash op returns 0 for a row whose only visible
    logit is NaN or whose query is NaN, and NaN in every row over zero keys once any query is NaN), so the
    logits are formed and normalised here, as the kernels do. Traced graphs (no data to branch on) take SDPA
    and put NaN in the rows of NaN queries."""
    H, Hkv = q.shape[1], keys.shape[1]
    if not can_read_values(q):
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
        return nan_query_rows(out, q, mask, keys.shape[2])
    if _finite(q, keys):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
    logits = attention_logits(q, keys, mask, scale)
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    values = values.repeat_interleave(H // Hkv, dim=1) if H != Hkv else values
    return (weights @ values.to(weights.dtype)).to(q.dtype)


def _finite(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """True unless q or keys hold NaN or inf (one sum each; an overflow only takes the exact path). Traced
    graphs and meta or fake tensors have no data to read: True there, so they take SDPA."""
    if not can_read_values(q):
        return True
    return bool(torch.isfinite(q.sum() + keys.sum()))  # one host sync (inf + -inf is NaN: still caught)


def nan_query_rows(out: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None, num_keys: int = 1) -> torch.Tensor:
    """SDPA's out in a traced graph (no data to branch on, so :func:`masked_attention`'s exact path is out of
    reach), with NaN in the rows whose query has a NaN and sees at least one key, and 0 in the rows that see
    no key: torch's CPU flash SDPA returns 0 for the first (its row max is NaN) and the math path NaN for the
    second when the query is not finite, where the spec and the kernels give NaN and 0."""
    if out.shape[-2] == 0 or out.shape[-1] == 0 or num_keys == 0:
        return out
    nan_rows = torch.isnan(q).any(-1, keepdim=True)
    if mask is not None:
        sees_a_key = torch.isfinite(mask).any(-1, keepdim=True)
        out = out.masked_fill(~sees_a_key, 0.0)
        nan_rows = nan_rows & sees_a_key
    return out.masked_fill(nan_rows, float("nan"))


def attention_logits(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``scale * q @ keys^T + mask`` (B, H, N, L) in fp32 (fp64 for fp64), keys (B, Hkv, L, D) shared by
    groups of H // Hkv query heads; a masked logit is -inf."""
    H, Hkv = q.shape[1], keys.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    keys_per_head = keys.repeat_interleave(H // Hkv, dim=1) if H != Hkv else keys
    logits = torch.einsum("bhnd,bhkd->bhnk", q.to(acc), keys_per_head.to(acc)) * scale
    if mask is not None:
        # a masked logit is -inf whatever the scaled product (at scale inf, inf + -inf would be NaN)
        logits = torch.where(torch.isneginf(mask), float("-inf"), logits + mask.to(acc))
    return logits


def attention_lse(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """log-sum-exp over keys of ``scale * q @ keys^T + mask`` (B, H, N), fp32 (fp64 for fp64); keys
    (B, Hkv, L, D) are shared by groups of H // Hkv query heads. -inf for a row with no visible key.
    SDPA does not return it, so the reference recomputes the logits (the reference may materialise them)."""
    logits = attention_logits(q, keys, mask, scale)
    # A query with no visible key has lse -inf; keep its logsumexp backward from computing 0 * NaN.
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(logits.masked_fill(empty, 0.0), dim=-1)
    return lse.masked_fill(empty.squeeze(-1), float("-inf"))
