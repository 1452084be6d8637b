"""memops.weighted_gather: the Triton kernels (interpreter on CPU, real on CUDA) against the float64
reference, gradients of every differentiable input, the deterministic mode, bad inputs, compile."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops import reference
from memops.kernels import product_key as kernels
from memops.testing import assert_close_to_reference, count_launches, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(T, K, S, D, dtype, device, *, index_dtype=torch.int64, weights_dtype=None, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    values = torch.randn(S, D, generator=generator, device=device).to(dtype)
    indices = torch.randint(0, S, (T, K), generator=generator, device=device).to(index_dtype)
    weights = torch.rand(T, K, generator=generator, device=device).add_(0.1).to(weights_dtype or dtype)
    return values, indices, weights


def run_with_grads(backend, values, indices, weights, grad_out=None):
    """Forward and backward on one backend; returns (out, grad_values, grad_weights, launches)."""
    values = values.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    with memops.backend(backend), count_launches() as launches:
        out = memops.weighted_gather(values, indices, weights)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
    return out, values.grad, weights.grad, launches


def float64_reference(values, indices, weights, grad_out):
    v, w, g = values.double(), weights.double(), grad_out.double()
    out = reference.weighted_gather(v, indices, w)
    grad_values, grad_weights = reference.weighted_gather_backward(g, v, indices, w)
    return out, grad_values, grad_weights


@pytest.fixture(params=["segment", "atomic"])
def values_grad_path(request, monkeypatch):
    """Both values-grad kernels, whatever "auto" would pick for the test's shape and dtype."""
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: request.param)
    return request.param


def check_against_float64(values, indices, weights, *, dtype, values_grad_path=None):
    """Triton forward + backward against the float64 reference. The reference runs on the rows that were
    read (a compact copy of the table, so multi-GB tables stay cheap); every other row of the values
    grad must be exactly zero."""
    grad_out = torch.randn(*indices.shape[:-1], values.shape[1], device=values.device).to(dtype)
    out, grad_values, grad_weights, launches = run_with_grads("triton", values, indices, weights, grad_out)
    assert launches["weighted_gather_fwd_kernel"] == 1
    assert launches["weighted_gather_bwd_kernel"] == 1
    # values_grad_path None: whichever kernel "auto" picks (deterministic mode: always the segment one).
    if torch.are_deterministic_algorithms_enabled():
        values_grad_path = "segment"
    if values_grad_path == "segment":  # 1 launch, or 2-3 when hot rows are cut into chunks
        assert launches["values_grad_segment_kernel"] >= 1
    elif values_grad_path == "atomic":
        assert launches["values_grad_segment_kernel"] == 0
    assert out.dtype == values.dtype and grad_values.dtype == values.dtype and grad_weights.dtype == weights.dtype
    K, D = indices.shape[-1], values.shape[1]
    rows, local_indices = torch.unique(indices.reshape(-1, K), return_inverse=True)
    ref_out, ref_grad_rows, ref_gw = float64_reference(
        values[rows], local_indices, weights.reshape(-1, K), grad_out.reshape(-1, D)
    )
    assert_close_to_reference(out.reshape(ref_out.shape), ref_out, dtype, name="out")
    assert_close_to_reference(grad_values[rows], ref_grad_rows, dtype, name="grad_values")
    untouched = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    untouched[rows] = False
    assert not grad_values.ne(0).any(dim=1)[untouched].any(), "grad_values: rows never read are not zero"
    assert_close_to_reference(grad_weights.reshape(ref_gw.shape), ref_gw, dtype, name="grad_weights")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_matches_float64_reference(dtype, index_dtype, values_grad_path, device):
    values, indices, weights = make_inputs(13, 7, 40, 96, dtype, device, index_dtype=index_dtype)
    check_against_float64(values, indices, weights, dtype=dtype, values_grad_path=values_grad_path)


@pytest.mark.usefixtures("poison_empty", "deterministic")
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_mode_always_takes_the_segment_kernel(dtype, monkeypatch, device):
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: "atomic")
    monkeypatch.setattr(kernels, "LONG_SEGMENT", 0)
    values, indices, weights = make_inputs(13, 7, 40, 96, dtype, device)
    check_against_float64(values, indices, weights, dtype=dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", ["duplicates", "k1", "large_d", "odd_d", "one_row_table", "leading_dims"])
def test_awkward_shapes(case, values_grad_path, device):
    dtype = torch.float32
    if case == "duplicates":
        # Every token picks the same few rows, several times in one row of indices.
        values, _, weights = make_inputs(11, 9, 30, 40, dtype, device)
        indices = torch.tensor([3, 3, 7, 3, 0, 7, 7, 29, 3], device=device).repeat(11, 1)
    elif case == "k1":
        values, indices, weights = make_inputs(10, 1, 50, 64, dtype, device)
    elif case == "large_d":
        values, indices, weights = make_inputs(3, 5, 20, 2500, dtype, device)
    elif case == "odd_d":
        values, indices, weights = make_inputs(6, 3, 17, 1, dtype, device)
    elif case == "one_row_table":
        values, indices, weights = make_inputs(5, 4, 1, 33, dtype, device)
    else:
        values, indices, weights = make_inputs(12, 6, 25, 48, dtype, device)
        indices, weights = indices.reshape(2, 3, 2, 6), weights.reshape(2, 3, 2, 6)
    check_against_float64(values, indices, weights, dtype=dtype, values_grad_path=values_grad_path)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("deterministic_mode", [False, True])
def test_deterministic_values_grad_is_bit_identical(deterministic_mode, monkeypatch, device):
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: "atomic")
    # Heavy duplication, so the order of additions decides the last bits of each row's grad.
    values, indices, weights = make_inputs(64, 16, 6, 64, torch.float32, device)
    grad_out = torch.randn(64, 64, device=device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        runs = [run_with_grads("triton", values, indices, weights, grad_out) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    if deterministic_mode:
        for _, grad_values, grad_weights, launches in runs:
            assert launches["values_grad_segment_kernel"] == 1
            assert torch.equal(grad_values, runs[0][1]) and torch.equal(grad_weights, runs[0][2])
    _, ref_gv, _ = float64_reference(values, indices, weights, grad_out)
    for run in runs:
        assert_close_to_reference(run[1], ref_gv, torch.float32, name="grad_values")


@pytest.mark.usefixtures("poison_empty", "deterministic")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_hot_rows_are_cut_into_chunks(dtype, monkeypatch, device):
    # Rows picked more than SEGMENT_CHUNK times: short rows in one pass, long ones as fp32 chunk partials
    # summed in order by a second pass. Still exact to the reference and bit-identical between runs.
    monkeypatch.setattr(kernels, "SEGMENT_CHUNK", 3)
    values, indices, weights = make_inputs(16, 6, 30, 40, dtype, device)
    indices[:, :3] = torch.tensor([2, 2, 7], device=device)  # rows 2 and 7: 32 and 16 picks, several chunks
    grad_out = torch.randn(16, 40, device=device).to(dtype)
    first = run_with_grads("triton", values, indices, weights, grad_out)
    second = run_with_grads("triton", values, indices, weights, grad_out)
    assert first[3]["values_grad_segment_kernel"] == 3  # short rows, chunk partials, chunk sums
    assert torch.equal(first[1], second[1])
    _, ref_gv, _ = float64_reference(values, indices, weights, grad_out)
    assert_close_to_reference(first[1], ref_gv, dtype, name="grad_values")


@pytest.mark.usefixtures("poison_empty")
def test_non_contiguous_inputs(device):
    values, indices, weights = make_inputs(10, 6, 30, 128, torch.float32, device)
    wide = torch.randn(30, 300, device=device)
    wide[:, 100:228] = values
    values = wide[:, 100:228]  # row stride 300, unit column stride: used in place
    indices = indices.t().contiguous().t()  # transposed storage
    weights = weights.t().contiguous().t()
    assert not values.is_contiguous() and not indices.is_contiguous() and not weights.is_contiguous()
    check_against_float64(values, indices, weights, dtype=torch.float32)
    column_major = values.t().contiguous().t()  # column stride != 1: copied before the kernel
    check_against_float64(column_major, indices, weights, dtype=torch.float32)


@pytest.mark.usefixtures("poison_empty")
def test_mixed_weight_dtype(device):
    # bf16 table with fp32 softmax weights, as product-key layers produce them.
    values, indices, weights = make_inputs(9, 8, 30, 64, torch.bfloat16, device, weights_dtype=torch.float32)
    check_against_float64(values, indices, weights, dtype=torch.bfloat16)


def test_only_the_needed_grad_is_computed(device):
    values, indices, weights = make_inputs(6, 4, 20, 32, torch.float32, device)
    values.requires_grad_()
    with memops.backend("triton"):
        memops.weighted_gather(values, indices, weights).sum().backward()
    assert values.grad is not None and weights.grad is None
    _, ref_gv, _ = float64_reference(values.detach(), indices, weights, torch.ones(6, 32, device=device))
    assert_close_to_reference(values.grad, ref_gv, torch.float32)


@pytest.mark.parametrize("shape", [(0, 4), (5, 0)])
def test_empty_token_or_k_dimension(shape, device):
    values = torch.randn(8, 16, device=device, requires_grad=True)
    indices = torch.zeros(shape, dtype=torch.long, device=device)
    weights = torch.ones(shape, device=device, requires_grad=True)
    with memops.backend("triton"):
        out = memops.weighted_gather(values, indices, weights)
    assert out.shape == (shape[0], 16) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_fp64_gradcheck_on_triton_path(device):
    values, indices, weights = make_inputs(4, 3, 6, 5, torch.float64, device)
    values.requires_grad_(), weights.requires_grad_()
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(memops.weighted_gather, (values, indices, weights))


def test_opcheck(device):
    values, indices, weights = make_inputs(5, 3, 12, 16, torch.float32, device)
    values.requires_grad_(), weights.requires_grad_()
    # the custom op is the Triton path (backend "reference" calls memops.reference directly)
    torch.library.opcheck(torch.ops.memops.weighted_gather.default, (values, indices, weights, True, False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, device):
    if backend == "reference":
        device = "cpu"
    values, indices, weights = make_inputs(6, 4, 20, 32, torch.float32, device)

    def loss(v, w):
        return memops.weighted_gather(v, indices, w).sin().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    v1, w1 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    v2, w2 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    with memops.backend(backend):
        with count_launches() as launches:
            compiled(v1, w1).backward()
        loss(v2, w2).backward()
    assert (launches["weighted_gather_fwd_kernel"] > 0) == (backend == "triton")
    assert_close_to_reference(v1.grad, v2.grad, torch.float32)
    assert_close_to_reference(w1.grad, w2.grad, torch.float32)


@given(
    T=st.integers(1, 9),
    K=st.integers(1, 9),
    S=st.integers(1, 40),
    D=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    picked=st.sampled_from(["atomic", "segment"]),
    long_segment=st.sampled_from([0, 3, kernels.LONG_SEGMENT]),
    chunk=st.sampled_from([1, 2, kernels.SEGMENT_CHUNK]),
    deterministic_mode=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(T, K, S, D, dtype, index_dtype, picked, long_segment, chunk, deterministic_mode, seed):
    # The picker's choice and the hot-row threshold are drawn too: a picked segment path with a row
    # longer than the threshold must fall back to atomics, and deterministic mode overrides both.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values, indices, weights = make_inputs(T, K, S, D, dtype, device, index_dtype=index_dtype, seed=seed)
    longest = int(torch.unique(indices, return_counts=True)[1].max())
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        kernels.LONG_SEGMENT,
        kernels.pick_values_grad_algorithm,
        kernels.SEGMENT_CHUNK,
    )
    torch.use_deterministic_algorithms(deterministic_mode)
    kernels.LONG_SEGMENT, kernels.pick_values_grad_algorithm = long_segment, lambda values, indices: picked
    kernels.SEGMENT_CHUNK = chunk
    try:
        path = "segment" if picked == "segment" and longest <= long_segment else "atomic"
        check_against_float64(values, indices, weights, dtype=dtype, values_grad_path=path)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        kernels.LONG_SEGMENT, kernels.pick_values_grad_algorithm, kernels.SEGMENT_CHUNK = saved[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_is_embedding_bag(dtype):
    values, indices, weights = make_inputs(20, 6, 50, 24, dtype, "cpu")
    expected = F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")
    assert torch.equal(reference.weighted_gather(values, indices, weights), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backward_matches_autograd(dtype):
    values, indices, weights = make_inputs(9, 5, 30, 20, dtype, "cpu")
    v, w = values.double().requires_grad_(), weights.double().requires_grad_()
    g = torch.randn(9, 20, dtype=torch.float64)
    reference.weighted_gather(v, indices, w).backward(g)
    grad_values, grad_weights = reference.weighted_gather_backward(g.to(dtype), values, indices, weights)
    assert_close_to_reference(grad_values, v.grad, dtype)
    assert_close_to_reference(grad_weights, w.grad, dtype)


# --- bad input: a clear error naming the argument, before any kernel launches -------------------

BAD_INPUTS = {
    "values_1d": (lambda v, i, w: (v[0], i, w), ValueError, "values must be a 2-D"),
    "values_3d": (lambda v, i, w: (v[None], i, w), ValueError, "values must be a 2-D"),
    "values_int": (lambda v, i, w: (v.long(), i, w), TypeError, "values must be a floating-point"),
    "float_indices": (lambda v, i, w: (v, i.float(), w), TypeError, "indices must be int32 or int64"),
    "int16_indices": (lambda v, i, w: (v, i.short(), w), TypeError, "indices must be int32 or int64"),
    "scalar_indices": (lambda v, i, w: (v, i[0, 0], w[0, 0]), ValueError, "indices must have shape"),
    "k_mismatch": (lambda v, i, w: (v, i, w[:, :-1]), ValueError, "weights must have the shape of indices"),
    "t_mismatch": (lambda v, i, w: (v, i, w[:-1]), ValueError, "weights must have the shape of indices"),
    "int_weights": (lambda v, i, w: (v, i, w.long()), TypeError, "weights must be a floating-point"),
    "index_too_large": (
        lambda v, i, w: (v, torch.full_like(i, v.shape[0]), w),
        IndexError,
        r"indices must lie in \[0, 16\)",
    ),
    "negative_index": (lambda v, i, w: (v, i - 100, w), IndexError, r"indices must lie in \[0, 16\)"),
    "indices_not_tensor": (lambda v, i, w: (v, i.tolist(), w), TypeError, "indices must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case, backend, device):
    make_bad, error, message = BAD_INPUTS[case]
    args = make_bad(*make_inputs(4, 3, 16, 8, torch.float32, device if backend == "triton" else "cpu"))
    with memops.backend(backend), count_launches() as launches, pytest.raises(error, match=message):
        memops.weighted_gather(*args)
    assert sum(launches.values()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a second device")
@pytest.mark.parametrize("which", ["indices", "weights"])
def test_mixed_devices(which):
    values, indices, weights = make_inputs(4, 3, 16, 8, torch.float32, "cuda")
    args = {"values": values, "indices": indices, "weights": weights}
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match=f"{which} is on cpu but values is on cuda"):
        memops.weighted_gather(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU spelling of the mixed-device check")
def test_mixed_devices_meta():
    values, indices, weights = make_inputs(4, 3, 16, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weights is on meta but values is on cpu"):
        memops.weighted_gather(values, indices, weights.to("meta"))


def test_unchecked_indices_skip_the_range_check(device):
    values, indices, weights = make_inputs(4, 3, 16, 8, torch.float32, device)
    with memops.backend("triton"):
        checked = memops.weighted_gather(values, indices, weights)
        unchecked = memops.weighted_gather(values, indices, weights, check_indices=False)
    assert torch.equal(checked, unchecked)


# --- GPU acceptance: the same checks at real sizes -------------------------------------------


@pytest.mark.cuda
@pytest.mark.at_scale
@pytest.mark.parametrize(
    "dtype, D", [(torch.float32, 1024), (torch.float16, 1024), (torch.bfloat16, 1024), (torch.bfloat16, 4096)]
)
def test_cuda_memory_layers_at_scale_shapes(dtype, D, values_grad_path):
    # Memory Layers at Scale: 4 heads x top-32 = K 128 from 2**20 rows (T smaller than 4096 keeps it quick).
    values, indices, weights = make_inputs(1024, 128, 1 << 20, D, dtype, "cuda")
    if D == 4096:  # a 2**32-element table: the last rows sit past int32 offsets
        indices[:, 0] = values.shape[0] - 1
    check_against_float64(values, indices, weights, dtype=dtype, values_grad_path=values_grad_path)


@pytest.mark.cuda
@pytest.mark.usefixtures("deterministic")
def test_cuda_deterministic_bit_identical_at_scale():
    values, indices, weights = make_inputs(4096, 128, 4096, 1024, torch.bfloat16, "cuda")
    grad_out = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    first = run_with_grads("triton", values, indices, weights, grad_out)
    second = run_with_grads("triton", values, indices, weights, grad_out)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    _, ref_gv, _ = float64_reference(values, indices, weights, grad_out)
    assert relative_error(first[1], ref_gv) < 1e-2


@pytest.mark.parametrize(
    "dtype, hot_row, expected",
    [
        (torch.float32, False, "atomic"),  # fp32 tables: atomics write the grad in place
        (torch.float16, False, "segment"),  # 16-bit tables: no fp32 buffer and cast
        (torch.float16, True, "atomic"),  # a row chosen more than LONG_SEGMENT times: atomics after all
    ],
)
def test_auto_values_grad_algorithm(dtype, hot_row, expected, monkeypatch, device):
    monkeypatch.setattr(kernels, "SMALL_PROBLEM", 0)
    monkeypatch.setattr(kernels, "LONG_SEGMENT", 4)
    values, indices, weights = make_inputs(8, 3, 40, 16, dtype, device)
    if hot_row:
        indices[:, 0] = 5
    check_against_float64(values, indices, weights, dtype=dtype, values_grad_path=expected)


@pytest.mark.usefixtures("poison_empty")
def test_deterministic_flag_takes_the_segment_kernel_without_the_global_switch(monkeypatch, device):
    # deterministic=True means what it means in engram_lookup and FlashAttention: the sorted segment values
    # grad, whatever torch.use_deterministic_algorithms says (off here) and the picker would choose.
    monkeypatch.setattr(kernels, "pick_values_grad_algorithm", lambda values, indices: "atomic")
    assert not torch.are_deterministic_algorithms_enabled()
    values, indices, weights = make_inputs(16, 8, 6, 32, torch.float32, device)
    values.requires_grad_(True)
    grads = []
    for deterministic in (False, True):
        with memops.backend("triton"), count_launches() as launches:
            memops.weighted_gather(values, indices, weights, deterministic=deterministic).sum().backward()
        grads.append(values.grad)
        values.grad = None
        assert launches["values_grad_segment_kernel"] == int(deterministic), (deterministic, dict(launches))
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        memops.weighted_gather(values, indices, weights, deterministic="yes")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_values_grad_equals_the_dense_one(backend):
    """weighted_gather(sparse=True): the values grad is a sparse_coo tensor (one row per pick, repeats
    included) whose dense form equals the dense path's, and the weights grad is the same; a row-sparse
    optimizer then steps on it (memops.optim.SparseAdam equals torch.optim.SparseAdam on the same grad)."""
    from memops.optim import SparseAdam

    generator = torch.Generator().manual_seed(3)
    values = torch.randn(40, 24, generator=generator, dtype=torch.float64)
    indices = torch.randint(0, 40, (6, 5, 7), generator=generator)
    indices[0, 0, :3] = 9  # repeats
    weights = torch.rand(6, 5, 7, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(6, 5, 24, generator=generator, dtype=torch.float64)
    grads = {}
    with memops.backend(backend), count_launches() as launches:
        for sparse in (False, True):
            v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
            memops.weighted_gather(v, indices, w, sparse=sparse).backward(grad_out)
            grads[sparse] = (v.grad, w.grad)
    assert grads[True][0].is_sparse and grads[True][0]._nnz() == indices.numel()
    assert torch.allclose(grads[True][0].to_dense(), grads[False][0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(grads[True][1], grads[False][1], rtol=1e-12, atol=1e-12)
    assert (launches["weighted_gather_fwd_kernel"] == 2) == (backend == "triton")
    ours, theirs = (values.clone().requires_grad_() for _ in range(2))
    ours.grad, theirs.grad = grads[True][0], grads[True][0].clone()
    with memops.backend(backend):
        SparseAdam([ours], lr=0.01).step()
    torch.optim.SparseAdam([theirs], lr=0.01).step()
    assert torch.allclose(ours, theirs, rtol=1e-13, atol=1e-14)
