"""Pure-PyTorch definition of the TRIM-KV retention ops: the spec of ``memops.retention_attention``,
``memops.retention_capacity`` and the cache's eviction rule, and their CPU path.

TRIM-KV ("Cache What Lasts: Token Retention for Memory-Bounded KV Cache in LLMs") gives every token j a
learned retention log_beta[j] = log(beta_j) <= 0 per KV head; its weight decays as beta_j ** (t - j).

    retention attention   logit[i, j] = scale * q_i . k_j + (pos_i - j) * log_beta[j]   for j <= pos_i
                          (pos_i = i + Nk - N: causal, bottom-right aligned), softmax, @ v
    capacity              R[t] = sum_{j <= t} exp((t - j) * log_beta[j])
    capacity loss         mean over the positive entries of max(0, (R_t - M) / max(pos_t - M, 1))
    eviction              keep the top-`budget` tokens by log_beta[j] * (t + 1 - pos_j), in their order

Packed documents (``position_ids`` as transformers passes them, or FlashAttention's ``cu_seqlens``): every sum
over j and every visible key is restricted to the token's own document, and pos_t is the position within it.
With ``global_capacity`` (the official training default) the capacity is summed over all layers and KV heads
and compared with M x (their number), the positions scaled by the same factor.
"""

from __future__ import annotations

import torch

from memops.reference.attention import _expand_memory, attention_lse, masked_attention


def _distances(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """(N, Nk) query position minus key position, query i at position i + Nk - N."""
    query_positions = torch.arange(num_queries, device=device) + (num_keys - num_queries)
    return query_positions[:, None] - torch.arange(num_keys, device=device)[None, :]


def document_bounds(
    num_positions: int,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts, ends, positions), each (B, N) int64 (B = 1 for cu_seqlens or 1-D position_ids): the first
    index of each token's document, one past its last, and the token's position within it.

    position_ids (B, N) or (N,), the official TRIM-KV convention: a document starts at index 0 and wherever
    the position does not advance by 1; positions are position_ids. cu_seqlens (S + 1,), FlashAttention's:
    document s is [cu_seqlens[s], cu_seqlens[s + 1]), shared by every batch row; positions count from 0."""
    N = num_positions
    index = torch.arange(N, device=device)
    if position_ids is not None:
        position_ids = position_ids.reshape(-1, N).long()
        new_document = torch.ones_like(position_ids, dtype=torch.bool)
        new_document[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        starts = torch.where(new_document, index, 0).cummax(-1).values
        last_of_document = torch.ones_like(new_document)
        last_of_document[:, :-1] = new_document[:, 1:]
        ends = torch.where(last_of_document, index + 1, N).flip(-1).cummin(-1).values.flip(-1)
        return starts, ends, position_ids
    if cu_seqlens is None:
        raise ValueError("document_bounds: give position_ids or cu_seqlens")
    cu_seqlens = cu_seqlens.long()
    # the number of document ends at or before t is t's document (empty documents included)
    document = torch.searchsorted(cu_seqlens[1:], index, right=True).clamp(max=cu_seqlens.numel() - 2)
    starts = cu_seqlens[document]
    return starts[None], cu_seqlens[document + 1][None], (index - starts)[None]


def _outside_document(starts: torch.Tensor, query_index: torch.Tensor, num_keys: int, lead: int) -> torch.Tensor:
    """(B, 1 x lead, Nq, Nk) True where key j lies before the document start of the query at key index
    query_index[i] (clamped into range: a query before every key sees nothing anyway)."""
    query_starts = starts[:, query_index.clamp(min=0, max=num_keys - 1)]  # (B, Nq)
    outside = torch.arange(num_keys, device=starts.device) < query_starts[..., None]  # (B, Nq, Nk)
    return outside.reshape(outside.shape[0], *([1] * lead), *outside.shape[1:])


def finite_log_beta(log_beta: torch.Tensor) -> torch.Tensor:
    """log_beta with -inf (beta = 0) as -1e30, so that distance 0 gives 0 * -1e30 = 0 (beta**0 = 1, where
    0 * -inf would be NaN) and any distance >= 1 a weight exp(<= -1e30) = 0. NaN stays NaN, so it propagates."""
    return log_beta.clamp(min=-1e30)


def retention_bias(
    log_beta: torch.Tensor, num_queries: int, heads: int, document_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """The additive (B, H, N, Nk) logit mask of retention attention: (pos_i - j) * log_beta[j] where key j is
    visible to query i, -inf elsewhere. log_beta (B, Hkv, Nk) is shared by the H // Hkv heads of a group;
    document_starts (B|1, Nk) (from :func:`document_bounds`) hides keys of earlier documents."""
    num_keys = log_beta.shape[-1]
    distance = _distances(num_queries, num_keys, log_beta.device)
    # beta = 0 (log_beta = -inf) as -1e30: a key's own position decays by beta**0 = 1 (0 * -inf is NaN); NaN stays
    bias = distance.to(log_beta.dtype) * finite_log_beta(log_beta).unsqueeze(-2)  # (B, Hkv, N, Nk)
    bias = bias.masked_fill(distance < 0, float("-inf"))
    if document_starts is not None:
        query_index = torch.arange(num_queries, device=log_beta.device) + (num_keys - num_queries)
        bias = bias.masked_fill(_outside_document(document_starts, query_index, num_keys, 1), float("-inf"))
    return bias.repeat_interleave(heads // log_beta.shape[1], dim=1) if heads != log_beta.shape[1] else bias


def retention_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor, *,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False,
    position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
):  # fmt: skip
    """Causal attention with TRIM-KV's retention decay. q (B, H, N, D); k, v (B, Hkv, Nk, D); log_beta
    (B, Hkv, Nk); optional memory rows mem_k, mem_v ((B, Hkv, M, D) or batch-shared (Hkv, M, D)), visible to
    every query with no decay. position_ids (B, Nk) or cu_seqlens (S + 1,) split the keys into packed
    documents (see :func:`document_bounds`): a query sees only its own document's keys. Returns out (B, H, N, D)
    in q.dtype (a query with no visible key gets zeros), and lse (B, H, N) fp32 (fp64 for fp64) with return_lse.
    With log_beta = 0 it is plain causal attention (over [memory ; sequence])."""
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    # The bias reaches (distance x log_beta) ~ -30 and beyond at long range: 16-bit inputs are computed in
    # fp32, where a bf16 mask would round it by whole units of logit.
    acc = torch.promote_types(q.dtype, torch.float32)
    starts = None
    if position_ids is not None or cu_seqlens is not None:
        starts = document_bounds(k.shape[2], position_ids=position_ids, cu_seqlens=cu_seqlens, device=q.device)[0]
    mask = retention_bias(log_beta.to(acc), N, H, starts)
    keys, values = k, v
    if mem_k is not None and mem_k.shape[-2]:
        keys = torch.cat([_expand_memory(mem_k, B), k], dim=2)
        values = torch.cat([_expand_memory(mem_v, B), v], dim=2)
        mask = torch.cat(
            [mask.new_zeros(*mask.shape[:3], mem_k.shape[-2]).expand(B, H, -1, -1), mask.expand(B, H, -1, -1)], -1
        )
    # A row with no visible key (N > Nk, no memory) is all -inf: it gets zeros, which is the spec.
    out = masked_attention(q.to(acc), keys.to(acc), values.to(acc), mask, scale).to(q.dtype)
    if not return_lse:
        return out
    return out, attention_lse(q, keys, mask, scale)


def retention_capacity(
    log_beta: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """R[..., t] = sum_{j <= t} exp((t - j) * log_beta[..., j]): (..., N) -> (..., N) in fp32 (fp64 for fp64),
    j restricted to t's document when position_ids (B, N) or cu_seqlens are given (batch dim first).
    Materialises the (N, N) terms: the spec, and the baseline the kernel is measured against."""
    acc = torch.promote_types(log_beta.dtype, torch.float32)
    N = log_beta.shape[-1]
    distance = _distances(N, N, log_beta.device)  # (t, j)
    # the token's own term is exp(0) = 1, also for log_beta = -inf (see finite_log_beta)
    exponent = distance.to(acc) * finite_log_beta(log_beta.to(acc)).unsqueeze(-2)
    exponent = exponent.masked_fill(distance < 0, float("-inf"))
    if position_ids is not None or cu_seqlens is not None:
        starts = document_bounds(N, position_ids=position_ids, cu_seqlens=cu_seqlens, device=log_beta.device)[0]
        outside = _outside_document(starts, torch.arange(N, device=log_beta.device), N, max(log_beta.dim() - 2, 0))
        exponent = exponent.masked_fill(outside[0] if log_beta.dim() == 1 else outside, float("-inf"))
    return exponent.exp().sum(-1)


def capacity_loss_from(
    capacity: torch.Tensor, budget: float, *, positions: torch.Tensor | None = None, global_capacity: bool = False
) -> torch.Tensor:
    """TRIM-KV's capacity loss: the mean over the positive entries of max(0, (R_t - M) / max(pos_t - M, 1)),
    0 when none is positive. capacity (B, ..., N) from :func:`retention_capacity`, budget M, positions
    (B|1, N) (default t = 0..N-1). global_capacity: R_t is first summed over every dim between the batch and
    N (layers and KV heads, f of them), and M and pos_t are scaled by f."""
    N = capacity.shape[-1]
    if positions is None:
        positions = torch.arange(N, device=capacity.device)[None]
    positions = positions.to(capacity.dtype)
    if capacity.dim() == 1:
        capacity = capacity[None]
    if global_capacity:
        factor = capacity[0].numel() // N
        capacity = capacity.reshape(capacity.shape[0], -1, N).sum(1)
        budget, positions = budget * factor, positions * factor
    else:
        positions = positions.reshape(positions.shape[0], *([1] * (capacity.dim() - 2)), N)
    excess = torch.relu((capacity - budget) / torch.clamp(positions - budget, min=1.0))
    # sum / count rather than boolean indexing: no data-dependent shape, so torch.compile keeps one graph.
    return excess.sum() / (excess > 0).sum().clamp(min=1)


def capacity_loss(
    log_beta: torch.Tensor, budget: float, *, global_capacity: bool = False,
    position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Scalar capacity loss of log_beta (B, Hkv, N), or all layers' (B, L, Hkv, N), for a KV budget M (see
    :func:`capacity_loss_from`), per packed document with position_ids or cu_seqlens."""
    positions = None
    if position_ids is not None or cu_seqlens is not None:
        positions = document_bounds(
            log_beta.shape[-1], position_ids=position_ids, cu_seqlens=cu_seqlens, device=log_beta.device
        )[2]
    capacity = retention_capacity(log_beta, position_ids=position_ids, cu_seqlens=cu_seqlens)
    return capacity_loss_from(capacity, budget, positions=positions, global_capacity=global_capacity)


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
