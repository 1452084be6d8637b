"""memops.memory_attention: Triton kernels (interpreter on CPU, compiled on CUDA) against the float64
reference, gradients of all six inputs (and through lse), deterministic shared-memory grads, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops.testing import assert_close_to_reference, count_launches, relative_error

CUDA = torch.cuda.is_available()
KERNELS = (
    "memory_attention_fwd_kernel",
    "memory_attention_delta_kernel",
    "memory_attention_dq_kernel",
    "memory_attention_dkdv_kernel",
)


def tolerance_key(dtype):
    # fp32 dots are full fp32 unless torch's float32 matmul precision allows tf32.
    return "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else dtype


def make_inputs(B, H, Hkv, N, Nk, M, D, dtype, device, *, memory="per_sample", bias_shape=None, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    inputs = {"q": randn(B, H, N, D), "k": randn(B, Hkv, Nk, D), "v": randn(B, Hkv, Nk, D)}
    if memory is not None:
        shape = (B, Hkv, M, D) if memory == "per_sample" else (Hkv, M, D)
        inputs["mem_k"], inputs["mem_v"] = randn(*shape), randn(*shape)
    if bias_shape is not None:
        bias_dtype = torch.promote_types(dtype, torch.float32)  # fp32 biases beside 16-bit activations
        inputs["mem_bias"] = torch.randn(*bias_shape, generator=generator, device=device).to(bias_dtype)
    return inputs


def run(backend, inputs, *, causal, grad_out, grad_lse, scale=None, impl="auto"):
    """Forward (with lse) and backward through both outputs (through out alone when grad_lse is None);
    returns (out, lse, grads by name, launches)."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    with memops.backend(backend), count_launches() as launches:
        out, lse = memops.memory_attention(**leaves, causal=causal, scale=scale, return_lse=True, impl=impl)
        if grad_lse is None:
            out.backward(grad_out)
        else:
            torch.autograd.backward([out, lse], [grad_out, grad_lse])
    return out, lse, {name: t.grad for name, t in leaves.items()}, launches


def expected_launches(impl, *, memory: bool, lse_grad: bool) -> dict:
    """Kernel launches of one forward + backward: the fused kernels, or the composed path's (the vendor op,
    the memory part's kernels, the merge; the fused backward when lse is differentiated)."""
    if impl == "fused":
        return {"memory_attention.fused": 1, **{name: 1 for name in KERNELS}}
    launches = {"memory_attention.composed": 1, "lse_merge_kernel": 1, "memory_attention_fwd_kernel": int(memory)}
    backward = 1 if lse_grad or memory else 0
    launches.update({name: backward for name in KERNELS[1:]})
    return launches


def check_against_float64(inputs, *, causal, dtype, scale=None, impl="fused", lse_grad=True):
    q = inputs["q"]
    B, H, N, _ = q.shape
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(B, H, N, device=q.device) if lse_grad else None
    out, lse, grads, launches = run(
        "triton", inputs, causal=causal, grad_out=grad_out, grad_lse=grad_lse, scale=scale, impl=impl
    )
    memory = "mem_k" in inputs and inputs["mem_k"].shape[-2] > 0
    expected = expected_launches(impl, memory=memory, lse_grad=lse_grad)
    # the composed path records its vendor op: memory_attention.composed.<cudnn|flash|efficient|cpu_flash>
    launches["memory_attention.composed"] = sum(
        n for name, n in launches.items() if name.startswith("memory_attention.composed.")
    )
    assert all(launches[name] == count for name, count in expected.items()), (dict(launches), expected)
    assert out.dtype == q.dtype and lse.dtype == torch.float32

    inputs64 = {name: t.double() for name, t in inputs.items()}
    visible = None
    ref_out, ref_lse, ref_grads, _ = run(
        "reference",
        inputs64,
        causal=causal,
        grad_out=grad_out.double(),
        grad_lse=grad_lse.double() if lse_grad else None,
        scale=scale,
    )
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible), "lse: rows with no visible key must be -inf, others finite"
    key = tolerance_key(dtype)
    errors = {"out": assert_close_to_reference(out, ref_out, key, name="out")}
    errors["lse"] = assert_close_to_reference(lse[visible], ref_lse[visible], key, name="lse")
    for name, grad in grads.items():
        if inputs[name].numel() == 0:  # M = 0: the memory takes no part, its grad stays None
            continue
        assert grad is not None and grad.shape == inputs[name].shape, name
        errors["d" + name] = assert_close_to_reference(grad, ref_grads[name], key, name=f"grad {name}", scale=2.0)
    return errors


CASES = {
    #                  B  H  Hkv N   Nk  M   D   memory        causal bias_shape
    "plain": (2, 2, 2, 37, 37, 0, 32, None, False, None),
    "plain_causal": (1, 2, 2, 40, 40, 0, 16, None, True, None),
    "per_sample": (2, 4, 2, 37, 45, 19, 32, "per_sample", False, None),
    "shared": (2, 4, 2, 37, 45, 19, 32, "shared", False, None),
    "shared_causal": (3, 2, 1, 33, 50, 7, 64, "shared", True, None),
    "gqa_causal": (1, 4, 1, 45, 45, 33, 16, "per_sample", True, None),
    "bias_m": (2, 2, 2, 20, 30, 40, 32, "shared", False, "M"),
    "bias_hkv_m": (2, 4, 2, 20, 30, 17, 32, "per_sample", True, "Hkv,M"),
    "bias_b_hkv_m": (2, 2, 2, 20, 30, 17, 32, "per_sample", False, "B,Hkv,M"),
    "decode": (2, 4, 2, 1, 70, 9, 32, "per_sample", True, "Hkv,M"),
    "chunked_prefill": (1, 2, 2, 16, 80, 5, 32, "shared", True, None),
    # N > Nk, causal, with memory: the first 30 queries see the memory rows only (the composed path's merge
    # must ignore its sequence part's placeholder there)
    "more_queries": (2, 4, 2, 50, 20, 6, 16, "per_sample", True, "Hkv,M"),
    # Nk = N + 1: query 31 sees key 32, the first of the second key block (a block-boundary case).
    "causal_block_edge": (1, 2, 2, 40, 41, 0, 16, None, True, None),
}


def bias_shape(spec, B, Hkv, M):
    return None if spec is None else {"M": (M,), "Hkv,M": (Hkv, M), "B,Hkv,M": (B, Hkv, M)}[spec]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case, dtype, device):
    B, H, Hkv, N, Nk, M, D, memory, causal, bias = CASES[case]
    inputs = make_inputs(B, H, Hkv, N, Nk, M, D, dtype, device, memory=memory, bias_shape=bias_shape(bias, B, Hkv, M))
    check_against_float64(inputs, causal=causal, dtype=dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("lse_grad", [False, True], ids=["vendor_backward", "lse_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_composed_matches_float64_reference(case, dtype, lse_grad, device):
    # torch's fused attention over the sequence (the CPU flash op here), memops' kernel over the memory, the
    # LSE merge; its backward is the vendor op's plus the memory part's, or the fused one when lse has a grad.
    B, H, Hkv, N, Nk, M, D, memory, causal, bias = CASES[case]
    inputs = make_inputs(B, H, Hkv, N, Nk, M, D, dtype, device, memory=memory, bias_shape=bias_shape(bias, B, Hkv, M))
    check_against_float64(inputs, causal=causal, dtype=dtype, impl="composed", lse_grad=lse_grad)


@pytest.mark.usefixtures("poison_empty")
def test_custom_scale(device):
    inputs = make_inputs(1, 2, 2, 20, 20, 10, 32, torch.float32, device, bias_shape=(10,))
    check_against_float64(inputs, causal=True, dtype=torch.float32, scale=0.05)


@pytest.mark.usefixtures("poison_empty")
def test_head_dims(device):
    for D in (16, 64, 128) if not CUDA else (16, 32, 64, 128, 256):
        inputs = make_inputs(1, 2, 1, 17, 17, 5, D, torch.float32, device, memory="shared")
        check_against_float64(inputs, causal=False, dtype=torch.float32)


@pytest.mark.usefixtures("poison_empty")
def test_rows_with_no_visible_key_give_zeros(device):
    # No memory, causal, N > Nk: the first N - Nk queries see nothing. Zeros, lse -inf, finite grads.
    inputs = make_inputs(1, 2, 2, 50, 20, 0, 16, torch.float32, device, memory=None)
    out, lse, grads, _ = run(
        "triton",
        inputs,
        causal=True,
        grad_out=torch.randn(1, 2, 50, 16, device=device),
        grad_lse=torch.zeros(1, 2, 50, device=device),
    )
    assert torch.equal(out[:, :, :30], torch.zeros_like(out[:, :, :30]))
    assert torch.isneginf(lse[:, :, :30]).all() and torch.isfinite(lse[:, :, 30:]).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.equal(grads["q"][:, :, :30], torch.zeros_like(grads["q"][:, :, :30]))
    check_against_float64(inputs, causal=True, dtype=torch.float32)


def test_nan_propagates(device):
    inputs = make_inputs(1, 1, 1, 20, 20, 4, 16, torch.float32, device)
    inputs["q"][0, 0, 3, 0] = float("nan")
    with memops.backend("triton"):
        out = memops.memory_attention(**inputs)
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(out[0, 0, 4:]).all()


def test_plain_attention_matches_sdpa(device):
    inputs = make_inputs(2, 4, 4, 33, 33, 0, 32, torch.float32, device, memory=None)
    with memops.backend("triton"):
        out = memops.memory_attention(**inputs, causal=True)
    expected = F.scaled_dot_product_attention(
        inputs["q"].double(), inputs["k"].double(), inputs["v"].double(), is_causal=True
    )
    assert_close_to_reference(out, expected, tolerance_key(torch.float32))


def test_zero_memory_rows_is_plain_attention(device):
    inputs = make_inputs(1, 2, 2, 17, 17, 0, 16, torch.float32, device)
    with memops.backend("triton"), count_launches() as launches:
        with_empty = memops.memory_attention(**inputs)
        without = memops.memory_attention(inputs["q"], inputs["k"], inputs["v"])
    assert torch.equal(with_empty, without) and launches["memory_attention_fwd_kernel"] == 2


@pytest.mark.parametrize("deterministic_mode", [False, True])
def test_shared_memory_grads_over_the_batch(deterministic_mode, device):
    inputs = make_inputs(4, 2, 1, 24, 24, 12, 32, torch.float32, device, memory="shared", bias_shape=(12,))
    grad_out = torch.randn(4, 2, 24, 32, device=device)
    grad_lse = torch.zeros(4, 2, 24, device=device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        runs = [run("triton", inputs, causal=False, grad_out=grad_out, grad_lse=grad_lse) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    if deterministic_mode:
        for name in ("mem_k", "mem_v", "mem_bias"):
            assert torch.equal(runs[0][2][name], runs[1][2][name]), name
    per_sample = dict(inputs, mem_k=inputs["mem_k"].expand(4, -1, -1, -1), mem_v=inputs["mem_v"].expand(4, -1, -1, -1))
    _, _, expanded_grads, _ = run(
        "reference",
        {n: t.double() for n, t in per_sample.items()},
        causal=False,
        grad_out=grad_out.double(),
        grad_lse=grad_lse.double(),
    )
    for name in ("mem_k", "mem_v"):  # the shared table's grad is the sum of the per-sample grads
        assert_close_to_reference(
            runs[0][2][name], expanded_grads[name].sum(0), tolerance_key(torch.float32), name=name
        )
    assert_close_to_reference(runs[0][2]["mem_bias"], expanded_grads["mem_bias"], tolerance_key(torch.float32))


@given(
    copies=st.integers(2, 5),
    distinct=st.integers(1, 4),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_repeated_memory_rows_equal_one_row_with_log_bias(copies, distinct, causal, seed):
    # k identical memory rows are one row with bias ln k: DiT-Mem's 10 distinct x 100 copies dedupe.
    device = "cuda" if CUDA else "cpu"
    inputs = make_inputs(1, 2, 1, 20, 20, distinct, 16, torch.float32, device, memory="shared", seed=seed)
    repeated = dict(
        inputs,
        mem_k=inputs["mem_k"].repeat_interleave(copies, dim=1),
        mem_v=inputs["mem_v"].repeat_interleave(copies, dim=1),
    )
    deduped = dict(inputs, mem_bias=torch.full((distinct,), math.log(copies), device=device))
    with memops.backend("triton"):
        out_repeated = memops.memory_attention(**repeated, causal=causal)
        out_deduped = memops.memory_attention(**deduped, causal=causal)
    assert relative_error(out_deduped, out_repeated) < 1e-5


@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    N=st.integers(1, 40),
    Nk=st.integers(1, 40),
    M=st.integers(0, 40),
    D=st.sampled_from([16, 32]),
    memory=st.sampled_from(["per_sample", "shared"]),
    causal=st.booleans(),
    bias=st.sampled_from([None, "M", "Hkv,M", "B,Hkv,M"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(B, Hkv, group, N, Nk, M, D, memory, causal, bias, seed):
    device = "cuda" if CUDA else "cpu"
    bias = bias if M else None
    inputs = make_inputs(
        B,
        Hkv * group,
        Hkv,
        N,
        Nk,
        M,
        D,
        torch.float32,
        device,
        memory=memory,
        bias_shape=bias_shape(bias, B, Hkv, M),
        seed=seed,
    )
    check_against_float64(inputs, causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("impl, with_lse", [("fused", True), ("composed", False), ("composed", True)])
def test_fp64_gradcheck_on_triton_path(impl, with_lse, device):
    # composed: out alone takes the vendor backward; out and lse together the fused one (lse has a grad)
    inputs = make_inputs(1, 4, 2, 4, 5, 3, 16, torch.float64, device, memory="shared", bias_shape=(2, 3))
    names = list(inputs)
    leaves = [inputs[n].requires_grad_() for n in names]

    def fn(*tensors):
        with memops.backend("triton"):
            out, lse = memops.memory_attention(**dict(zip(names, tensors)), causal=True, return_lse=True, impl=impl)
        return (out, lse) if with_lse else out

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_opcheck(device):
    inputs = make_inputs(1, 2, 1, 9, 9, 4, 16, torch.float32, device, memory="shared", bias_shape=(1, 1, 4))
    tensors = (inputs["q"], inputs["k"], inputs["v"], inputs["mem_k"], inputs["mem_v"], inputs["mem_bias"])
    args = (*tensors, True, 0.25, False)
    for t in args[:6]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.memops.memory_attention.default, args)


def attention_tensors(inputs):
    """(q, k, v, mem_k, mem_v, mem_bias) of make_inputs, in the custom ops' argument order."""
    return tuple(inputs[name] for name in ("q", "k", "v", "mem_k", "mem_v", "mem_bias"))


@pytest.mark.skipif(CUDA, reason="the CPU flash op runs CPU tensors; on CUDA test_opcheck_composed_cuda does")
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_composed(causal):
    inputs = make_inputs(1, 4, 2, 9, 7, 4, 16, torch.float32, "cpu", memory="shared", bias_shape=(1, 1, 4))
    args = (*attention_tensors(inputs), causal, 0.25, "cpu_flash", False)
    for t in args[:6]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.memops.memory_attention_composed.default, args)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_opcheck_composed_cuda():
    inputs = make_inputs(1, 4, 2, 128, 96, 4, 64, torch.bfloat16, "cuda", memory="shared", bias_shape=(1, 1, 4))
    from memops.attention import attention_impl

    _, sequence = attention_impl(inputs["q"], 96, causal=True, impl="composed")
    args = (*attention_tensors(inputs), True, 0.125, sequence, False)
    for t in args[:6]:
        t.requires_grad_()
    torch.library.opcheck(torch.ops.memops.memory_attention_composed.default, args)


@pytest.mark.parametrize("backend, impl", [("reference", "auto"), ("triton", "fused"), ("triton", "composed")])
def test_torch_compile_fullgraph(backend, impl, device):
    if backend == "reference":
        device = "cpu"
    inputs = make_inputs(1, 2, 1, 17, 17, 5, 16, torch.float32, device, memory="shared", bias_shape=(5,))

    def loss(q, k, v, mem_k, mem_v, mem_bias):
        out = memops.memory_attention(q, k, v, mem_k, mem_v, causal=True, mem_bias=mem_bias, impl=impl)
        return out.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    first = [t.clone().requires_grad_() for t in inputs.values()]
    second = [t.clone().requires_grad_() for t in inputs.values()]
    with memops.backend(backend), count_launches() as launches:
        compiled(*first).backward()
        loss(*second).backward()
    assert (launches["memory_attention_fwd_kernel"] > 0) == (backend == "triton")
    assert (launches["lse_merge_kernel"] > 0) == (impl == "composed")
    for a, b in zip(first, second):
        assert_close_to_reference(a.grad, b.grad, tolerance_key(torch.float32))


# --- bad input ---------------------------------------------------------------------------------


def _bad(**changes):
    def make(inputs):
        return {**inputs, **{k: (v(inputs) if callable(v) else v) for k, v in changes.items()}}

    return make


BAD_INPUTS = {
    "q_3d": (_bad(q=lambda i: i["q"][0]), ValueError, "q must be 4-D"),
    "k_batch": (_bad(k=lambda i: i["k"][:1]), ValueError, r"k must be \(B=2"),
    "v_length": (_bad(v=lambda i: i["v"][:, :, :-1]), ValueError, "v must have k's shape"),
    "heads_not_multiple": (_bad(q=lambda i: torch.cat([i["q"], i["q"][:, :1]], 1)), ValueError, "multiple of k's"),
    "d_mismatch": (_bad(k=lambda i: i["k"][..., :8], v=lambda i: i["v"][..., :8]), ValueError, r"D=16"),
    "mem_k_without_mem_v": (_bad(mem_v=None), ValueError, "mem_k and mem_v must be given together"),
    "mem_wrong_heads": (
        _bad(mem_k=lambda i: i["mem_k"][:, :1], mem_v=lambda i: i["mem_v"][:, :1]),
        ValueError,
        "mem_k must be",
    ),
    "mem_wrong_d": (
        _bad(mem_k=lambda i: i["mem_k"][..., :8], mem_v=lambda i: i["mem_v"][..., :8]),
        ValueError,
        "mem_k must be",
    ),
    "mem_v_shape": (_bad(mem_v=lambda i: i["mem_v"][:, :, :-1]), ValueError, "mem_v must have mem_k's shape"),
    "bias_shape": (_bad(mem_bias=lambda i: torch.zeros(3, device=i["q"].device)), ValueError, "mem_bias must be"),
    "bias_int": (
        _bad(mem_bias=lambda i: torch.zeros(5, dtype=torch.long, device=i["q"].device)),
        TypeError,
        "mem_bias must be floating",
    ),
    "bias_without_memory": (
        _bad(mem_k=None, mem_v=None, mem_bias=lambda i: torch.zeros(5, device=i["q"].device)),
        ValueError,
        "mem_bias needs",
    ),
    "mixed_dtype": (_bad(k=lambda i: i["k"].double()), TypeError, "k must have q's dtype"),
    "int_q": (
        _bad(
            q=lambda i: i["q"].long(),
            k=lambda i: i["k"].long(),
            v=lambda i: i["v"].long(),
            mem_k=lambda i: i["mem_k"].long(),
            mem_v=lambda i: i["mem_v"].long(),
        ),
        TypeError,
        "q must be floating",
    ),
    "mixed_device": (_bad(mem_bias=lambda i: torch.zeros(5, device="meta")), ValueError, "mem_bias is on meta"),
    "k_not_tensor": (_bad(k=lambda i: i["k"].tolist()), TypeError, "k must be a torch.Tensor"),
    "v_none": (_bad(v=None), TypeError, "v must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case, backend, device):
    make_bad, error, message = BAD_INPUTS[case]
    inputs = make_inputs(2, 2, 2, 8, 8, 5, 16, torch.float32, device if backend == "triton" else "cpu")
    with memops.backend(backend), count_launches() as launches, pytest.raises(error, match=message):
        memops.memory_attention(**make_bad(inputs))
    assert sum(launches.values()) == 0


def test_unsupported_head_dim_on_triton(device):
    inputs = make_inputs(1, 1, 1, 8, 8, 2, 24, torch.float32, device)
    with memops.backend("triton"), pytest.raises(ValueError, match="head dim D=24"):
        memops.memory_attention(**inputs)
    with memops.backend("reference"):
        assert memops.memory_attention(**{n: t.cpu() for n, t in inputs.items()}).shape == (1, 1, 8, 24)


# --- GPU acceptance at real sizes ---------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fused", "composed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["dit_mem", "prefix_tuning", "decode"])
def test_cuda_real_shapes(shape, dtype, impl):
    if shape == "dit_mem":  # DiT-Mem: shared 1000-token memory, 12 x 128 heads (N cut from 32,760 to keep fp64 cheap)
        inputs = make_inputs(1, 12, 12, 4096, 4096, 1000, 128, dtype, "cuda", memory="shared")
        causal = False
    elif shape == "prefix_tuning":
        inputs = make_inputs(2, 32, 8, 1024, 1024, 64, 128, dtype, "cuda", memory="shared", bias_shape=(8, 64))
        causal = True
    else:
        inputs = make_inputs(4, 32, 8, 1, 8192, 256, 128, dtype, "cuda", memory="per_sample")
        causal = True
    # composed: out alone is differentiated, so the vendor backward op runs (lse grads take the fused one)
    check_against_float64(inputs, causal=causal, dtype=dtype, impl=impl, lse_grad=impl == "fused")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("impl", ["fused", "composed"])
def test_non_contiguous_inputs(impl, device):
    # (B, N, H*D) projections viewed as (B, H, N, D): the layout every attention layer hands over.
    B, N, H, D, M = 2, 19, 4, 16, 7
    generator = torch.Generator(device=device).manual_seed(3)

    def heads(length, count):
        return (
            torch.randn(B, length, count * D, generator=generator, device=device)
            .view(B, length, count, D)
            .transpose(1, 2)
        )

    inputs = {"q": heads(N, H), "k": heads(N, 2), "v": heads(N, 2), "mem_k": heads(M, 2), "mem_v": heads(M, 2)}
    assert not any(t.is_contiguous() for t in inputs.values())
    check_against_float64(inputs, causal=True, dtype=torch.float32, impl=impl, lse_grad=impl == "fused")


@pytest.mark.parametrize("op", ["fused", "composed", "varlen", "retention", "retention_varlen"])
def test_deterministic_flag_reaches_the_backward_kernels(op, monkeypatch, device):
    # deterministic=True, with torch.use_deterministic_algorithms off, sends the backward of a batch-shared
    # memory down the fixed-order path, on every attention op that takes memory; False leaves it to the switch.
    from memops.kernels import attention as kernels

    seen = []
    original = kernels.memory_attention_bwd

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "memory_attention_bwd", recording)
    assert not torch.are_deterministic_algorithms_enabled()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 80, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    mem_k, mem_v = (torch.randn(2, 3, 16, generator=g).to(device).requires_grad_() for _ in range(2))  # shared
    log_beta = (-torch.rand(2, 2, 80, generator=g)).to(device)
    cu = torch.tensor([0, 80, 160], dtype=torch.int32, device=device)
    packed = [t.detach().transpose(1, 2).reshape(160, 2, 16).requires_grad_() for t in (q, k, v)]
    for deterministic in (False, True):
        with memops.backend("triton"):
            if op in ("fused", "composed"):
                out = memops.memory_attention(q, k, v, mem_k, mem_v, causal=True, impl=op, deterministic=deterministic)
            elif op == "varlen":
                out = memops.memory_attention_varlen(*packed, cu, cu, 80, 80, mem_k, mem_v, causal=True,
                                                     deterministic=deterministic)  # fmt: skip
            elif op == "retention":
                out = memops.retention_attention(q, k, v, log_beta, mem_k=mem_k, mem_v=mem_v,
                                                 deterministic=deterministic)  # fmt: skip
            else:
                flat_beta = log_beta.transpose(1, 2).reshape(160, 2)
                out = memops.retention_attention_varlen(*packed, flat_beta, cu, cu, 80, 80, mem_k=mem_k, mem_v=mem_v,
                                                        deterministic=deterministic)  # fmt: skip
            out.sum().backward()
    assert seen == [False, True], seen
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        memops.memory_attention(q, k, v, deterministic=1)
