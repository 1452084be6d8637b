"""memops.product_key_topk: the fused Triton search (interpreter on CPU, real on CUDA) and the reference spec,
both against brute force over all n_keys**2 slots; gradients of queries and sub_keys; bad input; compile."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops import reference
from memops.kernels import product_key as kernels
from memops.testing import assert_close_to_reference, check_compiled_grads, count_launches

GATHER_KERNELS = ("weighted_gather_fwd_kernel", "weighted_gather_bwd_kernel", "values_grad_segment_kernel")


def make_inputs(T, heads, key_dim, n_keys, dtype, device, *, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    queries = torch.randn(T, heads, key_dim, generator=generator, device=device).to(dtype)
    sub_keys = torch.randn(heads, 2, n_keys, key_dim // 2, generator=generator, device=device).to(dtype)
    return queries, sub_keys


def brute_force(queries, sub_keys, topk):
    """Scores of every one of the n_keys**2 slots, then one top-k: the oracle, fine at small n_keys."""
    half = sub_keys.shape[3]
    s1 = torch.einsum("...hd,hnd->...hn", queries[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", queries[..., half:], sub_keys[:, 1])
    every_slot = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # slot i1 * n_keys + i2
    return every_slot, every_slot.topk(topk, dim=-1).values


def check_search(scores, indices, queries, sub_keys, topk, dtype):
    """The returned scores are the exact top-k (as a sorted multiset, within the dtype's tolerance), each
    index's recomputed slot score is its returned score, indices are distinct and in range."""
    n_keys = sub_keys.shape[2]
    assert scores.shape == indices.shape == (*queries.shape[:-1], topk) and indices.dtype == torch.int64
    every_slot, expected = brute_force(queries.double(), sub_keys.double(), topk)
    assert (scores[..., :-1] >= scores[..., 1:]).all(), "scores are not sorted descending"
    assert_close_to_reference(scores, expected, dtype, name="scores vs exact top-k")
    assert int(indices.min()) >= 0 and int(indices.max()) < n_keys * n_keys
    assert_close_to_reference(scores, every_slot.gather(-1, indices), dtype, name="scores at the returned indices")
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "a slot is returned twice for one (token, head)"


def search(backend, queries, sub_keys, topk):
    with memops.backend(backend), count_launches() as launches:
        scores, indices = memops.product_key_topk(queries, sub_keys, topk)
    return scores, indices, launches


# --- the Triton search against brute force ---------------------------------------------------------

SHAPES = {  # (T, Hm, Dk, n_keys, topk)
    "typical_small": (40, 2, 64, 24, 8),
    "topk_not_power_of_two": (21, 3, 32, 20, 5),
    "topk_is_n_keys": (9, 1, 16, 6, 6),
    "topk_1": (7, 2, 32, 11, 1),
    "half_dim_not_power_of_two": (12, 2, 24, 9, 4),
    "several_key_blocks": (5, 1, 32, 300, 16),  # n_keys > BLOCK_N: the running top-k merges blocks
    "one_key": (3, 2, 16, 1, 1),
    "k32": (6, 1, 32, 40, 32),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_matches_brute_force(case, device):
    T, heads, key_dim, n_keys, topk = SHAPES[case]
    queries, sub_keys = make_inputs(T, heads, key_dim, n_keys, torch.float32, device)
    scores, indices, launches = search("triton", queries, sub_keys, topk)
    assert launches["product_key_search_kernel"] == 1
    assert scores.dtype == torch.float32
    check_search(scores, indices, queries, sub_keys, topk, torch.float32)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.cuda),  # the interpreter's bf16 dots are wrong
        torch.float64,
    ],
)
def test_dtypes(dtype, device):
    queries, sub_keys = make_inputs(19, 2, 32, 15, dtype, device)
    scores, indices, launches = search("triton", queries, sub_keys, 6)
    assert launches["product_key_search_kernel"] == 1
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # fp64 ranks in fp32, then rescores exactly: the scores are fp64-exact at the returned slots.
    check_search(scores, indices, queries, sub_keys, 6, torch.float32 if dtype == torch.float64 else dtype)
    if dtype == torch.float64:
        every_slot, _ = brute_force(queries, sub_keys, 6)
        assert_close_to_reference(scores, every_slot.gather(-1, indices), torch.float64)


def test_tf32_follows_torch_matmul_precision(device):
    queries, sub_keys = make_inputs(10, 2, 64, 12, torch.float32, device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        scores, indices, _ = search("triton", queries, sub_keys, 4)
    finally:
        torch.set_float32_matmul_precision(before)
    check_search(scores, indices, queries, sub_keys, 4, "tf32")


def test_leading_dims(device):
    queries, sub_keys = make_inputs(12, 2, 16, 7, torch.float32, device)
    scores, indices, _ = search("triton", queries.reshape(3, 4, 2, 16), sub_keys, 3)
    flat_scores, flat_indices, _ = search("triton", queries, sub_keys, 3)
    assert scores.shape == (3, 4, 2, 3)
    assert torch.equal(scores.reshape(12, 2, 3), flat_scores) and torch.equal(indices.reshape(12, 2, 3), flat_indices)


def test_ties_still_give_distinct_slots(device):
    # Every sub-key equal: all n_keys**2 slots tie; the result must still be topk distinct slots.
    queries, _ = make_inputs(5, 1, 16, 8, torch.float32, device)
    sub_keys = torch.ones(1, 2, 8, 8, device=device)
    scores, indices, _ = search("triton", queries, sub_keys, 5)
    check_search(scores, indices, queries, sub_keys, 5, torch.float32)


def test_nan_query_gives_nan_scores_for_its_row_only(device):
    queries, sub_keys = make_inputs(6, 2, 16, 9, torch.float32, device)
    queries[2, 1, 3] = float("nan")
    scores, indices, _ = search("triton", queries, sub_keys, 4)
    assert scores[2, 1].isnan().all()
    clean = torch.ones(6, 2, dtype=torch.bool)
    clean[2, 1] = False
    assert not scores[clean].isnan().any()
    assert int(indices.min()) >= 0 and int(indices.max()) < 81


def test_empty_token_dimension(device):
    queries, sub_keys = make_inputs(0, 2, 16, 9, torch.float32, device)
    scores, indices, _ = search("triton", queries, sub_keys, 4)
    assert scores.shape == indices.shape == (0, 2, 4)


@given(
    T=st.integers(1, 40),
    heads=st.integers(1, 3),
    half=st.sampled_from([4, 8, 12, 16]),
    n_keys=st.integers(1, 40),
    topk_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(T, heads, half, n_keys, topk_fraction, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    queries, sub_keys = make_inputs(T, heads, 2 * half, n_keys, torch.float32, device, seed=seed)
    topk = max(1, min(n_keys, round(topk_fraction * min(n_keys, 16))))
    scores, indices, _ = search("triton", queries, sub_keys, topk)
    check_search(scores, indices, queries, sub_keys, topk, torch.float32)


# --- gradients -------------------------------------------------------------------------------------


def run_with_grads(backend, queries, sub_keys, topk, grad_scores=None):
    queries = queries.detach().clone().requires_grad_()
    sub_keys = sub_keys.detach().clone().requires_grad_()
    with memops.backend(backend), count_launches() as launches:
        scores, indices = memops.product_key_topk(queries, sub_keys, topk)
        if grad_scores is None:
            grad_scores = torch.randn_like(scores)
        scores.backward(grad_scores)
    return indices, grad_scores, queries.grad, sub_keys.grad, launches


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("values_grad_path", ["atomic", "segment"])
def test_gradients_match_float64_reference(dtype, values_grad_path, monkeypatch, device):
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: values_grad_path)
    queries, sub_keys = make_inputs(17, 2, 32, 10, dtype, device)
    indices, grad_scores, grad_queries, grad_keys, launches = run_with_grads("triton", queries, sub_keys, 5)
    assert launches["weighted_gather_fwd_kernel"] == 1  # dq
    assert (
        launches["values_grad_segment_kernel" if values_grad_path == "segment" else "weighted_gather_bwd_kernel"] == 1
    )
    assert grad_queries.dtype == dtype and grad_keys.dtype == dtype
    # The spec's backward at the slots the kernel chose (ties could pick other slots than the reference).
    ref_queries, ref_keys = reference.product_key_topk_backward(
        grad_scores.double(), queries.double(), sub_keys.double(), indices
    )
    assert_close_to_reference(grad_queries, ref_queries, dtype, name="grad queries")
    assert_close_to_reference(grad_keys, ref_keys, dtype, name="grad sub_keys")
    selected = torch.zeros(2, 2, 10, dtype=torch.bool, device=device)
    for h in range(2):
        selected[h, 0, indices[:, h].flatten() // 10] = True
        selected[h, 1, indices[:, h].flatten() % 10] = True
    assert not grad_keys.ne(0).any(-1)[~selected].any(), "sub-key rows never selected got a gradient"


def test_triton_and_reference_backends_agree(device):
    queries, sub_keys = make_inputs(11, 2, 16, 8, torch.float32, device)
    grad_scores = torch.randn(11, 2, 4, device=device)
    triton_run = run_with_grads("triton", queries, sub_keys, 4, grad_scores)
    reference_run = run_with_grads("reference", queries.cpu(), sub_keys.cpu(), 4, grad_scores.cpu())
    assert sum(reference_run[4].values()) == 0
    assert torch.equal(triton_run[0].cpu(), reference_run[0])
    assert_close_to_reference(triton_run[2], reference_run[2], torch.float32)
    assert_close_to_reference(triton_run[3], reference_run[3], torch.float32)


@pytest.mark.usefixtures("deterministic")
def test_deterministic_sub_key_grad_is_bit_identical(monkeypatch, device):
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: "atomic")
    # Few sub-keys and many tokens: each selected row sums many terms, so order would show in the bits.
    queries, sub_keys = make_inputs(64, 1, 16, 4, torch.float32, device)
    grad_scores = torch.randn(64, 1, 4, device=device)
    runs = [run_with_grads("triton", queries, sub_keys, 4, grad_scores) for _ in range(2)]
    assert all(run[4]["values_grad_segment_kernel"] == 1 and run[4]["weighted_gather_bwd_kernel"] == 0 for run in runs)
    assert torch.equal(runs[0][3], runs[1][3])


def test_deterministic_flag_without_the_global_switch(monkeypatch, device):
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: "atomic")
    assert not torch.are_deterministic_algorithms_enabled()
    queries, sub_keys = make_inputs(16, 1, 16, 4, torch.float32, device)
    sub_keys.requires_grad_()
    for deterministic in (False, True):
        with memops.backend("triton"), count_launches() as launches:
            memops.product_key_topk(queries, sub_keys, 3, deterministic=deterministic)[0].sum().backward()
        assert launches["values_grad_segment_kernel"] == int(deterministic), (deterministic, dict(launches))


def test_only_the_needed_grad_is_computed(device):
    queries, sub_keys = make_inputs(8, 1, 16, 6, torch.float32, device)
    queries.requires_grad_()
    with memops.backend("triton"), count_launches() as launches:
        memops.product_key_topk(queries, sub_keys, 3)[0].sum().backward()
    assert queries.grad is not None and sub_keys.grad is None
    assert launches["weighted_gather_fwd_kernel"] == 1
    assert launches["weighted_gather_bwd_kernel"] == launches["values_grad_segment_kernel"] == 0


def test_fp64_gradcheck_on_triton_path(device):
    # fast_mode: one random direction instead of one interpreted search per perturbed input element.
    queries, sub_keys = make_inputs(5, 2, 8, 6, torch.float64, device)
    queries.requires_grad_(), sub_keys.requires_grad_()
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(
            lambda q, c: memops.product_key_topk(q, c, 3)[0], (queries, sub_keys), fast_mode=True
        )


def test_opcheck(device):
    queries, sub_keys = make_inputs(6, 2, 16, 7, torch.float32, device)
    queries.requires_grad_(), sub_keys.requires_grad_()
    # the custom op is the Triton path (backend "reference" calls memops.reference directly)
    torch.library.opcheck(torch.ops.memops.product_key_topk.default, (queries, sub_keys, 3, False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, device):
    if backend == "reference":
        device = "cpu"
    queries, sub_keys = make_inputs(9, 2, 16, 7, torch.float32, device)

    def loss(q, c):
        scores, indices = memops.product_key_topk(q, c, 3)
        return (scores.softmax(-1) * (indices % 5)).sum()

    check_compiled_grads(loss, [queries, sub_keys], backend=backend, device=device, kernel="product_key_search_kernel")


# --- the reference (the spec) ------------------------------------------------------------------------


@given(
    T=st.integers(1, 6),
    heads=st.integers(1, 3),
    n_keys=st.integers(1, 12),
    half=st.sampled_from([1, 4, 8]),
    topk_fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_brute_force(T, heads, n_keys, half, topk_fraction, seed):
    queries, sub_keys = make_inputs(T, heads, 2 * half, n_keys, torch.float64, "cpu", seed=seed)
    topk = max(1, round(topk_fraction * n_keys))
    scores, indices, launches = search("reference", queries, sub_keys, topk)
    assert sum(launches.values()) == 0
    every_slot, expected = brute_force(queries, sub_keys, topk)
    torch.testing.assert_close(scores, expected)  # the exact top-k scores, sorted
    assert torch.equal(every_slot.gather(-1, indices), scores)  # indices consistent with scores
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # no slot twice in a row


def test_reference_leading_dims_and_dtypes():
    queries = torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)
    sub_keys = torch.randn(4, 2, 10, 8, dtype=torch.bfloat16)
    scores, indices = reference.product_key_topk(queries, sub_keys, 5)
    assert scores.shape == (2, 3, 4, 5) and scores.dtype == torch.float32
    assert int(indices.max()) < 100 and int(indices.min()) >= 0


def test_reference_gradients_reach_queries_and_only_selected_sub_keys():
    queries, sub_keys = make_inputs(5, 2, 8, 12, torch.float64, "cpu")
    queries.requires_grad_(), sub_keys.requires_grad_()
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


def test_reference_backward_matches_autograd():
    queries, sub_keys = make_inputs(7, 3, 12, 9, torch.float64, "cpu")
    queries.requires_grad_(), sub_keys.requires_grad_()
    scores, indices = reference.product_key_topk(queries, sub_keys, 4)
    grad_scores = torch.randn_like(scores)
    scores.backward(grad_scores)
    grad_queries, grad_keys = reference.product_key_topk_backward(
        grad_scores, queries.detach(), sub_keys.detach(), indices
    )
    torch.testing.assert_close(grad_queries, queries.grad)
    torch.testing.assert_close(grad_keys, sub_keys.grad)


# --- bad input: a clear error naming the argument, before any kernel launches -----------------------

BAD_INPUTS = {
    "odd_key_dim": (lambda q, c, k: (q[..., :-1], c, k), ValueError, "Dk must be even"),
    "queries_1d": (lambda q, c, k: (q[0, 0], c, k), ValueError, r"queries must be \(..., Hm, Dk\)"),
    "heads_mismatch": (lambda q, c, k: (q, c[:1], k), ValueError, r"sub_keys must be \(Hm=2, 2, n_keys"),
    "half_dim_mismatch": (lambda q, c, k: (q, c[..., :-1], k), ValueError, r"sub_keys must be \(Hm=2"),
    "three_tables": (lambda q, c, k: (q, torch.cat([c, c[:, :1]], 1), k), ValueError, r"sub_keys must be \(Hm=2"),
    "sub_keys_3d": (lambda q, c, k: (q, c[:, 0], k), ValueError, r"sub_keys must be \(Hm=2"),
    "topk_too_large": (lambda q, c, k: (q, c, 11), ValueError, r"topk must be in \[1, n_keys=10\]"),
    "topk_zero": (lambda q, c, k: (q, c, 0), ValueError, r"topk must be in \[1, n_keys=10\]"),
    "topk_float": (lambda q, c, k: (q, c, 2.0), TypeError, "topk must be an int"),
    "int_queries": (lambda q, c, k: (q.long(), c, k), TypeError, "queries must be a floating-point"),
    "int_sub_keys": (lambda q, c, k: (q, c.long(), k), TypeError, "sub_keys must be a floating-point"),
    "mixed_dtypes": (
        lambda q, c, k: (q, c.double(), k),
        TypeError,
        "sub_keys is torch.float64 but queries is torch.float32",
    ),
    "queries_not_tensor": (lambda q, c, k: (q.tolist(), c, k), TypeError, "queries must be a torch.Tensor"),
    "mixed_devices": (lambda q, c, k: (q, c.to("meta"), k), ValueError, "sub_keys is on meta but queries is on"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case, backend, device):
    make_bad, error, message = BAD_INPUTS[case]
    queries, sub_keys = make_inputs(4, 2, 16, 10, torch.float32, device if backend == "triton" else "cpu")
    with memops.backend(backend), count_launches() as launches, pytest.raises(error, match=message):
        memops.product_key_topk(*make_bad(queries, sub_keys, 3))
    assert sum(launches.values()) == 0


def test_triton_slot_limit_names_the_fix(device):
    queries, sub_keys = make_inputs(1, 1, 2, 46341, torch.float32, device)
    with memops.backend("triton"), count_launches() as launches:
        with pytest.raises(ValueError, match=r"n_keys\*\*2 < 2\*\*31, got n_keys=46341; use backend 'reference'"):
            memops.product_key_topk(queries, sub_keys, 2)
    assert sum(launches.values()) == 0


# --- GPU acceptance: the same checks at real sizes -----------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype, key_dim, n_keys",
    [
        (torch.bfloat16, 512, 1024),  # Memory Layers at Scale
        # XLM's geometry in 16-bit: fp32 searches run the reference under "auto" on CUDA (the FMA score dots
        # spill), so forcing the kernel there would only compile a variant no user launches
        (torch.bfloat16, 256, 512),
        (torch.float16, 256, 512),
    ],
)
def test_cuda_real_shapes(dtype, key_dim, n_keys):
    queries, sub_keys = make_inputs(1024, 4, key_dim, n_keys, dtype, "cuda")
    indices, grad_scores, grad_queries, grad_keys, launches = run_with_grads("triton", queries, sub_keys, 32)
    scores, _ = memops.product_key_topk(queries, sub_keys, 32)
    # The float64 reference search (itself checked against brute force) is the oracle at this size.
    expected, _ = reference.product_key_topk(queries.double(), sub_keys.double(), 32)
    assert_close_to_reference(scores, expected, dtype, name="scores")
    ref_queries, ref_keys = reference.product_key_topk_backward(
        grad_scores.double(), queries.double(), sub_keys.double(), indices
    )
    assert_close_to_reference(grad_queries, ref_queries, dtype, name="grad queries")
    assert_close_to_reference(grad_keys, ref_keys, dtype, name="grad sub_keys")
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
