"""Models assembled from memops parts."""

from memops.models.memory_lm import MemoryLM, MemoryLMConfig

__all__ = ["MemoryLM", "MemoryLMConfig"]
