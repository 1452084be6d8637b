"""memops.nn.LoopedAttention: the layer of MemoryAttention with MELT's shared looped cache. It equals the
hand-written composition of the public ops it wraps, on both backends (the Triton path launches under the
interpreter), with gradients into every parameter."""

import pytest
import torch
from attention_layers import assert_layer_matches, grads, heads, merged

import memops
from memops import reference
from memops.nn import LoopedAttention
from memops.testing import count_launches


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_looped_attention_layer_matches_its_ops(backend):
    torch.manual_seed(0)
    layer = LoopedAttention(64, 4, num_kv_heads=2, prefix_length=2, causal=True).double()
    x0 = torch.randn(2, 7, 64, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(2, 2, 7, 1, dtype=torch.float64)
    with memops.backend(backend), count_launches() as launches:
        first, shared = layer(x0, gate)
        second, shared = layer(first, gate, shared=shared)
        got = grads(layer, x0, second)
    assert (launches["looped_attention_fwd_kernel"] > 0) == (backend == "triton")
    assert shared[0].shape == (2, 2, 2 + 7, 16)

    def by_hand(x, k_cache=None, v_cache=None):
        q, k, v = heads(layer, x)
        if k_cache is None:  # loop 0: [prefix ; k] as it is
            prefix = (layer.prefix_k.expand(2, -1, -1, -1), layer.prefix_v.expand(2, -1, -1, -1))
            k_cache, v_cache = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
            return (merged(layer, reference.memory_attention(q, k_cache, v_cache, causal=True)), k_cache, v_cache)
        out, k_cache, v_cache = reference.looped_attention(q, k, v, gate, k_cache, v_cache, causal=True)
        return merged(layer, out), k_cache, v_cache

    expected, k_cache, v_cache = by_hand(x0)
    expected, _, _ = by_hand(expected, k_cache, v_cache)
    assert_layer_matches(layer, x0, second, got, expected)
