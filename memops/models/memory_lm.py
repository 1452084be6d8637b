"""MemoryLM: a small decoder-only language model assembled from memops.nn parts.

Each layer: pre-norm attention over [learned memory prefix ; sequence] (``nn.RetentionAttention``, or
``nn.LoopedAttention`` with loops > 1: forms of ``nn.MemoryAttention``), then a
pre-norm FFN that is a ``ProductKeyMemory`` in ``pkm_layers`` and a ``BlockMoE`` (dMoE block routing)
elsewhere; layers in ``engram_layers`` first add an ``nn.Engram`` (hashed n-gram memory) to the residual.
Every layer also has a ``RetentionGate`` (TRIM-KV): in training the sequence keys decay by its
retention inside attention (``memops.retention_attention``; the memory prefix does not decay) and its
capacity loss pulls it towards ``kv_budget``; ``generate`` attends without decay, as TRIM-KV inference does,
and uses the gate to run a ``RetentionKVCache`` bounded by ``kv_budget + kv_buffer`` rows per layer and KV
head. The memory prefix is never evicted.

With ``loops > 1`` the layer stack is applied ``loops`` times (a looped transformer) and, as in MELT, each
layer keeps one KV cache for all loops: loop r blends its keys/values into the rows of loop r - 1 with a
learned per-token, per-KV-head gate (``memops.looped_attention``; the memory prefix rows stay as they are),
and ``generate`` uses a ``SharedLoopKVCache`` (no eviction) whose memory does not grow with the loop count.

With ``move_slots = M > 0`` (MoVE) one ``ValueEmbeddingBank`` of M value embeddings per token id is mixed into
every layer's values by that layer's ``MoVEGate`` (``memops.value_embedding_mix``); ``value_embeddings="layer"``
gives each layer a one-slot bank of its own instead (LaVE). The mixed values are what the caches keep, so
decoding needs no extra state.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from memops._validation import can_read_values, check_int
from memops.looped_cache import SharedLoopKVCache
from memops.nn import (
    BlockMoE,
    Engram,
    LoopedAttention,
    MoVEGate,
    ProductKeyMemory,
    RetentionAttention,
    RetentionGate,
    ValueEmbeddingBank,
)
from memops.retention import capacity_loss
from memops.retention_cache import RetentionKVCache


@dataclasses.dataclass
class MemoryLMConfig:
    """Sizes of a MemoryLM. ``pkm_layers``: indices of the layers whose FFN is a product-key memory."""

    vocab_size: int = 64  # token ids lie in [0, vocab_size)
    d_model: int = 64  # the residual width
    n_layers: int = 2
    n_heads: int = 4  # query heads of every attention layer
    n_kv_heads: int = 2  # key/value heads (GQA), also the retention gate's outputs
    max_positions: int = 256  # learned absolute positions
    prefix_length: int = 4  # learned memory rows per attention layer and KV head (prefix tuning; 0: none)
    pkm_layers: tuple[int, ...] = (1,)  # the layers whose FFN is a ProductKeyMemory (BlockMoE elsewhere)
    pkm_n_keys: int = 16  # sub-keys per half: n_keys**2 memory slots
    pkm_heads: int = 2
    pkm_topk: int = 4  # slots read per head and token
    pkm_key_dim: int = 16
    pkm_gated: bool = False  # Memory Layers at Scale's SiLU output gate
    moe_experts: int = 8
    moe_top_k: int = 2  # experts per token
    moe_d_expert: int = 64  # each expert's SwiGLU hidden size
    moe_block_size: int | None = 16  # dMoE's routing block (None: token-level routing)
    moe_min_experts: int = 4  # the smallest coreset of a block
    retention_hidden: int = 32  # the TRIM-KV retention gate's hidden size
    kv_budget: int = 64  # rows per layer and KV head the decoding cache keeps, and the capacity loss' M
    kv_buffer: int = 16  # rows the cache takes in before it compacts
    capacity_weight: float = 0.01  # weight of the capacity loss in loss()
    loops: int = 1  # > 1: a looped transformer (MELT), one shared KV cache per layer
    retention_in_attention: bool = True  # decay the sequence keys by retention inside training attention
    engram_layers: tuple[int, ...] = ()  # layers with an Engram hashed n-gram memory before attention
    engram_max_ngram: int = 3  # Engram's largest n-gram order (orders 2..this)
    engram_heads: int = 2  # hash heads per order
    engram_embed: int = 32  # embedding width per order (engram_heads divides it)
    engram_table: int = 1031  # the minimum table size per order and head (the primes start here)
    move_slots: int = 0  # > 0: MoVE, one bank of this many value embeddings per token id under every layer's V
    value_embeddings: str | None = None  # "layer": a value embedding per layer (LaVE: a bank of one slot each)

    def validate(self) -> None:
        def fail(message):
            raise ValueError(f"MemoryLMConfig: {message}")

        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "max_positions",
            "kv_budget",
            "loops",
        ):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            fail(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            fail(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.moe_block_size is not None and self.moe_block_size < 1:
            fail(f"moe_block_size must be None or >= 1, got {self.moe_block_size}")
        if self.kv_buffer < 0 or self.prefix_length < 0:
            fail("kv_buffer and prefix_length must be >= 0")
        for layer in self.pkm_layers:
            if not 0 <= layer < self.n_layers:
                fail(f"pkm_layers entry {layer} is not a layer index in [0, {self.n_layers})")
        for layer in self.engram_layers:
            if not 0 <= layer < self.n_layers:
                fail(f"engram_layers entry {layer} is not a layer index in [0, {self.n_layers})")
        if self.engram_layers and self.loops > 1:
            fail("engram_layers with loops > 1 is not supported (one Engram decode state per layer, not per loop)")
        if self.engram_layers and (self.engram_max_ngram < 2 or self.engram_embed % max(self.engram_heads, 1)):
            fail("engram_max_ngram must be >= 2 and engram_heads must divide engram_embed")
        for name in ("moe_experts", "moe_top_k", "moe_d_expert", "moe_min_experts", "retention_hidden"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.moe_top_k > self.moe_experts:
            fail(f"moe_top_k={self.moe_top_k} must not exceed moe_experts={self.moe_experts}")
        if not self.capacity_weight >= 0:
            fail(f"capacity_weight must be >= 0, got {self.capacity_weight}")
        if self.move_slots < 0:
            fail(f"move_slots must be >= 0, got {self.move_slots}")
        if self.value_embeddings not in (None, "layer"):
            fail(f"value_embeddings must be None or 'layer', got {self.value_embeddings!r}")
        if self.move_slots and self.value_embeddings:
            fail("move_slots (MoVE's shared bank) and value_embeddings='layer' (LaVE) are alternatives: pick one")


class MemoryLMLayer(nn.Module):
    def __init__(self, config: MemoryLMConfig, index: int) -> None:
        super().__init__()
        c = config
        self.attn_norm = nn.LayerNorm(c.d_model)
        attention = dict(num_kv_heads=c.n_kv_heads, causal=True, prefix_length=c.prefix_length)
        self.attn = (
            LoopedAttention(c.d_model, c.n_heads, **attention)
            if c.loops > 1
            else RetentionAttention(c.d_model, c.n_heads, decay=c.retention_in_attention, **attention)
        )
        self.retention = RetentionGate(c.d_model, c.n_kv_heads, hidden=c.retention_hidden)
        # MELT's gate: how much of the previous loop's key/value row each token keeps, per KV head
        self.loop_gate = nn.Linear(c.d_model, c.n_kv_heads) if c.loops > 1 else None
        # Engram (DeepSeek): hashed n-gram memory added to the residual before attention, as the demo's
        # TransformerBlock does; one hyper-connection stream (G = 1), the token ids hashed as they are.
        self.engram = None
        if index in c.engram_layers:
            self.engram = Engram(
                layer_id=index, hidden_size=c.d_model, hc_mult=1,
                vocab_sizes=[c.engram_table] * (c.engram_max_ngram - 1),
                max_ngram_size=c.engram_max_ngram, n_embed_per_ngram=c.engram_embed, n_head_per_ngram=c.engram_heads,
                kernel_size=4, pad_id=0, seed=0, tokenizer_vocab_size=c.vocab_size, layer_ids=sorted(c.engram_layers),
            )  # fmt: skip
        # Token-indexed value memory mixed into V (memops.value_embedding_mix): MoVE's router here, its bank
        # shared by the model; or LaVE, a one-slot bank of this layer's own.
        head_dim = c.d_model // c.n_heads
        slots = c.move_slots or (1 if c.value_embeddings == "layer" else 0)
        self.value_gate = MoVEGate(c.d_model, c.n_kv_heads, slots) if slots else None
        self.value_embedding = (
            ValueEmbeddingBank(c.vocab_size, 1, c.n_kv_heads, head_dim) if c.value_embeddings == "layer" else None
        )
        self.ffn_norm = nn.LayerNorm(c.d_model)
        if index in c.pkm_layers:
            self.ffn = ProductKeyMemory(
                c.d_model,
                c.d_model,
                n_keys=c.pkm_n_keys,
                heads=c.pkm_heads,
                topk=c.pkm_topk,
                key_dim=c.pkm_key_dim,
                query_norm="layernorm",
                gated=c.pkm_gated,
            )
        else:
            self.ffn = BlockMoE(
                c.d_model,
                c.moe_d_expert,
                c.moe_experts,
                c.moe_top_k,
                block_size=c.moe_block_size,
                min_experts=c.moe_min_experts,
            )

    def _loop_gate(self, h):
        return torch.sigmoid(self.loop_gate(h)).transpose(1, 2).unsqueeze(-1)  # (B, Hkv, N, 1)

    def forward(
        self, x, cache=None, layer_idx: int = 0, loop: int = 0, shared=None, tokens=None, engram_state=None,
        value_bank=None,
    ):  # fmt: skip
        """x (B, N, d) -> (x, log_beta (B, Hkv, N), shared). With a cache (generation) the new rows join it:
        a RetentionKVCache, or a SharedLoopKVCache in looped mode. ``shared`` carries the training-time
        looped cache, [prefix ; sequence] keys and values of the previous loop (None on loop 0). ``tokens``
        (B, N): the ids an Engram layer hashes and the value embeddings are read by; ``engram_state``: the
        Engram's decode state (generation); ``value_bank``: the model's MoVE bank."""
        if self.engram is not None:
            x = x + self.engram(x.unsqueeze(2), tokens, state=engram_state).squeeze(2)
        h = self.attn_norm(x)
        log_beta = self.retention(h).float()
        bank = self.value_embedding if self.value_embedding is not None else value_bank
        value_mix = None
        if self.value_gate is not None:  # (ids were checked by the model: no second host sync)
            value_mix = lambda v: bank(v, self.value_gate(h), tokens, check_ids=False)  # noqa: E731
        if self.loop_gate is not None:
            attended, shared = self.attn(
                h, self._loop_gate(h), shared=shared, cache=cache, layer_idx=layer_idx, loop=loop, value_mix=value_mix
            )
        else:
            attended = self.attn(
                h, log_beta, cache=cache, layer_idx=layer_idx, check_log_beta=False, value_mix=value_mix
            )
        x = x + attended
        return x + self.ffn(self.ffn_norm(x)), log_beta, shared


class MemoryLM(nn.Module):
    """Decoder-only LM from memops parts (see the module docstring). Learned absolute positions.

    ``forward(tokens)`` -> logits (B, N, vocab); ``loss(tokens, targets)`` adds the capacity loss;
    ``generate(prompt, max_new_tokens)`` decodes greedily with a bounded RetentionKVCache.
    """

    def __init__(self, config: MemoryLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.max_positions, config.d_model)
        self.layers = nn.ModuleList(MemoryLMLayer(config, i) for i in range(config.n_layers))
        # MoVE: one bank under every layer's V (each layer has its own router, MemoryLMLayer.value_gate)
        self.value_bank = (
            ValueEmbeddingBank(
                config.vocab_size, config.move_slots, config.n_kv_heads, config.d_model // config.n_heads
            )
            if config.move_slots
            else None
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def _check_tokens(self, tokens, name: str, op: str) -> None:
        """(B, N) integer token ids in [0, vocab_size) (one min/max check and a host sync, skipped under
        compile): embedding would otherwise fail inside torch, or read out of bounds on CUDA."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be integer token ids, got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"{op}: {name} must be (B, N) token ids, got shape {tuple(tokens.shape)}")
        if tokens.numel() and can_read_values(tokens):
            low, high = torch.stack(torch.aminmax(tokens)).tolist()
            if low < 0 or high >= self.config.vocab_size:
                raise IndexError(
                    f"{op}: {name} must lie in [0, vocab_size={self.config.vocab_size}), found [{low}, {high}]"
                )

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if start + tokens.shape[1] > self.config.max_positions:
            raise ValueError(
                f"MemoryLM: positions up to {start + tokens.shape[1]} exceed max_positions={self.config.max_positions}"
            )
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.embed(tokens) + self.positions(positions)

    def forward(self, tokens: torch.Tensor, *, return_log_beta: bool = False):
        """tokens (B, N) int64 -> logits (B, N, vocab_size) [, list of per-layer log_beta (B, Hkv, N)]."""
        self._check_tokens(tokens, "tokens", "MemoryLM")
        x = self._embed(tokens, 0)
        log_betas = []
        shared = [None] * len(self.layers)
        for loop in range(self.config.loops):
            for index, layer in enumerate(self.layers):
                x, log_beta, shared[index] = layer(
                    x, loop=loop, shared=shared[index], tokens=tokens, value_bank=self.value_bank
                )
                if loop == self.config.loops - 1:
                    log_betas.append(log_beta)
        logits = self.head(self.norm(x))
        return (logits, log_betas) if return_log_beta else logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
        """Cross-entropy over targets (B, N) plus capacity_weight x the layers' capacity losses for kv_budget."""
        logits, log_betas = self(tokens, return_log_beta=True)
        lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        capacity = sum(capacity_loss(lb, self.config.kv_budget, check_log_beta=False) for lb in log_betas)
        return lm + self.config.capacity_weight * capacity

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int):
        """Greedy decoding. prompt (B, N) -> (tokens (B, N + max_new_tokens), the cache): a RetentionKVCache of
        kv_budget + kv_buffer rows per layer and KV head, or with loops > 1 a SharedLoopKVCache.
        max_new_tokens >= 0; the prompt needs N >= 1 tokens to predict from; B = 0 returns (0, N +
        max_new_tokens) tokens and an empty cache."""
        op = "MemoryLM.generate"
        self._check_tokens(prompt, "prompt", op)
        check_int(max_new_tokens, "max_new_tokens", op, low=0)
        if prompt.shape[1] == 0:
            raise ValueError(f"{op}: prompt must hold at least one token per row, got shape {tuple(prompt.shape)}")
        total = prompt.shape[1] + max_new_tokens
        if total > self.config.max_positions:
            raise ValueError(
                f"MemoryLM.generate: prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_positions={self.config.max_positions}"
            )
        looped = self.config.loops > 1
        cache = (
            SharedLoopKVCache(len(self.layers))
            if looped
            else RetentionKVCache(self.config.kv_budget, self.config.kv_buffer)
        )
        if prompt.shape[0] == 0:
            return prompt.new_empty((0, total)), cache
        tokens, step_input, start = prompt, prompt, 0
        engram_states = [layer.engram.new_state(prompt.shape[0]) if layer.engram is not None else None
                         for layer in self.layers]  # fmt: skip
        for _ in range(max_new_tokens):
            x = self._embed(step_input, start)
            for loop in range(self.config.loops):
                for index, layer in enumerate(self.layers):
                    x, _, _ = layer(x, cache, index, loop, tokens=step_input, engram_state=engram_states[index],
                                    value_bank=self.value_bank)  # fmt: skip
            next_token = self.head(self.norm(x[:, -1])).argmax(-1, keepdim=True)
            start += step_input.shape[1]
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token
        return tokens, cache
