"""Pure-PyTorch definition of the product-key memory ops: the spec the Triton kernels are tested against,
and the path users get on CPU. Differentiable by autograd; vectorised (no Python loop over tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _accumulator_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weighted_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * values[indices[t, k]]``, accumulated in fp32 (fp64 for fp64).

    values: (S, D) float. indices: (T, K) int32/int64 in [0, S). weights: (T, K) float.
    Returns (T, D) in values.dtype. Same as ``F.embedding_bag(indices, values, mode="sum",
    per_sample_weights=weights)`` when all are fp32/fp64 of one dtype.
    """
    acc = _accumulator_dtype(values, weights)
    if indices.numel() == 0 or values.shape[1] == 0:
        # An empty sum (K = 0 or T = 0) or empty rows (D = 0): zeros, still attached to both inputs' graphs
        # (embedding_bag rejects these shapes).
        zero = weights.sum(-1, keepdim=True).to(acc) * values[:0].sum(0).to(acc)  # (T, D)
        return zero.to(values.dtype)
    if values.dtype == acc:
        return F.embedding_bag(indices, values, per_sample_weights=weights.to(acc), mode="sum")
    # 16-bit tables: upcast only the rows that are read (a table can be GBs), then sum in fp32.
    rows, local_indices = torch.unique(indices, return_inverse=True)
    out = F.embedding_bag(local_indices, values[rows].to(acc), per_sample_weights=weights.to(acc), mode="sum")
    return out.to(values.dtype)


def weighted_gather_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_values (S, D) in values.dtype, grad_weights (T, K) in weights.dtype) of :func:`weighted_gather`.

    ``grad_weights[t, k] = <grad_out[t], values[indices[t, k]]>``;
    ``grad_values[s] = sum of weights[t, k] * grad_out[t] over the (t, k) with indices[t, k] = s``.
    """
    acc = _accumulator_dtype(values, weights, grad_out)
    T, K = indices.shape
    g = grad_out.to(acc)
    selected = values[indices].to(acc)  # (T, K, D)
    grad_weights = torch.bmm(selected, g.unsqueeze(-1)).squeeze(-1)
    contributions = (weights.to(acc).unsqueeze(-1) * g.unsqueeze(1)).reshape(T * K, -1)
    grad_values = torch.zeros(values.shape, dtype=acc, device=values.device)
    grad_values.index_add_(0, indices.reshape(-1), contributions)
    return grad_values.to(values.dtype), grad_weights.to(weights.dtype)


def product_key_topk(queries: torch.Tensor, sub_keys: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key search (Lample et al. 2019): the top-k of all n_keys**2 sums s1[i1] + s2[i2].

    queries: (..., Hm, Dk), Dk even. sub_keys: (Hm, 2, n_keys, Dk // 2): the two sub-key tables per head.
    Returns scores (..., Hm, topk) fp32 (fp64 for fp64) sorted descending and indices (..., Hm, topk) int64,
    index = i1 * n_keys + i2. Exact: a pair in the global top-k has each half in its own half's top-k, so
    the k x k candidates of the two per-half top-k lists contain it. Scores are differentiable w.r.t.
    queries and sub_keys (only the selected sub-key rows receive gradient); indices are not.
    """
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    acc = _accumulator_dtype(queries, sub_keys)
    q = queries.to(acc)
    keys = sub_keys.to(acc)
    s1 = torch.einsum("...hd,hnd->...hn", q[..., :half], keys[:, 0])  # (..., Hm, n_keys)
    s2 = torch.einsum("...hd,hnd->...hn", q[..., half:], keys[:, 1])
    top1, index1 = s1.topk(topk, dim=-1)
    top2, index2 = s2.topk(topk, dim=-1)
    candidates = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # (..., Hm, k*k)
    scores, best = candidates.topk(topk, dim=-1)
    # Slot indices only for the k winners, not all k*k candidates (a third of the CPU time otherwise).
    first, second = index1.gather(-1, best // topk), index2.gather(-1, best % topk)
    return scores, first * n_keys + second


def product_key_search_as_gather(
    queries: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor, grad_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`product_key_topk` is a weighted gather over the stacked sub-key tables.

    Score j of (t, h) is q1 . C1[i1_j] + q2 . C2[i2_j], so dq1 = sum_j dscore_j C1[i1_j] (a weighted gather
    of C1's rows) and dC1[i1_j] += dscore_j q1 (that gather's values grad, with q1 as the output grad).
    Bag (t, h, p) of the gather reads half p's table at the selected sub-key indices.

    queries (T, Hm, Dk), sub_keys (Hm, 2, n_keys, Dk // 2), indices and grad_scores (T, Hm, k).
    Returns the table (Hm * 2 * n_keys, Dk // 2), rows (T * Hm * 2, k), weights (T * Hm * 2, k) and the
    bags' output grad (T * Hm * 2, Dk // 2), all contiguous.
    """
    T, heads, _ = queries.shape
    n_keys, half_dim = sub_keys.shape[2], sub_keys.shape[3]
    topk = indices.shape[-1]
    table_base = torch.arange(heads, device=indices.device).view(1, heads, 1) * (2 * n_keys)
    rows = torch.stack((table_base + indices // n_keys, table_base + n_keys + indices % n_keys), dim=2)
    weights = grad_scores.unsqueeze(2).expand(T, heads, 2, topk)
    return (
        sub_keys.reshape(heads * 2 * n_keys, half_dim),
        rows.reshape(T * heads * 2, topk),
        weights.reshape(T * heads * 2, topk).contiguous(),
        queries.reshape(T * heads * 2, half_dim).contiguous(),
    )


def product_key_topk_backward(
    grad_scores: torch.Tensor, queries: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_queries (T, Hm, Dk), grad_sub_keys (Hm, 2, n_keys, Dk // 2)) of :func:`product_key_topk`'s
    scores, for (T, Hm, k) grad_scores and the indices it returned; only selected sub-key rows get grad."""
    table, rows, weights, bags = product_key_search_as_gather(queries, sub_keys, indices, grad_scores)
    grad_queries = weighted_gather(table, rows, weights).reshape(queries.shape).to(queries.dtype)
    grad_sub_keys, _ = weighted_gather_backward(bags, table, rows, weights)
    return grad_queries, grad_sub_keys.reshape(sub_keys.shape)
