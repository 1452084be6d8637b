"""Token-indexed value memory as modules: MoVE's shared bank and its per-layer router (the math:
memops/reference/value_embedding.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from memops._validation import check_bool, check_int, check_module_input
from memops.nn.quantized import QuantizedEmbedding
from memops.quantized import QuantizedTable, quantize_table
from memops.value_embedding import value_embedding_mix


class ValueEmbeddingBank(nn.Module):
    """MoVE's global bank of value embeddings: ``weight`` (vocab_size, slots, n_heads * head_dim), M = slots
    rows of one value vector per head for every token id, shared by every attention layer that calls it.

    ``forward(v, gates, ids)`` mixes the bank into a layer's values: :func:`memops.value_embedding_mix` with
    ``weight`` as the bank (v (B, N, H, Dh), gates (B, N, H, M + 1) from that layer's :class:`MoVEGate`, ids
    (B, N)). Autograd sums the bank's grad over the layers. A per-layer bank with ``slots=1`` is the layer-wise
    value embedding (LaVE) of modded-nanogpt and nanochat.

    Initialisation: MoVE releases no code; the bank starts as nanochat's value embeddings (the paper's LaVE
    baseline) do, uniform in [-s, s] with s = sqrt(3 / (n_heads * head_dim)) (unit variance per channel
    after a value projection's 1 / d scale).

    ``sparse=True``: the bank gets a ``torch.sparse_coo`` gradient for the row-sparse optimizers of
    ``memops.optim`` (a bank given to ``memops.optim.apply_optimizer_in_backward`` is updated in the backward
    either way).

    ``quantize_()`` stores the bank in 8 bits for inference (``weight`` becomes a
    :class:`memops.nn.QuantizedEmbedding` of its (vocab_size, slots * n_heads * head_dim) view).
    """

    def __init__(
        self, vocab_size: int, slots: int, n_heads: int, head_dim: int, *, sparse: bool = False, device=None,
        dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        op = "ValueEmbeddingBank"
        self.sparse = check_bool(sparse, "sparse", op)
        for name, value in (("vocab_size", vocab_size), ("slots", slots), ("n_heads", n_heads),
                            ("head_dim", head_dim)):  # fmt: skip
            check_int(value, name, op, low=1)
        self.vocab_size, self.slots, self.n_heads, self.head_dim = vocab_size, slots, n_heads, head_dim
        self.weight = nn.Parameter(torch.empty(vocab_size, slots, n_heads * head_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(3.0 / (self.n_heads * self.head_dim))
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def table(self) -> torch.Tensor | QuantizedTable:
        """What the mix reads: ``weight`` (V, M, H * Dh), or its 8-bit (V, M * H * Dh) table once quantized."""
        return self.weight.table if isinstance(self.weight, QuantizedEmbedding) else self.weight

    def quantize_(
        self, *, dtype: torch.dtype = torch.float8_e4m3fn, block_size: int | None = 128, scale_format: str = "e8m0"
    ) -> ValueEmbeddingBank:
        """For inference: store the bank in 8 bits (:func:`memops.quantize_table`'s arguments, over the
        (vocab_size, slots * n_heads * head_dim) view; ``block_size`` must divide head_dim, or None for one scale
        per row), read by the mix kernel as it is. ``weight`` becomes a :class:`memops.nn.QuantizedEmbedding`
        (state-dict keys ``weight.data``, ``weight.scales``). Returns the module; v' keeps v's dtype."""
        if self.sparse:
            raise ValueError(
                "ValueEmbeddingBank.quantize_: a sparse=True bank trains; quantized tables are for inference"
            )
        if isinstance(self.weight, QuantizedEmbedding):
            raise ValueError("ValueEmbeddingBank.quantize_: the bank is already quantized")
        valid = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1
        if valid and self.head_dim % block_size:  # (other bad values: quantize_table's error)
            raise ValueError(
                f"ValueEmbeddingBank.quantize_: block_size={block_size} must divide head_dim={self.head_dim} (each "
                "head's slice takes whole blocks), or be None (one scale per row)"
            )
        qt = quantize_table(self.weight.detach().flatten(1), dtype=dtype, block_size=block_size,
                            scale_format=scale_format)  # fmt: skip
        del self.weight
        self.weight = QuantizedEmbedding(qt)
        return self

    def forward(self, v: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, *, check_ids: bool = True):
        """v (B, N, H, Dh), gates (B, N, H, M + 1), ids (B, N) -> v' (B, N, H, Dh) in v.dtype."""
        return value_embedding_mix(v, gates, ids, self.table, check_ids=check_ids, sparse=self.sparse)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, slots={self.slots}, n_heads={self.n_heads}, head_dim={self.head_dim}"


class MoVEGate(nn.Module):
    """One layer's MoVE router: ``gates = 2 * sigmoid(W_G h)`` reshaped to (..., n_heads, slots + 1), gate 0
    for the layer's own values and gate i for bank slot i - 1 (every gate lies in (0, 2)).

    ``proj`` (Linear(hidden_size, n_heads * (slots + 1)), no bias) is zero-initialised, so every gate starts
    at 1: the layer begins as v plus the plain sum of its token's slots.
    """

    def __init__(self, hidden_size: int, n_heads: int, slots: int, *, device=None, dtype=None):
        super().__init__()
        op = "MoVEGate"
        for name, value in (("hidden_size", hidden_size), ("n_heads", n_heads), ("slots", slots)):
            check_int(value, name, op, low=1)
        self.n_heads, self.slots = n_heads, slots
        self.proj = nn.Linear(hidden_size, n_heads * (slots + 1), bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., hidden_size) -> gates (..., n_heads, slots + 1) in h's dtype."""
        check_module_input(h, "h", "MoVEGate", width=self.proj.in_features, like=self.proj.weight)
        return (2 * torch.sigmoid(self.proj(h))).unflatten(-1, (self.n_heads, self.slots + 1))
