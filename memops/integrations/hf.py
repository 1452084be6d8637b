"""Hugging Face transformers integration (``pip install "memops[hf]"``).

- :class:`RetentionCache`: a ``transformers.Cache`` backed by :class:`memops.RetentionKVCache`, usable as
  ``model.generate(..., past_key_values=RetentionCache(...))``. Each layer keeps at most budget + buffer rows
  per KV head; which rows go is decided by a retention ``log_beta_fn`` (default: a constant decay, which keeps
  the most recent tokens; plug in TRIM-KV gates for learned retention).
- :class:`SharedLoopCache`: a ``transformers.Cache`` backed by :class:`memops.SharedLoopKVCache`, for looped
  models whose layers call ``update`` once per loop; ``loop_fn`` says which loop a call is and gives its gate.
- :func:`replace_mlp`: swap chosen MLPs of a Llama-family model for ProductKeyMemory or BlockMoE layers.

The attention mask treats the rows a layer holds as the most recent past: every held row is visible to
every new query, new rows are causal among themselves; positions (RoPE) keep counting every token seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('memops.integrations.hf needs transformers: pip install "memops[hf]"') from error

from memops.kv_cache import RetentionKVCache, SharedLoopKVCache
from memops.nn import BlockMoE, ProductKeyMemory

LogBetaFn = Callable[[int, torch.Tensor], torch.Tensor]


def constant_decay(log_beta: float = -0.01) -> LogBetaFn:
    """log_beta_fn giving every token the same retention: eviction then keeps the most recent tokens."""

    def fn(layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        return torch.full(key_states.shape[:3], log_beta, dtype=torch.float32, device=key_states.device)

    return fn


class _BoundedLayer(CacheLayerMixin):
    """One layer of a memops-backed cache: held rows, plus the count of every token seen (for positions)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_idx: int, append: Callable, held: Callable) -> None:
        super().__init__()
        self.layer_idx, self._append, self._held = layer_idx, append, held
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._append(self.layer_idx, key_states, value_states)
        self.seen += key_states.shape[-2]
        self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self._held(self.layer_idx)
        # The held rows act as positions [seen - held, seen): all in the past of the new queries.
        return held + query_length, self.seen - held

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class RetentionCache(Cache):
    """A transformers Cache bounded by TRIM-KV retention eviction (memops.RetentionKVCache).

    Args:
        num_layers: the model's decoder layers (``config.num_hidden_layers``).
        budget, buffer: rows kept per layer and KV head after a compaction, and the slack before the next.
        log_beta_fn: ``fn(layer_idx, key_states (B, Hkv, n, D)) -> log_beta (B, Hkv, n)``, each <= 0; default
            :func:`constant_decay` (keep the most recent tokens).
    """

    def __init__(self, num_layers: int, budget: int, buffer: int = 128, log_beta_fn: LogBetaFn | None = None) -> None:
        self.memory = RetentionKVCache(budget, buffer)
        self.log_beta_fn = log_beta_fn or constant_decay()

        def append(layer_idx, key_states, value_states):
            log_beta = self.log_beta_fn(layer_idx, key_states)
            return self.memory.update(key_states, value_states, layer_idx, log_beta)

        layers = [_BoundedLayer(i, append, self.memory.get_seq_length) for i in range(num_layers)]
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        return self.memory.memory_bytes()


class SharedLoopCache(Cache):
    """A transformers Cache with one KV cache per layer shared across loops (memops.SharedLoopKVCache).

    ``loop_fn(layer_idx, key_states) -> (loop_idx, gate)`` tells which loop an ``update`` belongs to and its
    gate ((B, Hkv, n, 1) or (B, Hkv, n, D) in [0, 1]); loop 0 appends, later loops blend in place. The default
    treats every call as loop 0 (a plain, unlooped model: a growing cache).
    """

    def __init__(self, num_layers: int, loop_fn: Callable | None = None) -> None:
        self.memory = SharedLoopKVCache(num_layers)
        self.loop_fn = loop_fn

        def append(layer_idx, key_states, value_states):
            loop_idx, gate = (0, None) if self.loop_fn is None else self.loop_fn(layer_idx, key_states)
            if gate is None:
                gate = key_states.new_ones((*key_states.shape[:3], 1))
            return self.memory.update(key_states, value_states, layer_idx, loop_idx, gate)

        layers = [_LoopLayer(i, append, self.memory.get_seq_length) for i in range(num_layers)]
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        return self.memory.memory_bytes()


class _LoopLayer(_BoundedLayer):
    """Later loops rewrite rows already counted: only loop-0 appends advance the positions."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        before = self._held(self.layer_idx)
        keys, values = self._append(self.layer_idx, key_states, value_states)
        self.seen += self._held(self.layer_idx) - before
        self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            "replace_mlp: expected a Llama-family model with model.model.layers[i].mlp (e.g. LlamaForCausalLM, "
            f"MistralForCausalLM, Qwen2ForCausalLM); got {type(model).__name__}"
        )
    return layers


def replace_mlp(model, layer_indices, kind: str, **kwargs):
    """Replace the MLP of each decoder layer in ``layer_indices`` with a ``ProductKeyMemory`` (kind "pkm") or a
    ``BlockMoE`` (kind "moe") of the model's hidden size; ``kwargs`` go to the new layer. Returns the new
    modules. The model must be Llama-shaped (``model.model.layers[i].mlp``)."""
    layers = _decoder_layers(model)
    hidden = model.config.hidden_size
    created = []
    for index in layer_indices:
        if not 0 <= index < len(layers):
            raise ValueError(f"replace_mlp: layer {index} is not in [0, {len(layers)})")
        old = layers[index].mlp
        reference = next(old.parameters())
        if kind == "pkm":
            module = ProductKeyMemory(hidden, hidden, **kwargs)
        elif kind == "moe":
            module = BlockMoE(hidden, kwargs.pop("d_expert", model.config.intermediate_size), **kwargs)
        else:
            raise ValueError(f"replace_mlp: kind must be 'pkm' or 'moe', got {kind!r}")
        module = module.to(device=reference.device, dtype=reference.dtype).train(old.training)
        layers[index].mlp = module
        created.append(module)
    return created
