"""Helpers for the attention-layer tests (tests/test_nn_retention.py, tests/test_nn_looped.py): a layer's
heads and output projection, and the check that a layer equals the hand-written composition of its ops."""

import torch

from memops.testing import assert_close_to_reference


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
