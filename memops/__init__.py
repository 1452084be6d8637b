"""memops: Triton GPU kernels for learnable-memory operations, with pure-PyTorch references.

Public ops run on backend "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or
"reference" (memops.reference); see :func:`backend` and the MEMOPS_BACKEND environment variable.
"""

from memops import (
    nn,  # noqa: F401 (memops.nn, the modules)
    optim,  # noqa: F401 (memops.optim: the row-sparse optimizers)
    varlen,  # noqa: F401 (memops.varlen: padded <-> packed conversions)
)
from memops._backend import BACKENDS, backend, get_backend
from memops.attention import memory_attention, memory_attention_varlen
from memops.engram import engram_gate, engram_lookup, ngram_hash, short_conv, short_conv_step
from memops.looped import looped_attention, looped_attention_varlen, looped_kv_update
from memops.looped_cache import SharedLoopKVCache
from memops.moe import block_route, moe_ffn, unique_experts
from memops.product_key import product_key_topk, weighted_gather
from memops.quantized import QuantizedTable, dequantize_table, quantize_table
from memops.retention import capacity_loss, retention_attention, retention_attention_varlen, retention_capacity
from memops.retention_cache import RetentionKVCache
from memops.value_embedding import value_embedding_mix

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "QuantizedTable",
    "RetentionKVCache",
    "SharedLoopKVCache",
    "backend",
    "block_route",
    "capacity_loss",
    "dequantize_table",
    "engram_gate",
    "engram_lookup",
    "get_backend",
    "looped_attention",
    "looped_attention_varlen",
    "looped_kv_update",
    "memory_attention",
    "memory_attention_varlen",
    "moe_ffn",
    "ngram_hash",
    "product_key_topk",
    "quantize_table",
    "retention_attention",
    "retention_attention_varlen",
    "retention_capacity",
    "short_conv",
    "short_conv_step",
    "unique_experts",
    "value_embedding_mix",
    "weighted_gather",
    "__version__",
]
