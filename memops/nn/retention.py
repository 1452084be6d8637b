"""TRIM-KV's layers: RetentionGate, the per-token retention gate, and RetentionAttention, the attention layer
with retention decay and its bounded-cache decode form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memops._validation import check_module_input
from memops.attention import memory_attention, memory_attention_varlen
from memops.nn.attention import MemoryAttention
from memops.retention import retention_attention, retention_attention_varlen

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class RetentionGate(nn.Module):
    """``log_beta = logsigmoid(W2 act(W1 x + b1) + b2)``, one retention per KV head, for every token.

    x: (B, N, d_model), the normed attention input of the layer; returns log_beta (B, Hkv, N), each <= 0,
    ready for :func:`memops.retention_attention`, :func:`memops.capacity_loss` and
    :class:`memops.RetentionKVCache`. ``bias_init`` (TRIM-KV: 8 as the training default, 10 in the released
    model configs' ``retention_gate_bias_init``) starts every token near full retention
    (beta = sigmoid(8) = 0.9997), so the frozen model's attention is barely changed at first.

    Args:
        hidden: the gate's intermediate size (TRIM-KV's ``retention_gate_intermediate_size``, 512).
        activation: ``"silu"`` (default), ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or a callable: the model's
            ``hidden_act``, as the official gate uses.
        init: ``"official"`` (default), as ngocbh/trimkv's ``RetentionGate.reset_parameters``: weights
            N(0, 0.02), b1 = 0, b2 = bias_init; ``"torch"``: nn.Linear's default init, b2 = bias_init.

    State dict keys: ``up.weight`` (hidden, d_model), ``up.bias``, ``down.weight`` (n_kv_heads, hidden),
    ``down.bias`` (n_kv_heads,). The official checkpoint names them ``linear1.weight``, ``linear1.bias``,
    ``linear2.weight`` and ``bias``: :meth:`load_official_state_dict` maps them.
    """

    OFFICIAL_KEYS = {
        "linear1.weight": "up.weight",
        "linear1.bias": "up.bias",
        "linear2.weight": "down.weight",
        "bias": "down.bias",
    }

    def __init__(self, d_model: int, n_kv_heads: int, hidden: int = 512, bias_init: float = 8.0, *,
                 activation="silu", init: str = "official", device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        if init not in ("official", "torch"):
            raise ValueError(f"RetentionGate: init must be 'official' or 'torch', got {init!r}")
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(
                    f"RetentionGate: activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}"
                )
            activation = _ACTIVATIONS[activation]
        elif not callable(activation):
            raise TypeError(f"RetentionGate: activation must be a name or a callable, got {type(activation).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.act = activation
        self.up = nn.Linear(d_model, hidden, **factory)
        self.down = nn.Linear(hidden, n_kv_heads, **factory)
        if init == "official":
            nn.init.normal_(self.up.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.up.bias)
            nn.init.normal_(self.down.weight, mean=0.0, std=0.02)
        nn.init.constant_(self.down.bias, bias_init)

    def load_official_state_dict(self, state: dict, strict: bool = True):
        """Load a gate saved by ngocbh/trimkv (``linear1.*``, ``linear2.weight``, ``bias``; a prefix such as
        ``model.layers.3.self_attn.retention_gate.`` is stripped)."""
        mapped = {}
        for key, value in state.items():
            for official, ours in self.OFFICIAL_KEYS.items():  # "linear1.bias" is tried before "bias"
                if key == official or key.endswith("." + official):
                    mapped[ours] = value
                    break
        return self.load_state_dict(mapped, strict=strict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d_model) (any leading dims) -> log_beta (B, n_kv_heads, N)."""
        check_module_input(x, "x", "RetentionGate", width=self.up.in_features, like=self.up.weight)
        if x.dim() < 2:
            raise ValueError(f"RetentionGate: x must be (..., N, d_model), got shape {tuple(x.shape)}")
        return F.logsigmoid(self.down(self.act(self.up(x)))).transpose(-1, -2)


class RetentionAttention(MemoryAttention):
    """Causal self-attention with TRIM-KV's retention decay (:func:`memops.retention_attention`) over
    [prefix ; sequence], and its bounded-cache decode form.

    The layer of :class:`MemoryAttention` (same arguments and state-dict keys; ``causal`` must stay True).
    ``forward(x, log_beta)`` in training decays every sequence key by its retention (``decay=False``: plain
    causal attention, with the gate trained by the capacity loss alone). With ``cache=`` (a
    :class:`memops.RetentionKVCache`) the new rows join the cache at ``layer_idx`` and attention runs over
    [prefix ; cache] without decay, as TRIM-KV inference does. The prefix is never evicted.
    """

    def __init__(self, d_model: int, num_heads: int, *, decay: bool = True, **kwargs) -> None:
        if not kwargs.setdefault("causal", True):
            raise ValueError("RetentionAttention: retention attention is causal; causal=False is not supported")
        super().__init__(d_model, num_heads, **kwargs)
        self.decay = decay

    def forward(
        self, x: torch.Tensor, log_beta: torch.Tensor, *, cache=None, layer_idx: int = 0, check_log_beta: bool = True,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, value_mix=None,
    ) -> torch.Tensor:  # fmt: skip
        """x (B, N, d_model), log_beta (B, Hkv, N) (from a :class:`memops.nn.RetentionGate`) -> (B, N, d_model).
        ``value_mix``: as :meth:`MemoryAttention.project` (the mixed values are what the cache keeps).

        Packed (training): x (total, d_model), log_beta (Hkv, total) (what the gate gives for packed x),
        ``cu_seqlens`` and ``max_seqlen`` as in :func:`memops.retention_attention_varlen`; no cache."""
        if self._packed(x, cu_seqlens, max_seqlen):
            if cache is not None or value_mix is not None:
                raise ValueError(
                    "RetentionAttention: packed input (cu_seqlens) is for training; it takes no cache and no value_mix"
                )
            q, k, v = self.project_packed(x, cu_seqlens)
            mem_k, mem_v = self.memory_rows()
            if not isinstance(log_beta, torch.Tensor) or log_beta.dim() != 2:
                raise ValueError("RetentionAttention: packed log_beta must be (Hkv, total), as RetentionGate gives")
            if self.decay:
                out = retention_attention_varlen(
                    q, k, v, log_beta.t(), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                    mem_k=mem_k, mem_v=mem_v, check_log_beta=check_log_beta,
                )  # fmt: skip
            else:
                out = memory_attention_varlen(
                    q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, mem_k, mem_v, causal=True
                )
            return self.out_proj(out.flatten(1))
        q, k, v = self.project(x, value_mix)
        mem_k, mem_v = self.memory_rows()
        if cache is not None:
            k, v = cache.update(k, v, layer_idx, log_beta.detach())
            out = memory_attention(q, k, v, mem_k, mem_v, causal=self.causal)
        elif self.decay:
            out = retention_attention(q, k, v, log_beta, mem_k=mem_k, mem_v=mem_v, check_log_beta=check_log_beta)
        else:
            out = memory_attention(q, k, v, mem_k, mem_v, causal=self.causal)
        return self.output(out)
