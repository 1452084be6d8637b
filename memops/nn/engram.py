"""Engram (DeepSeek, "Conditional Memory via Scalable Lookup"): a hashed n-gram embedding memory gated by the
hidden state, as a drop-in for deepseek-ai/Engram's ``Engram`` module, with the same parameter names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memops._validation import can_read_values, check_bool, check_int, check_module_input
from memops.engram import (
    engram_gate,
    engram_hash_params,
    engram_lookup,
    short_conv,
    short_conv_step,
    table_offsets,
)
from memops.nn.quantized import QuantizedEmbedding
from memops.quantized import quantize_table


class MultiHeadEmbedding(nn.Module):
    """The demo's ``MultiHeadEmbedding``: one table holding every hash head's rows at ``offsets``."""

    def __init__(self, sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        sizes = torch.tensor(list(sizes), dtype=torch.int64)
        self.register_buffer("offsets", table_offsets(sizes))  # persistent, as in the official state_dict
        self.embedding = nn.Embedding(int(sizes.sum()), dim)

    @property
    def table(self):
        """What the lookup reads: the embedding's weight, or its 8-bit table once quantized."""
        return self.embedding.table if isinstance(self.embedding, QuantizedEmbedding) else self.embedding.weight


class ShortConv(nn.Module):
    """The demo's ``ShortConv`` parameters: a depthwise Conv1d over G*C channels and G RMSNorms."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int, norm_eps: float = 1e-5):
        super().__init__()
        channels = hidden_size * hc_mult
        self.dilation, self.norm_eps = dilation, norm_eps
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, bias=False, padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )  # fmt: skip
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])

    def norm_weight(self) -> torch.Tensor:
        return torch.stack([norm.weight for norm in self.norms])


@dataclass
class EngramState:
    """Decode state of one Engram layer: the last max_ngram_size - 1 compressed ids (B, N - 1) and the normed
    conv inputs of the last (K - 1) * dilation steps (B, (K-1)*dilation, G, C). A new sequence starts from
    :meth:`Engram.new_state` (pad ids, zero rows), as the demo's left padding does."""

    ids: torch.Tensor
    conv: torch.Tensor
    fresh: bool = True


class Engram(nn.Module):
    """Engram conditional memory for one layer: hash the last n tokens (n = 2..max_ngram_size) into
    ``n_head_per_ngram`` tables each, read one row per head, gate the value projection by the hidden
    state's G streams, and add a short causal conv.

    ``forward(hidden_states (B, L, G, C), input_ids (B, L)) -> (B, L, G, C)``, equal to the demo's
    ``Engram.forward`` on the same weights and ids (the layer's residual add is the caller's, as in the
    demo's TransformerBlock). Parameter names and shapes are the demo's, so its state_dict loads with
    ``strict=True``.

    Args:
        layer_id: this layer's index.
        hidden_size: C. hc_mult: G, the hyper-connection streams.
        vocab_sizes: the minimum table size per order (the demo's ``engram_vocab_size``).
        max_ngram_size: N. n_embed_per_ngram: e (each head has e / h dims). n_head_per_ngram: h.
        kernel_size: the short conv's taps (dilation is N).
        pad_id: the tokenizer's pad id, *before* compression (compressed through ``compression`` when given).
        seed: the hash seed.
        tokenizer_vocab_size: the compressed vocabulary size (it bounds the hash multipliers).
        layer_ids: every Engram layer of the model, in order (primes are distinct across them, so a layer's
            table sizes depend on the layers before it); default ``(layer_id,)``.
        compression: optional (vocab,) int64 lookup, raw token id -> compressed id (the demo's
            CompressedTokenizer.lookup_table, which needs the tokenizer to build). Without it ids are used
            as given.
        sparse: the hashed table gets a ``torch.sparse_coo`` gradient (``engram_lookup(sparse=True)``, as
            ``nn.Embedding(sparse=True)``) for the row-sparse optimizers of ``memops.optim``. (A table given to
            ``memops.optim.apply_optimizer_in_backward`` is updated in the backward either way.)
    """

    def __init__(
        self,
        layer_id: int,
        hidden_size: int,
        hc_mult: int,
        vocab_sizes: Sequence[int],
        max_ngram_size: int,
        n_embed_per_ngram: int,
        n_head_per_ngram: int,
        kernel_size: int,
        pad_id: int,
        seed: int,
        tokenizer_vocab_size: int,
        *,
        layer_ids: Sequence[int] | None = None,
        compression: torch.Tensor | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.sparse = check_bool(sparse, "sparse", "Engram")
        for name, value, low in (
            ("hidden_size", hidden_size, 1), ("hc_mult", hc_mult, 1), ("max_ngram_size", max_ngram_size, 2),
            ("n_embed_per_ngram", n_embed_per_ngram, 1), ("n_head_per_ngram", n_head_per_ngram, 1),
            ("kernel_size", kernel_size, 1), ("tokenizer_vocab_size", tokenizer_vocab_size, 1),
        ):  # fmt: skip
            check_int(value, name, "Engram", low=low)
        for name, value in (("layer_id", layer_id), ("pad_id", pad_id), ("seed", seed)):
            check_int(value, name, "Engram")
        if n_embed_per_ngram % n_head_per_ngram:
            raise ValueError(
                f"Engram: n_embed_per_ngram ({n_embed_per_ngram}) must be a multiple of n_head_per_ngram "
                f"({n_head_per_ngram})"
            )
        layer_ids = tuple(layer_ids) if layer_ids is not None else (layer_id,)
        if layer_id not in layer_ids:
            raise ValueError(f"Engram: layer_id {layer_id} is not in layer_ids {layer_ids}")
        self.layer_id, self.hidden_size, self.hc_mult = layer_id, hidden_size, hc_mult
        self.max_ngram_size, self.kernel_size = max_ngram_size, kernel_size
        multipliers, primes = engram_hash_params(
            layer_ids, vocab_sizes, max_ngram_size=max_ngram_size, n_head_per_ngram=n_head_per_ngram, seed=seed,
            tokenizer_vocab_size=tokenizer_vocab_size,
        )[layer_id]  # fmt: skip
        # Hash parameters are derived, not learned: outside the state_dict, as in the demo.
        self.register_buffer("multipliers", multipliers, persistent=False)
        self.register_buffer("primes", primes, persistent=False)
        if compression is not None:
            compression = torch.as_tensor(compression, dtype=torch.int64)
            self.register_buffer("compression", compression, persistent=False)
            pad_id = int(compression[pad_id])
        else:
            self.compression = None
        self.pad_id = int(pad_id)
        self.tokenizer_vocab_size = int(tokenizer_vocab_size)
        self.multi_head_embedding = MultiHeadEmbedding(
            primes.reshape(-1).tolist(), n_embed_per_ngram // n_head_per_ngram
        )
        self.short_conv = ShortConv(hidden_size, kernel_size, max_ngram_size, hc_mult)
        engram_hidden = (max_ngram_size - 1) * n_embed_per_ngram
        self.value_proj = nn.Linear(engram_hidden, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(engram_hidden, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

    @torch.no_grad()
    def quantize_(
        self, *, dtype: torch.dtype = torch.float8_e4m3fn, block_size: int | None = 128, scale_format: str = "e8m0"
    ) -> Engram:
        """For inference: store the hashed table in 8 bits (:func:`memops.quantize_table`'s arguments), read by
        the lookup kernel as it is (vLLM serves Engram tables as e4m3 with e8m0 scales);
        ``multi_head_embedding.embedding`` becomes a :class:`memops.nn.QuantizedEmbedding` (state-dict keys
        ``...embedding.data`` / ``.scales``). Returns the module; its outputs keep the table's dtype."""
        if self.sparse:
            raise ValueError(
                "Engram.quantize_: a sparse=True layer trains its table; quantized tables are for inference"
            )
        table = self.multi_head_embedding
        table.embedding = QuantizedEmbedding(
            quantize_table(table.embedding.weight, dtype=dtype, block_size=block_size, scale_format=scale_format)
        )
        return self

    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw ids -> compressed ids through ``compression`` (negative ids pass through, as in the demo)."""
        if self.compression is None:
            return input_ids
        return torch.where(input_ids >= 0, self.compression[input_ids.clamp_min(0)], input_ids)

    def new_state(self, batch: int) -> EngramState:
        """The decode state at the start of ``batch`` sequences."""
        device = self.multi_head_embedding.offsets.device
        dtype = self.value_proj.weight.dtype
        rows = (self.kernel_size - 1) * self.max_ngram_size
        return EngramState(
            ids=torch.full((batch, self.max_ngram_size - 1), self.pad_id, dtype=torch.int64, device=device),
            conv=torch.zeros(batch, rows, self.hc_mult, self.hidden_size, dtype=dtype, device=device),
        )

    def embed(self, input_ids: torch.Tensor, *, context: torch.Tensor | None = None) -> torch.Tensor:
        """The multi-head embedding of compressed ids (B, L) -> (B, L, (N - 1) * e); ``context`` (B, N - 1)
        the ids before them (default: the left padding)."""
        ids = input_ids if context is None else torch.cat([context, input_ids], dim=1)
        table = self.multi_head_embedding
        width = 0 if context is None else context.shape[1]  # one row per head per new token
        return engram_lookup(ids, table.table, self.multipliers, self.primes, table.offsets,
                             pad_id=self.pad_id, context=width, sparse=self.sparse)  # fmt: skip

    def forward(
        self, hidden_states: torch.Tensor, input_ids: torch.Tensor, *, state: EngramState | None = None
    ) -> torch.Tensor:
        """hidden_states (B, L, G, C), input_ids (B, L) raw token ids -> (B, L, G, C).

        ``state``: continue the sequences that ``state`` holds (prefill, then one token or a chunk at a time);
        it is updated in place. The result equals the rows of a forward over the whole sequence."""
        self._check_inputs(hidden_states, input_ids, state)
        B, L, G, C = hidden_states.shape
        ids = self.compress(input_ids)
        embeddings = self.embed(ids, context=None if state is None or state.fresh else state.ids)
        key = F.linear(
            embeddings,
            torch.cat([proj.weight for proj in self.key_projs]),
            torch.cat([proj.bias for proj in self.key_projs]),
        ).view(B, L, G, C)  # the G key projections as one matmul
        value = self.value_proj(embeddings)
        w_k = torch.stack([norm.weight for norm in self.norm1])
        w_q = torch.stack([norm.weight for norm in self.norm2])
        gated = engram_gate(key, hidden_states, w_k, w_q, value, eps=self.norm1[0].eps)
        conv = self.short_conv
        options = dict(dilation=conv.dilation, eps=conv.norm_eps)
        if state is None:
            return short_conv(gated, conv.conv.weight, conv.norm_weight(), **options)
        if state.fresh:
            out = short_conv(gated, conv.conv.weight, conv.norm_weight(), **options)
        else:
            steps = []
            rows = state.conv
            for t in range(L):
                step, rows = short_conv_step(gated[:, t], rows, conv.conv.weight, conv.norm_weight(), **options)
                steps.append(step)
            out = torch.stack(steps, dim=1)
        self._advance(state, ids, gated.detach())
        return out

    def _check_inputs(self, hidden_states, input_ids, state) -> None:
        """Clear errors before any kernel runs: the hidden states' layout and dtype, the ids' shape, dtype and
        range (raw ids index the compression table, or are the compressed ids themselves), the state's."""
        op = "Engram"
        check_module_input(hidden_states, "hidden_states", op, width=self.hidden_size, dims=(4,),
                           like=self.value_proj.weight)  # fmt: skip
        B, L, G = hidden_states.shape[:3]
        if G != self.hc_mult:
            raise ValueError(
                f"{op}: hidden_states must be (B, L, G={self.hc_mult}, C), got {tuple(hidden_states.shape)}"
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"{op}: input_ids must be an int32 or int64 tensor, got {got}")
        if input_ids.shape != (B, L):
            raise ValueError(f"{op}: input_ids must be (B, L) = {(B, L)}, got {tuple(input_ids.shape)}")
        if input_ids.device != hidden_states.device:
            raise ValueError(f"{op}: input_ids is on {input_ids.device} but hidden_states is on {hidden_states.device}")
        vocab = self.compression.numel() if self.compression is not None else self.tokenizer_vocab_size
        if can_read_values(input_ids) and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise IndexError(f"{op}: input_ids must lie in [0, {vocab}), got values in [{low}, {high}]")
        if state is not None:
            if not isinstance(state, EngramState):
                raise TypeError(f"{op}: state must be an EngramState (Engram.new_state), got {type(state).__name__}")
            rows = (self.kernel_size - 1) * self.max_ngram_size
            if state.ids.shape != (B, self.max_ngram_size - 1) or state.conv.shape != (B, rows, G, self.hidden_size):
                raise ValueError(
                    f"{op}: state is for ids {tuple(state.ids.shape)} and conv rows {tuple(state.conv.shape)}; this "
                    f"call needs {(B, self.max_ngram_size - 1)} and {(B, rows, G, self.hidden_size)} "
                    f"(Engram.new_state({B}))"
                )

    def _advance(self, state: EngramState, ids: torch.Tensor, gated: torch.Tensor) -> None:
        conv = self.short_conv
        history = torch.cat([state.ids, ids], dim=1)  # a fresh state's ids are the left padding
        normed = F.rms_norm(gated, (gated.shape[-1],), eps=conv.norm_eps) * conv.norm_weight().detach()
        rows = torch.cat([state.conv, normed.to(state.conv.dtype)], dim=1)
        state.ids = history[:, -state.ids.shape[1] :]
        state.conv = rows[:, -state.conv.shape[1] :]
        state.fresh = False
