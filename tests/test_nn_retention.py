"""memops.nn.RetentionAttention: the layer of MemoryAttention with TRIM-KV's decay. It equals the hand-written
composition of the public ops it wraps, on both backends (the Triton path launches under the interpreter),
with gradients into every parameter, decodes through its cache, and is causal only."""

import pytest
import torch
from attention_layers import assert_layer_matches, grads, heads, merged

import memops
from memops import reference
from memops.nn import MemoryAttention, RetentionAttention
from memops.testing import assert_close_to_reference, count_launches


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_retention_attention_layer_matches_its_ops(backend):
    torch.manual_seed(0)
    layer = RetentionAttention(64, 4, num_kv_heads=2, prefix_length=3).double()
    x = torch.randn(2, 9, 64, dtype=torch.float64, requires_grad=True)
    log_beta = -torch.rand(2, 2, 9, dtype=torch.float64)
    with memops.backend(backend), count_launches() as launches:
        out = layer(x, log_beta)
        got = grads(layer, x, out)
    assert (launches["retention_attention_fwd_kernel"] > 0) == (backend == "triton")
    q, k, v = heads(layer, x)
    expected = merged(
        layer, reference.retention_attention(q, k, v, log_beta, mem_k=layer.prefix_k, mem_v=layer.prefix_v)
    )
    assert_layer_matches(layer, x, out, got, expected)


def test_retention_attention_layer_decodes_through_the_cache():
    torch.manual_seed(0)
    layer = RetentionAttention(32, 4, num_kv_heads=2, prefix_length=2)
    x = torch.randn(1, 5, 32)
    log_beta = -torch.rand(1, 2, 5)
    cache = memops.RetentionKVCache(budget=4, buffer=2)
    with memops.backend("reference"):
        out = layer(x, log_beta, cache=cache, layer_idx=0)
        q, k, v = heads(layer, x)
        expected = merged(layer, reference.memory_attention(q, k, v, layer.prefix_k, layer.prefix_v, causal=True))
    assert_close_to_reference(out, expected, torch.float32)
    assert cache.get_seq_length(0) == 5


def test_retention_attention_layer_without_decay_is_causal_memory_attention():
    torch.manual_seed(0)
    layer = RetentionAttention(32, 4, prefix_length=2, decay=False)
    plain = MemoryAttention(32, 4, prefix_length=2, causal=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 32)
    with memops.backend("reference"):
        assert_close_to_reference(layer(x, -torch.rand(2, 4, 6)), plain(x), torch.float32)


def test_retention_attention_layer_is_causal_only():
    with pytest.raises(ValueError, match="causal"):
        RetentionAttention(32, 4, causal=False)
