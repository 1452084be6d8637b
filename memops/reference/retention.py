"""Pure-PyTorch definition of the TRIM-KV retention ops: the spec of ``memops.retention_attention``,
``memops.retention_capacity`` and the cache's eviction rule, and their CPU path.

TRIM-KV ("Cache What Lasts: Token Retention for Memory-Bounded KV Cache in LLMs") gives every token j a
learned retention log_beta[j] = log(beta_j) <= 0 per KV head; its weight decays as beta_j ** (t - j).

    retention attention   logit[i, j] = scale * q_i . k_j + (pos_i - j) * log_beta[j]   for j <= pos_i
                          (pos_i = i + Nk - N: causal, bottom-right aligned), softmax, @ v
    capacity              R[t] = sum_{j <= t} exp((t - j) * log_beta[j])
    eviction              keep the top-`budget` tokens by log_beta[j] * (t + 1 - pos_j), in their order
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memops.reference.attention import _expand_memory, attention_lse


def _distances(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """(N, Nk) query position minus key position, query i at position i + Nk - N."""
    query_positions = torch.arange(num_queries, device=device) + (num_keys - num_queries)
    return query_positions[:, None] - torch.arange(num_keys, device=device)[None, :]


def retention_bias(log_beta: torch.Tensor, num_queries: int, heads: int) -> torch.Tensor:
    """The additive (B, H, N, Nk) logit mask of retention attention: (pos_i - j) * log_beta[j] where key j is
    visible to query i, -inf elsewhere. log_beta (B, Hkv, Nk) is shared by the H // Hkv heads of a group."""
    distance = _distances(num_queries, log_beta.shape[-1], log_beta.device)
    bias = distance.to(log_beta.dtype) * log_beta.unsqueeze(-2)               # (B, Hkv, N, Nk)
    bias = bias.masked_fill(distance < 0, float("-inf"))
    return bias.repeat_interleave(heads // log_beta.shape[1], dim=1) if heads != log_beta.shape[1] else bias


def retention_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor, *,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False,
):
    """Causal attention with TRIM-KV's retention decay. q (B, H, N, D); k, v (B, Hkv, Nk, D); log_beta
    (B, Hkv, Nk); optional memory rows mem_k, mem_v ((B, Hkv, M, D) or batch-shared (Hkv, M, D)), visible to
    every query with no decay. Returns out (B, H, N, D) in q.dtype (a query with no visible key gets
    zeros), and lse (B, H, N) fp32 (fp64 for fp64) with return_lse. With log_beta = 0 it is plain causal
    attention (over [memory ; sequence])."""
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    # The bias reaches (distance x log_beta) ~ -30 and beyond at long range: 16-bit inputs are computed in
    # fp32, where a bf16 mask would round it by whole units of logit.
    acc = torch.promote_types(q.dtype, torch.float32)
    mask = retention_bias(log_beta.to(acc), N, H)
    keys, values = k, v
    if mem_k is not None and mem_k.shape[-2]:
        keys = torch.cat([_expand_memory(mem_k, B), k], dim=2)
        values = torch.cat([_expand_memory(mem_v, B), v], dim=2)
        mask = torch.cat([mask.new_zeros(*mask.shape[:3], mem_k.shape[-2]).expand(B, H, -1, -1), mask.expand(B, H, -1, -1)], -1)
    # A row with no visible key (N > Nk, no memory) would be all -inf; SDPA gives it zeros, which is the spec.
    out = F.scaled_dot_product_attention(q.to(acc), keys.to(acc), values.to(acc), attn_mask=mask, scale=scale,
                                         enable_gqa=H != k.shape[1]).to(q.dtype)
    if not return_lse:
        return out
    return out, attention_lse(q, keys, mask, scale)


def retention_capacity(log_beta: torch.Tensor) -> torch.Tensor:
    """R[..., t] = sum_{j <= t} exp((t - j) * log_beta[..., j]): (..., N) -> (..., N) in fp32 (fp64 for fp64).
    Materialises the (N, N) terms: the spec, and the baseline the kernel is measured against."""
    acc = torch.promote_types(log_beta.dtype, torch.float32)
    N = log_beta.shape[-1]
    distance = _distances(N, N, log_beta.device)                              # (t, j)
    exponent = (distance.to(acc) * log_beta.to(acc).unsqueeze(-2)).masked_fill(distance < 0, float("-inf"))
    return exponent.exp().sum(-1)


def capacity_loss_from(capacity: torch.Tensor, budget: float) -> torch.Tensor:
    """TRIM-KV's capacity loss: the mean over the positive entries of max(0, (R_t - M) / max(t - M, 1)), 0
    when none is positive. capacity (..., N) from :func:`retention_capacity`, budget M."""
    t = torch.arange(capacity.shape[-1], device=capacity.device, dtype=capacity.dtype)
    excess = torch.relu((capacity - budget) / torch.clamp(t - budget, min=1.0))
    # sum / count rather than boolean indexing: no data-dependent shape, so torch.compile keeps one graph.
    return excess.sum() / (excess > 0).sum().clamp(min=1)


def capacity_loss(log_beta: torch.Tensor, budget: float) -> torch.Tensor:
    """Scalar capacity loss of log_beta (B, Hkv, N) for a KV budget M (see :func:`capacity_loss_from`)."""
    return capacity_loss_from(retention_capacity(log_beta), budget)


def eviction_scores(log_beta: torch.Tensor, positions: torch.Tensor, newest_position: int) -> torch.Tensor:
    """log_beta[j] * (t + 1 - pos_j): the retention left to each cached token when the newest is at t."""
    return log_beta * (newest_position + 1 - positions).to(log_beta.dtype)


def retention_keep(log_beta: torch.Tensor, positions: torch.Tensor, newest_position: int, budget: int) -> torch.Tensor:
    """Which rows the cache keeps: indices (B, Hkv, budget) of the top-`budget` eviction scores along the
    last dim, in increasing order (the tokens keep their original order). Ties go to the older row."""
    scores = eviction_scores(log_beta.float(), positions, newest_position)
    # A stable descending sort ranks equal scores by position: older rows first.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :budget].sort(dim=-1).values
