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
    selected = values[indices].to(acc)                                    # (T, K, D)
    grad_weights = torch.bmm(selected, g.unsqueeze(-1)).squeeze(-1)
    contributions = (weights.to(acc).unsqueeze(-1) * g.unsqueeze(1)).reshape(T * K, -1)
    grad_values = torch.zeros(values.shape, dtype=acc, device=values.device)
    grad_values.index_add_(0, indices.reshape(-1), contributions)
    return grad_values.to(values.dtype), grad_weights.to(weights.dtype)
