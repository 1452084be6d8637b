"""RetentionGate: TRIM-KV's per-token retention gate."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RetentionGate(nn.Module):
    """``log_beta = logsigmoid(W2 SiLU(W1 x + b1) + b2)``, one retention per KV head, for every token.

    x: (B, N, d_model), the normed attention input of the layer; returns log_beta (B, Hkv, N), each <= 0,
    ready for :func:`memops.retention_attention`, :func:`memops.capacity_loss` and
    :class:`memops.RetentionKVCache`. ``bias_init`` (TRIM-KV: 8-10) starts every token near full
    retention (beta = sigmoid(8) = 0.9997), so the frozen model's attention is barely changed at first.

    State dict keys: ``up.weight`` (hidden, d_model), ``up.bias``, ``down.weight`` (n_kv_heads, hidden),
    ``down.bias`` (n_kv_heads,).
    """

    def __init__(self, d_model: int, n_kv_heads: int, hidden: int = 512, bias_init: float = 8.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.up = nn.Linear(d_model, hidden, **factory)
        self.down = nn.Linear(hidden, n_kv_heads, **factory)
        nn.init.constant_(self.down.bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.down(F.silu(self.up(x)))).transpose(-1, -2)
