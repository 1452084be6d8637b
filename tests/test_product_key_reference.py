"""memops.reference.product_key_topk (the spec of the product-key search, issue 4) against brute force over
all n_keys**2 slots, and its gradients."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from memops import reference


def brute_force(queries, sub_keys, topk):
    """Scores of every one of the n_keys**2 slots, then one top-k: the oracle, fine at small n_keys."""
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    s1 = torch.einsum("...hd,hnd->...hn", queries[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", queries[..., half:], sub_keys[:, 1])
    every_slot = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)     # slot i1 * n_keys + i2
    return every_slot, every_slot.topk(topk, dim=-1).values


@given(T=st.integers(1, 6), heads=st.integers(1, 3), n_keys=st.integers(1, 12), half=st.sampled_from([1, 4, 8]),
       topk_fraction=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_matches_brute_force(T, heads, n_keys, half, topk_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(T, heads, 2 * half, generator=generator, dtype=torch.float64)
    sub_keys = torch.randn(heads, 2, n_keys, half, generator=generator, dtype=torch.float64)
    topk = max(1, round(topk_fraction * n_keys))
    scores, indices = reference.product_key_topk(queries, sub_keys, topk)
    every_slot, expected = brute_force(queries, sub_keys, topk)
    assert scores.shape == indices.shape == (T, heads, topk) and indices.dtype == torch.int64
    torch.testing.assert_close(scores, expected)                            # the exact top-k scores, sorted
    assert torch.equal(every_slot.gather(-1, indices), scores)              # indices consistent with scores
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()                 # no slot twice in a row


def test_leading_dims_and_dtypes():
    queries = torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)
    sub_keys = torch.randn(4, 2, 10, 8, dtype=torch.bfloat16)
    scores, indices = reference.product_key_topk(queries, sub_keys, 5)
    assert scores.shape == (2, 3, 4, 5) and scores.dtype == torch.float32
    assert int(indices.max()) < 100 and int(indices.min()) >= 0


def test_gradients_reach_queries_and_only_selected_sub_keys():
    queries = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    sub_keys = torch.randn(2, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, c: reference.product_key_topk(q, c, 3)[0], (queries, sub_keys))
    scores, indices = reference.product_key_topk(queries, sub_keys, 3)
    scores.sum().backward()
    used_first = torch.zeros(2, 12, dtype=torch.bool)
    used_second = torch.zeros(2, 12, dtype=torch.bool)
    for h in range(2):
        used_first[h, (indices[:, h] // 12).flatten()] = True
        used_second[h, (indices[:, h] % 12).flatten()] = True
    assert (sub_keys.grad[:, 0].abs().sum(-1) > 0).eq(used_first).all()
    assert (sub_keys.grad[:, 1].abs().sum(-1) > 0).eq(used_second).all()
