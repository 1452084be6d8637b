"""Hugging Face transformers integration (``pip install "memops[hf]"``).

- :class:`RetentionCache`: a ``transformers.Cache`` backed by :class:`memops.RetentionKVCache`, usable as
  ``model.generate(..., past_key_values=RetentionCache(...))``. Each layer keeps at most budget + buffer rows
  per KV head; which rows go is decided by a retention ``log_beta_fn`` (default: a constant decay, which keeps
  the most recent tokens; plug in TRIM-KV gates for learned retention).
- :class:`SharedLoopCache`: a ``transformers.Cache`` backed by :class:`memops.SharedLoopKVCache`, for looped
  models whose layers call ``update`` once per loop; ``loop_fn`` says which loop a call is and gives its gate.
- :func:`replace_mlp`: swap chosen MLPs of a Llama-family model for ProductKeyMemory or BlockMoE layers.
- :func:`insert_engram`: add an Engram (hashed n-gram memory) before chosen decoder layers of a Llama-family
  model, fed the model's input_ids, decoding with per-layer Engram state under ``generate``.
- :func:`insert_value_embeddings`: MoVE's value-embedding bank mixed into every layer's values.

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

from memops.looped_cache import SharedLoopKVCache
from memops.nn import BlockMoE, Engram, MoVEGate, ProductKeyMemory, ValueEmbeddingBank
from memops.retention_cache import RetentionKVCache

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


class _ModelInputs:
    """What the token-reading layers (Engram, value embeddings) of one model share in a call: its input_ids,
    and the Engram decode states of a generation (created when a call starts an empty cache, continued while
    the cache grows)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.states: dict[int, object] | None = None


def _model_inputs(model) -> _ModelInputs:
    """The model's _ModelInputs, filled by one forward pre-hook on the model (registered on first use)."""
    inputs = getattr(model, "_memops_inputs", None)
    if inputs is not None:
        return inputs
    inputs = _ModelInputs()

    def capture(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("memops: the model was called without input_ids; its Engram / value embeddings read "
                             "token ids")  # fmt: skip
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it "cache"
        inputs.ids = ids
        if past is None:
            inputs.states = None
        elif past.get_seq_length() == 0 or inputs.states is None:
            inputs.states = {}

    model.register_forward_pre_hook(capture, with_kwargs=True)
    model._memops_inputs = inputs
    return inputs


def insert_engram(model, layer_indices, **engram_kwargs) -> list[Engram]:
    """Add a ``memops.nn.Engram`` before each decoder layer in ``layer_indices`` of a Llama-family model: the
    layer's input becomes ``hidden + engram(hidden, input_ids)`` (one hyper-connection stream), as the Engram
    demo's TransformerBlock adds it before attention. The Engram is stored as ``model.model.layers[i].engram``
    (the checkpoint's other names are unchanged); a forward pre-hook on the model hands it ``input_ids``.

    Under ``model.generate`` (a cache that starts empty) each Engram keeps its decode state (the last n-1
    ids and conv rows), so a step hashes only the new token; a call without a cache recomputes the whole
    sequence. ``engram_kwargs`` go to Engram (defaults: hidden_size and tokenizer_vocab_size from the config,
    hc_mult=1, layer_id=i, layer_ids=layer_indices, pad_id = the config's pad_token_id or 0,
    max_ngram_size=3, kernel_size=4, seed=0); ``vocab_sizes``, ``n_embed_per_ngram`` and ``n_head_per_ngram``
    are required. Returns the new modules. Inputs must come as ``input_ids`` (not inputs_embeds).
    """
    layers = _decoder_layers(model)
    for required in ("vocab_sizes", "n_embed_per_ngram", "n_head_per_ngram"):
        if required not in engram_kwargs:
            raise ValueError(f"insert_engram: {required}= is required")
    indices = list(layer_indices)
    for index in indices:
        if not 0 <= index < len(layers):
            raise ValueError(f"insert_engram: layer {index} is not in [0, {len(layers)})")
    config = model.config
    defaults = dict(
        hidden_size=config.hidden_size, hc_mult=1, max_ngram_size=3, kernel_size=4, seed=0,
        pad_id=config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0,
        tokenizer_vocab_size=config.vocab_size, layer_ids=sorted(indices),
    )  # fmt: skip
    inputs = _model_inputs(model)
    reference = next(model.parameters())
    created = []
    for index in indices:
        engram = Engram(**{**defaults, "layer_id": index, **engram_kwargs}).to(reference.device, reference.dtype)
        layers[index].engram = engram

        def add(module, args, kwargs, engram=engram, index=index):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            state = None
            if inputs.states is not None:
                if index not in inputs.states:
                    inputs.states[index] = engram.new_state(hidden.shape[0])
                state = inputs.states[index]
            hidden = hidden + engram(hidden.unsqueeze(2), inputs.ids, state=state).squeeze(2)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        layers[index].register_forward_pre_hook(add, with_kwargs=True)
        created.append(engram)
    return created


def insert_value_embeddings(model, *, slots: int, layer_indices=None, sparse: bool = False) -> ValueEmbeddingBank:
    """Give a Llama-family model MoVE's value memory: one :class:`memops.nn.ValueEmbeddingBank` of ``slots``
    value embeddings per token id (stored as ``model.model.value_bank``), mixed into the values of every layer
    in ``layer_indices`` (default: all) by a :class:`memops.nn.MoVEGate` of its own
    (``model.model.layers[i].self_attn.value_gate``), zero-initialised so the model starts as ``v`` plus the
    plain sum of the token's slots. A forward hook on each ``v_proj`` mixes the bank into its output
    (:func:`memops.value_embedding_mix`), reading the hidden state ``v_proj`` saw and the model's
    ``input_ids`` (a forward pre-hook on the model); the mixed values are what the cache keeps, so
    ``generate`` needs no extra state. Returns the bank. Inputs must come as ``input_ids``.
    """
    op = "insert_value_embeddings"
    layers = _decoder_layers(model)
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"{op}: slots must be an int >= 1, got {slots!r}")
    indices = list(range(len(layers)) if layer_indices is None else layer_indices)
    for index in indices:
        if not 0 <= index < len(layers):
            raise ValueError(f"{op}: layer {index} is not in [0, {len(layers)})")
    if getattr(model.model, "value_bank", None) is not None:
        raise ValueError(f"{op}: the model already has a value bank")
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    reference = next(model.parameters())
    bank = ValueEmbeddingBank(config.vocab_size, slots, heads, head_dim, sparse=sparse)
    model.model.value_bank = bank.to(reference.device, reference.dtype)
    inputs = _model_inputs(model)
    for index in indices:
        attention = layers[index].self_attn
        attention.value_gate = MoVEGate(config.hidden_size, heads, slots).to(reference.device, reference.dtype)

        def mix(module, args, out, gate=attention.value_gate):
            v = out.unflatten(-1, (heads, head_dim))
            return bank(v, gate(args[0]), inputs.ids, check_ids=False).flatten(-2)

        attention.v_proj.register_forward_hook(mix)
    return model.model.value_bank
