"""Helpers for the generation tests (tests/test_memory_lm.py, tests/test_nn_value_embedding.py,
tests/test_hf_integration.py): the tiny MemoryLM, and greedy decoding by full recomputation, the reference every
cached generate is compared with."""

import torch

from memops.models import MemoryLM, MemoryLMConfig
from memops.testing import TINY_MEMORY_LM


def tiny_model(**overrides) -> MemoryLM:
    """A MemoryLM of every part at the smallest sizes (seed 0, eval mode), with ``overrides`` to its config."""
    torch.manual_seed(0)
    return MemoryLM(MemoryLMConfig(**{**TINY_MEMORY_LM, **overrides})).eval()


def greedy(logits_of, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``prompt`` (B, N) extended by ``new_tokens`` greedy tokens, each from ``logits_of(tokens)`` (B, n, vocab)
    over the whole sequence so far (no cache)."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, logits_of(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens
