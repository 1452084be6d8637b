"""torch.nn.Modules built from memops ops."""

from memops.nn.attention import MemoryAttention, RotaryEmbedding
from memops.nn.engram import Engram, EngramState
from memops.nn.looped import LoopedAttention
from memops.nn.moe import BlockMoE
from memops.nn.product_key import ProductKeyMemory
from memops.nn.quantized import QuantizedEmbedding
from memops.nn.retention import RetentionAttention, RetentionGate
from memops.nn.value_embedding import MoVEGate, ValueEmbeddingBank

__all__ = [
    "BlockMoE",
    "Engram",
    "EngramState",
    "LoopedAttention",
    "MemoryAttention",
    "MoVEGate",
    "ProductKeyMemory",
    "QuantizedEmbedding",
    "RetentionAttention",
    "RetentionGate",
    "RotaryEmbedding",
    "ValueEmbeddingBank",
]
