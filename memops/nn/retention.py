"""RetentionGate: TRIM-KV's per-token retention gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memops._validation import check_module_input

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
