"""torch.nn.Modules built from memops ops."""
from memops.nn.attention import MemoryAttention

__all__ = ["MemoryAttention"]
