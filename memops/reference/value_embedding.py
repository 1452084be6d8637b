"""Token-indexed value memory: the definition of memops.value_embedding_mix, and its CPU path.

MoVE (Mixture of Value Embeddings, Li, arXiv 2601.22887): one bank E (V, M, H * Dh) of learnable value
embeddings indexed by token id, M slots per id, shared by every attention layer. At a layer, token t with id
x_t, values v (H, Dh) and gates g (H, M + 1) (the layer's router output, already activated: MoVE's
2 * sigmoid(W_G h_t)) gets, per head h,

    v'[t, h, :] = g[t, h, 0] * v[t, h, :] + sum_{i=1..M} g[t, h, i] * E[x_t, i - 1, h * Dh : (h + 1) * Dh]

The bank's last dim is head-major (column h * Dh + j is head h's channel j, as v's (H, Dh) flattened).
Layer-wise value embeddings (modded-nanogpt, nanochat; "LaVE") are a per-layer bank with M = 1.

Gradients (dv' the output gradient):

    dv[t, h]        = g[t, h, 0] * dv'[t, h]
    dg[t, h, 0]     = <v[t, h], dv'[t, h]>
    dg[t, h, i]     = <E[x_t, i - 1, h], dv'[t, h]>
    dE[x, i - 1, h] = sum_{t: x_t = x} g[t, h, i] * dv'[t, h]      (every layer's calls add into the same rows)

All accumulation in fp32 (fp64 when an input is fp64); the output in v's dtype.
"""

from __future__ import annotations

import torch


def _accumulator(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def value_embedding_mix(v: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """v (B, N, H, Dh), gates (B, N, H, M + 1), ids (B, N) int in [0, V), bank (V, M, H * Dh) -> (B, N, H, Dh)
    in v.dtype. Differentiable in v, gates and bank (autograd through the gather and the einsum)."""
    return mix_slots(v, gates, bank[ids], _accumulator(v, gates, bank))


def mix_slots(v: torch.Tensor, gates: torch.Tensor, slots: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The mix given every token's M slot rows ``slots`` (B, N, M, H * Dh), accumulated in ``acc``."""
    B, N, H, Dh = v.shape
    M = slots.shape[2]
    rows = slots.to(acc).view(B, N, M, H, Dh)
    g = gates.to(acc)
    mixed = g[..., 0:1] * v.to(acc) + torch.einsum("bnhm,bnmhd->bnhd", g[..., 1:], rows)
    return mixed.to(v.dtype)
