"""torch.nn.Modules built from memops ops."""
from memops.nn.attention import MemoryAttention
from memops.nn.product_key import ProductKeyMemory
from memops.nn.retention import RetentionGate

__all__ = ["MemoryAttention", "ProductKeyMemory", "RetentionGate"]
