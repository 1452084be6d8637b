"""torch.nn.Modules built from memops ops."""
from memops.nn.attention import MemoryAttention
from memops.nn.product_key import ProductKeyMemory

__all__ = ["MemoryAttention", "ProductKeyMemory"]
