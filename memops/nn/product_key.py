"""ProductKeyMemory: the product-key memory layer of Lample et al. (2019) and Meta's Memory Layers at Scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memops._validation import check_bool, check_int, check_module_input
from memops.nn.quantized import QuantizedEmbedding
from memops.product_key import product_key_topk, weighted_gather
from memops.quantized import quantize_table

QUERY_NORMS = ("batchnorm", "layernorm", "layernorm_per_half", None)
KEY_INITS = ("xlm", "meta")
SCORE_SUBTRACTS = ("min", "mean", "median", None)


class ProductKeyMemory(nn.Module):
    """A product-key memory layer: ``memops.product_key_topk`` search, softmax, ``memops.weighted_gather`` read.

    Per token x (input_dim) and memory head h::

        q_h            = norm(W_q x + b_q)[h]                       (key_dim)
        scores, slots  = top-k over the n_keys**2 slots of q_h1 . C1_h[i1] + q_h2 . C2_h[i2]
        w              = softmax(scores / temperature)              (XLM's re-scoring options below)
        y              = sum_h sum_j w_j * V[slot_j]                (value_dim; heads summed, one table)
        out            = y                      (value_dim == output_dim, not gated; XLM)
                       = W_o y + b_o             (value_dim != output_dim)
                       = W_o (y * SiLU(W_s x + b_s)) + b_o   (gated=True: Meta's Memory+ SwiLU projection)
        out            = sigmoid(w_g . x + b_g) * out        (output_gate=True: Meta's ``mem_gated``)

    Works on (..., input_dim) inputs, e.g. (B, N, input_dim) or (T, input_dim). The softmax is in fp32.
    Sub-keys are cast to the query's dtype (so autocast works); the value table keeps its own dtype.

    State dict keys: ``query_proj.weight`` (key_dim * heads, input_dim), ``query_proj.bias``; with
    ``query_norm="batchnorm"``: ``query_norm.{weight,bias,running_mean,running_var,num_batches_tracked}``
    over the heads * key_dim query features (XLM's QueryMLP); with "layernorm": ``query_norm.{weight,bias}``
    over each head's key_dim; with "layernorm_per_half": ``query_norm.{weight,bias}`` over key_dim // 2;
    ``sub_keys`` (heads, 2, n_keys, key_dim // 2); ``values.weight``
    (n_keys**2, value_dim); with ``gated``: ``gate_proj.{weight,bias}`` (value_dim, input_dim); with
    ``gated`` or value_dim != output_dim: ``out_proj.{weight,bias}`` (output_dim, value_dim); with
    ``output_gate``: ``output_gate.{weight,bias}`` (1, input_dim) (Meta's ``gating``).

    Args:
        input_dim, output_dim: feature sizes of the input and the output.
        n_keys: sub-keys per half; the value table has n_keys**2 rows.
        heads: memory heads, each with its own query and sub-keys; all read the one value table.
        topk: slots read per head and token (k). key_dim: query size per head (even).
        value_dim: width of the value table; default output_dim (or the shared table's width).
        query_norm: "batchnorm" (XLM's QueryMLP: BatchNorm1d over all heads * key_dim features),
            "layernorm" (one LayerNorm over each head's whole key_dim query), "layernorm_per_half" (one
            LayerNorm over key_dim // 2, applied to each half of each head's query separately: lucidrains'
            product-key-memory) or None (Memory Layers at Scale).
        gated: Memory+ output ``W_o(y * SiLU(W_s x))``.
        output_gate: Meta's ``mem_gated``: the output times sigmoid(w . x + b), one scalar per token (w
            initialised N(0, 1 / input_dim) as there).
        key_init: "xlm" draws the sub-keys U(+-1 / sqrt(key_dim / 2)) (XLM's uniform keys, the size of
            each half); "meta" U(+-1 / sqrt(key_dim)) (lingua's product_key memory).
        temperature: the scores are divided by it before the softmax (XLM's ``mem_temperature``).
        score_softmax, score_subtract, score_normalize: XLM's re-scoring after the temperature: softmax
            (default, as XLM), then optionally subtract the row's "min", "mean" or "median", then optionally
            divide by the row's L1 norm. XLM's rule holds: normalize with softmax needs a subtract.
        normalize_query: divide each half of each head's query by its L2 norm before the search (XLM's
            ``mem_normalize_query``).
        input_dropout, query_dropout, value_dropout: dropout on the input (feeding the query and the gates),
            on the queries after their norm, and on the layer's output before the output gate (XLM, Meta).
        shared_values: another ProductKeyMemory (or an nn.Embedding of n_keys**2 rows) whose value table
            this layer reads and trains too: Memory Layers at Scale shares one table across layers.
        sparse: the value table gets a ``torch.sparse_coo`` gradient (``weighted_gather(sparse=True)``, as
            ``nn.Embedding(sparse=True)``) for the row-sparse optimizers of ``memops.optim``.

    After each forward, ``last_indices`` holds the (T, heads, topk) slots it read (a reference, no copy);
    :meth:`slot_usage` turns them into routing statistics when asked.
    """

    def __init__(
        self, input_dim: int, output_dim: int, *, n_keys: int = 512, heads: int = 4, topk: int = 32,
        key_dim: int = 256, value_dim: int | None = None, query_norm: str | None = "batchnorm", gated: bool = False,
        shared_values: ProductKeyMemory | nn.Embedding | None = None, output_gate: bool = False,
        key_init: str = "xlm", temperature: float = 1.0, score_softmax: bool = True,
        score_subtract: str | None = None, score_normalize: bool = False, normalize_query: bool = False,
        input_dropout: float = 0.0, query_dropout: float = 0.0, value_dropout: float = 0.0, sparse: bool = False,
        device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        for name, value in (
            ("input_dim", input_dim),
            ("output_dim", output_dim),
            ("n_keys", n_keys),
            ("heads", heads),
            ("topk", topk),
            ("key_dim", key_dim),
        ):
            check_int(value, name, "ProductKeyMemory", low=1)
        if key_dim % 2:
            raise ValueError(f"ProductKeyMemory: key_dim must be even (two halves), got {key_dim}")
        if not 1 <= topk <= n_keys:
            raise ValueError(f"ProductKeyMemory: topk must be in [1, n_keys={n_keys}], got {topk}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"ProductKeyMemory: query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        if key_init not in KEY_INITS:
            raise ValueError(f"ProductKeyMemory: key_init must be one of {KEY_INITS}, got {key_init!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"ProductKeyMemory: temperature must be a number > 0, got {temperature!r}")
        if score_subtract not in SCORE_SUBTRACTS:
            raise ValueError(
                f"ProductKeyMemory: score_subtract must be one of {SCORE_SUBTRACTS}, got {score_subtract!r}"
            )
        if score_subtract is not None and topk < 2:
            raise ValueError("ProductKeyMemory: score_subtract needs topk >= 2 (it would zero every weight)")
        if score_normalize and score_softmax and score_subtract is None:
            raise ValueError(
                "ProductKeyMemory: score_normalize after a softmax changes nothing without a "
                "score_subtract (XLM rejects it too)"
            )
        for name, p in (
            ("input_dropout", input_dropout),
            ("query_dropout", query_dropout),
            ("value_dropout", value_dropout),
        ):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"ProductKeyMemory: {name} must be in [0, 1), got {p!r}")
        factory = {"device": device, "dtype": dtype}
        self.n_keys, self.heads, self.topk, self.key_dim = n_keys, heads, topk, key_dim
        self.query_proj = nn.Linear(input_dim, heads * key_dim, **factory)
        if query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(heads * key_dim, **factory)
        elif query_norm == "layernorm":
            self.query_norm = nn.LayerNorm(key_dim, **factory)
        elif query_norm == "layernorm_per_half":
            self.query_norm = nn.LayerNorm(key_dim // 2, **factory)
        else:
            self.query_norm = None
        self.query_norm_kind, self.key_init = query_norm, key_init
        self.temperature, self.score_softmax = float(temperature), score_softmax
        self.score_subtract, self.score_normalize, self.normalize_query = (
            score_subtract,
            score_normalize,
            normalize_query,
        )
        self.input_dropout, self.query_dropout, self.value_dropout = input_dropout, query_dropout, value_dropout
        self.sparse = check_bool(sparse, "sparse", "ProductKeyMemory")
        # XLM: uniform in +-1/sqrt(key_dim / 2), the size of each half; Meta's lingua: +-1/sqrt(key_dim).
        bound = (key_dim // 2 if key_init == "xlm" else key_dim) ** -0.5
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim // 2, **factory).uniform_(-bound, bound))
        if shared_values is not None:
            self.values = self._shared_table(shared_values, n_keys, value_dim)
            value_dim = self.values.embedding_dim
        else:
            value_dim = output_dim if value_dim is None else value_dim
            self.values = nn.Embedding(n_keys * n_keys, value_dim, **factory)
            nn.init.normal_(self.values.weight, std=value_dim**-0.5)
        self.value_dim, self.gated = value_dim, gated
        self.gate_proj = nn.Linear(input_dim, value_dim, **factory) if gated else None
        self.out_proj = nn.Linear(value_dim, output_dim, **factory) if gated or value_dim != output_dim else None
        self.output_gate = nn.Linear(input_dim, 1, **factory) if output_gate else None
        if output_gate:
            nn.init.normal_(self.output_gate.weight, std=input_dim**-0.5)
        self.last_indices: torch.Tensor | None = None

    @staticmethod
    def _shared_table(shared, n_keys: int, value_dim: int | None) -> nn.Embedding:
        table = shared.values if isinstance(shared, ProductKeyMemory) else shared
        if not isinstance(table, nn.Embedding):
            raise TypeError(
                "ProductKeyMemory: shared_values must be a ProductKeyMemory or an nn.Embedding, "
                f"got {type(shared).__name__}"
            )
        if table.num_embeddings != n_keys * n_keys or (value_dim is not None and table.embedding_dim != value_dim):
            raise ValueError(
                f"ProductKeyMemory: shared_values must have (n_keys**2={n_keys * n_keys}, "
                f"value_dim={value_dim if value_dim is not None else 'any'}) rows, got "
                f"({table.num_embeddings}, {table.embedding_dim})"
            )
        return table

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(T, input_dim) -> (T, heads, key_dim) search queries (norm, query dropout, normalize_query)."""
        q = self.query_proj(x)
        if self.query_norm_kind == "batchnorm":
            q = self.query_norm(q)
        q = q.view(x.shape[0], self.heads, self.key_dim)
        if self.query_norm_kind == "layernorm":
            q = self.query_norm(q)
        elif self.query_norm_kind == "layernorm_per_half":
            q = self.query_norm(q.view(x.shape[0], self.heads, 2, self.key_dim // 2)).view_as(q)
        q = F.dropout(q, self.query_dropout, self.training)
        if self.normalize_query:  # each half on its own, as XLM (the search splits q into halves)
            halves = q.view(x.shape[0], self.heads, 2, self.key_dim // 2)
            q = (halves / halves.norm(dim=-1, keepdim=True)).view_as(q)
        return q

    def read_weights(self, scores: torch.Tensor) -> torch.Tensor:
        """The (T, heads, topk) read weights from the search scores, in fp32 (fp64 for fp64): temperature,
        then XLM's re-scoring (softmax by default)."""
        weights = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if self.temperature != 1.0:
            weights = weights / self.temperature
        if self.score_softmax:
            weights = torch.softmax(weights, dim=-1)
        if self.score_subtract == "min":
            weights = weights - weights.min(-1, keepdim=True).values
        elif self.score_subtract == "mean":
            weights = weights - weights.mean(-1, keepdim=True)
        elif self.score_subtract == "median":
            weights = weights - weights.median(-1, keepdim=True).values
        if self.score_normalize:
            weights = weights / weights.norm(p=1, dim=-1, keepdim=True)
        return weights

    def search(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, input_dim) -> read weights (T, heads, topk) fp32 and slots (T, heads, topk) int64."""
        q = self.queries(flat)
        scores, indices = product_key_topk(q, self.sub_keys.to(q.dtype), self.topk)
        self.last_indices = indices
        return self.read_weights(scores), indices

    def output(self, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The layer's output from the value read y (T, value_dim) and its input flat (T, input_dim): SwiLU
        gate, output projection, value dropout, output gate (Meta's order)."""
        if self.gated:
            y = y * F.silu(self.gate_proj(flat))
        if self.out_proj is not None:
            y = self.out_proj(y)
        y = F.dropout(y, self.value_dropout, self.training)
        if self.output_gate is not None:
            y = torch.sigmoid(self.output_gate(flat)).to(y.dtype) * y
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        check_module_input(x, "x", "ProductKeyMemory", width=self.query_proj.in_features, like=self.query_proj.weight)
        flat = F.dropout(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), self.input_dropout, self.training)
        weights, indices = self.search(flat)
        T = flat.shape[0]
        # The search only returns slots in [0, n_keys**2): no range check (and no host sync) needed.
        y = weighted_gather(
            self.table,
            indices.view(T, self.heads * self.topk),
            weights.view(T, self.heads * self.topk),
            check_indices=False,
            sparse=self.sparse,
        )
        out = self.output(y, flat)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @property
    def table(self):
        """What the gather reads: the value table's weight, or its 8-bit table once quantized."""
        return self.values.table if isinstance(self.values, QuantizedEmbedding) else self.values.weight

    @torch.no_grad()
    def quantize_(
        self, *, dtype: torch.dtype = torch.float8_e4m3fn, block_size: int | None = 128, scale_format: str = "e8m0"
    ) -> ProductKeyMemory:
        """For inference: store the value table in 8 bits (:func:`memops.quantize_table`'s arguments), read by
        the gather kernel as it is; ``values`` becomes a :class:`memops.nn.QuantizedEmbedding` (state-dict keys
        ``values.data``, ``values.scales``). Returns the module. The output's dtype stays the table's."""
        self.values = QuantizedEmbedding(
            quantize_table(self.values.weight, dtype=dtype, block_size=block_size, scale_format=scale_format)
        )
        return self

    @torch.no_grad()
    def slot_usage(self) -> dict[str, float]:
        """Routing statistics of the last forward (one bincount and a host sync, only when called):
        ``slots_used``, the fraction of the n_keys**2 slots read at least once; ``top_slot_share``, the
        largest fraction of all reads that went to one slot; ``reads``, the number of (token, head, k) reads."""
        if self.last_indices is None:
            raise RuntimeError("ProductKeyMemory.slot_usage: no forward has run yet")
        counts = torch.bincount(self.last_indices.reshape(-1), minlength=self.n_keys * self.n_keys)
        reads = self.last_indices.numel()
        return {
            "slots_used": (counts > 0).sum().item() / counts.numel(),
            "top_slot_share": counts.max().item() / max(reads, 1),
            "reads": float(reads),
        }

    def extra_repr(self) -> str:
        return (
            f"n_keys={self.n_keys}, heads={self.heads}, topk={self.topk}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, query_norm={self.query_norm_kind!r}, gated={self.gated}, "
            f"output_gate={self.output_gate is not None}, key_init={self.key_init!r}"
        )
