"""MELT's layer: LoopedAttention, one loop of a layer whose keys and values blend into a shared KV cache."""

from __future__ import annotations

import torch

from memops.attention import memory_attention
from memops.looped import looped_attention, looped_attention_varlen
from memops.nn.attention import MemoryAttention


class LoopedAttention(MemoryAttention):
    """One loop of a MELT layer: the loop's keys and values blend into the layer's shared KV cache with a gate,
    then attention runs over it (:func:`memops.looped_attention`). Same arguments and state-dict keys as
    :class:`MemoryAttention`; the prefix rows lead the cache and are never blended.

    ``forward(x, gate, shared=None)`` -> (out (B, N, d_model), shared): ``shared`` is the (k, v) cache the
    previous loop returned (None on loop 0, where the cache is [prefix ; k] itself). With ``cache=`` (a
    :class:`memops.SharedLoopKVCache`, decoding) the rows go to ``cache.update(k, v, layer_idx, loop, gate)``.
    """

    def forward(
        self, x: torch.Tensor, gate: torch.Tensor, *, shared=None, cache=None, layer_idx: int = 0, loop: int = 0,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, value_mix=None,
    ):  # fmt: skip
        """x (B, N, d_model), gate (B, Hkv, N, 1) or (B, Hkv, N, head_dim) in [0, 1]. ``value_mix``: as
        :meth:`MemoryAttention.project`.

        Packed (training): x (total, d_model), gate (total, Hkv, 1 | head_dim), ``shared`` the previous loop's
        packed (k, v) (total, Hkv, head_dim), with ``cu_seqlens`` and ``max_seqlen``
        (:func:`memops.looped_attention_varlen`); no cache, and no prefix."""
        if self._packed(x, cu_seqlens, max_seqlen):
            if cache is not None or self.prefix_k is not None or value_mix is not None:
                raise ValueError(
                    "LoopedAttention: packed input (cu_seqlens) takes no cache and no prefix (or value_mix)"
                )
            q, k, v = self.project_packed(x, cu_seqlens)
            k_cache, v_cache = (None, None) if shared is None else shared
            out, k_cache, v_cache = looped_attention_varlen(
                q, k, v, gate, cu_seqlens, max_seqlen, k_cache, v_cache, causal=self.causal
            )
            return self.out_proj(out.flatten(1)), (k_cache, v_cache)
        q, k, v = self.project(x, value_mix)
        mem_k, mem_v = self.memory_rows()
        if cache is not None:
            k, v = cache.update(k, v, layer_idx, loop, gate)
            return self.output(memory_attention(q, k, v, mem_k, mem_v, causal=self.causal)), None
        if shared is None:  # loop 0: [prefix ; k] with gate 0 is [prefix ; k] itself
            batch = x.shape[0]
            k_cache = torch.cat([mem_k.expand(batch, -1, -1, -1), k], 2) if mem_k is not None else k
            v_cache = torch.cat([mem_v.expand(batch, -1, -1, -1), v], 2) if mem_v is not None else v
            gate = torch.zeros_like(gate)
        else:
            k_cache, v_cache = shared
        out, k_cache, v_cache = looped_attention(q, k, v, gate, k_cache, v_cache, causal=self.causal)
        return self.output(out), (k_cache, v_cache)
