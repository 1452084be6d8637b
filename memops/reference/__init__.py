"""The pure-PyTorch definition of every memops op. Each function here is the spec of the public op with
the same name, and the implementation of backend ``"reference"``."""

from memops.reference import (
    engram,  # noqa: F401 (memops.reference.engram: hash parameters, hash, lookup)
    optim,  # noqa: F401 (memops.reference.optim: the row-sparse optimizer updates)
    quantized,  # noqa: F401 (memops.reference.quantized: 8-bit tables)
)
from memops.reference.attention import memory_attention
from memops.reference.attention_varlen import (
    looped_attention_varlen,
    memory_attention_varlen,
    retention_attention_varlen,
)
from memops.reference.looped import looped_attention, looped_blend, looped_kv_update, looped_kv_update_backward
from memops.reference.moe import (
    block_route,
    moe_ffn,
    router_scores,
    routing_weights,
    routing_weights_backward,
    unique_experts,
)
from memops.reference.product_key import (
    product_key_search_as_gather,
    product_key_topk,
    product_key_topk_backward,
    weighted_gather,
    weighted_gather_backward,
)
from memops.reference.retention import (
    capacity_loss,
    capacity_loss_from,
    document_bounds,
    retention_attention,
    retention_capacity,
    retention_keep,
)
from memops.reference.value_embedding import value_embedding_mix

__all__ = [
    "memory_attention",
    "memory_attention_varlen",
    "retention_attention_varlen",
    "looped_attention_varlen",
    "product_key_search_as_gather",
    "product_key_topk",
    "product_key_topk_backward",
    "weighted_gather",
    "weighted_gather_backward",
    "block_route",
    "moe_ffn",
    "router_scores",
    "routing_weights",
    "routing_weights_backward",
    "unique_experts",
    "capacity_loss",
    "capacity_loss_from",
    "document_bounds",
    "looped_attention",
    "looped_blend",
    "looped_kv_update",
    "looped_kv_update_backward",
    "retention_attention",
    "retention_capacity",
    "retention_keep",
    "value_embedding_mix",
]
