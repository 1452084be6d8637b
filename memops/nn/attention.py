"""Attention layers: MemoryAttention, a drop-in self-attention layer that also attends to memory tokens or a
learned prefix, and the rotary embedding it applies. Its retention-decay (TRIM-KV) form is
:class:`memops.nn.RetentionAttention` (memops/nn/retention.py), its looped-cache (MELT) form
:class:`memops.nn.LoopedAttention` (memops/nn/looped.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memops._validation import check_cu_seqlens, check_int, check_module_input
from memops.attention import memory_attention, memory_attention_varlen
from memops.varlen import packed_positions

RotaryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, the rotate-half convention of Llama / GPT-NeoX) as a ``rotary=``
    callback for the attention layers: ``rope(q, k, position_ids=None) -> (q, k)`` on (B, heads, N, head_dim)
    tensors, positions ``position_ids`` (B | 1, N) or 0..N-1. It holds no state (nothing in a state_dict):
    the angles are computed per call in fp32.

    The layers call it with ``position_ids`` that restart at 0 for every sequence of a packed batch.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        check_int(head_dim, "head_dim", "RotaryEmbedding", low=2)
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.base = head_dim, float(base)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        return rotated.to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None):
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: q and k must have head_dim {self.head_dim} in their last dim")
        if position_ids is None:
            position_ids = torch.arange(q.shape[-2], device=q.device)[None]
        half = self.head_dim // 2
        inv_freq = self.base ** -(torch.arange(half, device=q.device, dtype=torch.float32) / half)
        angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B | 1, N, half)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # broadcast over heads
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class MemoryAttention(nn.Module):
    """Multi-head self-attention over [memory ; sequence] keys, through :func:`memops.memory_attention`.

    Memory comes from ``memory`` tokens (B, M, d_model), projected by this layer's own ``k_proj`` /
    ``v_proj`` as DiT-Mem does in every block, and/or a learned batch-shared prefix (prefix tuning) of
    ``prefix_length`` key/value rows per kv head. Memory rows get no rotary embedding: ``rotary`` (a
    callable ``(q, k) -> (q, k)`` on (B, heads, N, head_dim) tensors) is applied to the sequence only.

    State dict keys: ``q_proj.weight``, ``k_proj.weight``, ``v_proj.weight``, ``out_proj.weight`` (and
    ``.bias`` of each with ``bias=True``), plus ``prefix_k`` and ``prefix_v`` (Hkv, prefix_length, head_dim)
    when ``prefix_length > 0``.

    Args:
        d_model: model width.
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv (GQA / MQA); default H.
        head_dim: default d_model // num_heads.
        causal: causal mask over the sequence (memory stays visible to every query).
        prefix_length: learned prefix rows (0: none).
        bias: biases in the four projections.
        rotary: optional rotary-embedding callback for the sequence rows.
    """

    def __init__(
        self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
        causal: bool = False, prefix_length: int = 0, bias: bool = False, rotary: RotaryFn | None = None,
        device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        op = "MemoryAttention"
        check_int(d_model, "d_model", op, low=1)
        check_int(num_heads, "num_heads", op, low=1)
        num_kv_heads = num_heads if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads", op, low=1)
        head_dim = d_model // num_heads if head_dim is None else check_int(head_dim, "head_dim", op, low=1)
        if head_dim < 1:
            raise ValueError(f"{op}: d_model={d_model} // num_heads={num_heads} leaves head_dim 0; pass head_dim")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"MemoryAttention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if prefix_length < 0:
            raise ValueError(f"MemoryAttention: prefix_length must be >= 0, got {prefix_length}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.rotary = causal, rotary
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias, **factory)
        if prefix_length:
            self.prefix_k = nn.Parameter(torch.randn(num_kv_heads, prefix_length, head_dim, **factory) * head_dim**-0.5)
            self.prefix_v = nn.Parameter(torch.randn(num_kv_heads, prefix_length, head_dim, **factory) * head_dim**-0.5)
        else:
            self.register_parameter("prefix_k", None)
            self.register_parameter("prefix_v", None)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)  # (B, L, h*d) -> (B, h, L, d)

    def _check_input(self, x: torch.Tensor, name: str = "x") -> None:
        check_module_input(
            x, name, type(self).__name__, width=self.q_proj.in_features, dims=(3,), like=self.q_proj.weight
        )

    def project(self, x: torch.Tensor, value_mix=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, d_model) -> q (B, H, N, head_dim), k and v (B, Hkv, N, head_dim), rotary applied.
        ``value_mix``: a function of the values (B, N, Hkv, head_dim) returning new ones of that shape, applied
        before attention and any cache (MoVE's bank, :class:`memops.nn.ValueEmbeddingBank`)."""
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = (v if value_mix is None else value_mix(v)).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        return q, k, v

    def _packed(self, x: torch.Tensor, cu_seqlens, max_seqlen) -> bool:
        """Whether this call is packed (x (total, d_model) with cu_seqlens and max_seqlen), checked."""
        name = type(self).__name__
        if cu_seqlens is None and max_seqlen is None:
            self._check_input(x)
            return False
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError(f"{name}: packed input needs both cu_seqlens and max_seqlen")
        check_module_input(x, "x", name, width=self.q_proj.in_features, dims=(2,), like=self.q_proj.weight)
        check_cu_seqlens(cu_seqlens, "cu_seqlens", x.shape[0], max_seqlen, name, x.device)  # in the module's names
        return True

    def project_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor):
        """Packed x (total, d_model) -> q (total, H, head_dim), k and v (total, Hkv, head_dim); rotary applied
        with positions that restart at 0 for every sequence of ``cu_seqlens``."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rotary is not None:
            positions = packed_positions(cu_seqlens, x.shape[0])[None]
            q4, k4 = self.rotary(q.transpose(0, 1)[None], k.transpose(0, 1)[None], position_ids=positions)
            q, k = q4[0].transpose(0, 1), k4[0].transpose(0, 1)
        return q, k, v

    def memory_rows(self, memory: torch.Tensor | None = None):
        """(mem_k, mem_v) over [prefix ; memory tokens]: (Hkv, P, head_dim) batch-shared for the prefix alone,
        (B, Hkv, P + M, head_dim) with memory (B, M, d_model), or (None, None) when the layer has neither."""
        mem_k = mem_v = None
        if memory is not None:
            mem_k = self._heads(self.k_proj(memory), self.num_kv_heads)
            mem_v = self._heads(self.v_proj(memory), self.num_kv_heads)
        if self.prefix_k is not None:
            if mem_k is None:  # batch-shared: its grads are summed over the batch inside the kernel
                mem_k, mem_v = self.prefix_k, self.prefix_v
            else:  # prefix rows first, then this sample's memory tokens
                batch = memory.shape[0]
                mem_k = torch.cat([self.prefix_k.expand(batch, -1, -1, -1), mem_k], dim=2)
                mem_v = torch.cat([self.prefix_v.expand(batch, -1, -1, -1), mem_v], dim=2)
        return mem_k, mem_v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, N, head_dim) -> (B, N, d_model) through ``out_proj``."""
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        memory_bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """x (B, N, d_model); memory (B, M, d_model) or None; memory_bias (M_total,), (Hkv, M_total) or
        (B, Hkv, M_total) over [prefix ; memory] rows. Returns (B, N, d_model).

        Packed: x (total, d_model) with ``cu_seqlens`` (S + 1,) int32 and ``max_seqlen`` (FlashAttention's
        varlen layout, :func:`memops.memory_attention_varlen`); memory (S, M, d_model) per sequence, S in
        place of B for memory_bias; rotary positions restart per sequence. Returns (total, d_model)."""
        packed = self._packed(x, cu_seqlens, max_seqlen)
        batch = cu_seqlens.shape[0] - 1 if packed else x.shape[0]
        if memory is not None:
            self._check_input(memory, "memory")
            if memory.shape[0] != batch:
                raise ValueError(
                    f"MemoryAttention: memory must be ({'S' if packed else 'B'}={batch}, M, d_model), got "
                    f"{tuple(memory.shape)}"
                )
        mem_k, mem_v = self.memory_rows(memory)
        if packed:
            q, k, v = self.project_packed(x, cu_seqlens)
            out = memory_attention_varlen(
                q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, mem_k, mem_v,
                causal=self.causal, mem_bias=memory_bias,
            )  # fmt: skip
            return self.out_proj(out.flatten(1))
        q, k, v = self.project(x)
        out = memory_attention(q, k, v, mem_k, mem_v, causal=self.causal, mem_bias=memory_bias)
        return self.output(out)
