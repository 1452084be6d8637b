"""memops.nn.RetentionAttention and memops.nn.LoopedAttention: the layer of MemoryAttention with TRIM-KV's decay
and MELT's shared looped cache. Each equals the hand-written composition of the public ops it wraps, on both
backends (the Triton path launches under the interpreter), with gradients into every parameter, and shares
MemoryAttention's state-dict keys."""

import pytest
import torch

import memops
from memops import reference
from memops.nn import LoopedAttention, MemoryAttention, RetentionAttention
from memops.testing import assert_close_to_reference, count_launches


def heads(layer, x):
    B, N, _ = x.shape
    d = layer.head_dim

    def split(t, h):
        return t.view(B, N, h, d).transpose(1, 2)

    return (
        split(layer.q_proj(x), layer.num_heads),
        split(layer.k_proj(x), layer.num_kv_heads),
        split(layer.v_proj(x), layer.num_kv_heads),
    )


def merged(layer, out):
    return layer.out_proj(out.transpose(1, 2).flatten(2))


def grads(layer, x, out):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()], allow_unused=True)


def assert_layer_matches(layer, x, out, got_grads, expected):
    """out and the grads of x and every parameter equal those of the hand-written ``expected`` (fp64)."""
    assert_close_to_reference(out, expected, torch.float64, name="out")
    for g, e in zip(got_grads, grads(layer, x, expected)):
        assert g is not None and e is not None
        assert_close_to_reference(g, e, torch.float64, name="grad")


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


def test_attention_forms_share_memory_attention_state_dict():
    torch.manual_seed(0)
    plain = MemoryAttention(32, 4, num_kv_heads=2, prefix_length=3, causal=True)
    for form in (
        RetentionAttention(32, 4, num_kv_heads=2, prefix_length=3),
        LoopedAttention(32, 4, num_kv_heads=2, prefix_length=3, causal=True),
    ):
        form.load_state_dict(plain.state_dict())
        assert form.state_dict().keys() == plain.state_dict().keys()
        for key, value in plain.state_dict().items():
            assert torch.equal(form.state_dict()[key], value)
