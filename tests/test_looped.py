"""MELT: memops.looped_kv_update, memops.looped_attention and SharedLoopKVCache. Triton kernels
(interpreter on CPU, compiled on CUDA) against the float64 reference, every gradient, a 4-loop chain,
the g = 0 / g = 1 limits, bad input, and the decode cache's loop-independent memory."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops import reference
from memops.testing import assert_close_to_reference, check_compiled_grads, count_launches


def randn(generator, device, dtype, *shape):
    return torch.randn(*shape, generator=generator, device=device).to(dtype)


def make_update_inputs(B, Hkv, Nk, n, D, gate_width, dtype, device, *, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    caches = [randn(generator, device, dtype, B, Hkv, Nk, D) for _ in range(2)]
    new = [randn(generator, device, dtype, B, Hkv, n, D) for _ in range(2)]
    gate = torch.rand(B, Hkv, n, gate_width, generator=generator, device=device)
    return [*caches, *new, gate.to(torch.promote_types(dtype, torch.float32))]


def with_grads(fn, inputs, grads_of_outputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    torch.autograd.backward(list(outputs), grads_of_outputs)
    return outputs, [t.grad for t in leaves]


# --- looped_kv_update ----------------------------------------------------------------------------------

ROWS = {
    "all": (lambda Nk: None, 9),
    "tail_slice": (lambda Nk: slice(Nk - 3, Nk), 3),
    "strided_slice": (lambda Nk: slice(0, Nk, 2), 5),
    "index_tensor": (lambda Nk: torch.tensor([6, 0, 2, 8]), 4),
    "last_row": (lambda Nk: slice(-1, None), 1),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("rows_case", sorted(ROWS))
@pytest.mark.parametrize("gate_width", [1, 16])
def test_update_matches_float64(rows_case, gate_width, device):
    make_rows, n = ROWS[rows_case]
    rows = make_rows(9)
    rows = rows.to(device) if isinstance(rows, torch.Tensor) else rows
    inputs = make_update_inputs(2, 3, 9, n, 16, gate_width, torch.float32, device)
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[1])]
    with memops.backend("triton"), count_launches() as launches:
        outputs, input_grads = with_grads(lambda *a: memops.looped_kv_update(*a, rows=rows), inputs, grads)
    assert launches["looped_update_fwd_kernel"] == 1 and launches["looped_update_bwd_kernel"] == 1
    ref_outputs, ref_grads = with_grads(
        lambda *a: reference.looped_kv_update(*a, rows), [t.double() for t in inputs], [g.double() for g in grads]
    )
    for name, out, ref in zip(("k", "v"), outputs, ref_outputs):
        assert_close_to_reference(out, ref, torch.float32, name=name)
    for name, grad, ref in zip(("k_cache", "v_cache", "k_new", "v_new", "gate"), input_grads, ref_grads):
        assert_close_to_reference(grad, ref, torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
def test_update_16_bit(dtype, device):
    inputs = make_update_inputs(1, 2, 8, 3, 32, 1, dtype, device)
    with memops.backend("triton"):
        k, v = memops.looped_kv_update(*inputs, rows=slice(5, 8))
    ref_k, ref_v = reference.looped_kv_update(*[t.double() for t in inputs], slice(5, 8))
    assert k.dtype == dtype
    assert_close_to_reference(k, ref_k, dtype)
    assert_close_to_reference(v, ref_v, dtype)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_update_in_place_equals_out_of_place(backend, device):
    device = device if backend == "triton" else "cpu"
    inputs = make_update_inputs(2, 2, 7, 2, 16, 16, torch.float32, device)
    with memops.backend(backend), count_launches() as launches:
        expected_k, expected_v = memops.looped_kv_update(*inputs, rows=slice(3, 5))
        k_cache, v_cache = inputs[0].clone(), inputs[1].clone()
        k, v = memops.looped_kv_update(k_cache, v_cache, *inputs[2:], rows=slice(3, 5), inplace=True)
    assert k is k_cache and v is v_cache
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v, expected_v, rtol=0, atol=0)
    assert (launches["looped_update_fwd_kernel"] == 2) == (backend == "triton")


def test_update_gate_limits(device):
    k_cache, v_cache, k_new, v_new, gate = make_update_inputs(1, 2, 5, 5, 8, 1, torch.float32, device)
    with memops.backend("triton"):
        keep = memops.looped_kv_update(k_cache, v_cache, k_new, v_new, torch.ones_like(gate))
        replace = memops.looped_kv_update(k_cache, v_cache, k_new, v_new, torch.zeros_like(gate))
    assert torch.equal(keep[0], k_cache) and torch.equal(keep[1], v_cache)
    assert torch.equal(replace[0], k_new) and torch.equal(replace[1], v_new)


def test_update_gradcheck_fp64(device):
    inputs = [t.requires_grad_() for t in make_update_inputs(1, 2, 5, 2, 4, 1, torch.float64, device)]
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(
            lambda *a: memops.looped_kv_update(*a, rows=slice(1, 3)), inputs, fast_mode=True
        )


def test_update_opcheck(device):
    inputs = [t.requires_grad_() for t in make_update_inputs(1, 2, 6, 6, 8, 8, torch.float32, device)]
    # the custom op is the Triton path (backend "reference" calls memops.reference directly)
    torch.library.opcheck(torch.ops.memops.looped_kv_update.default, (*inputs, None, 0))


# --- looped_attention -------------------------------------------------------------------------------------


def make_attention_inputs(B, H, Hkv, n, Nk, D, gate_width, dtype, device, *, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    q = randn(generator, device, dtype, B, H, n, D)
    k_cache, v_cache, k_new, v_new, gate = make_update_inputs(
        B, Hkv, Nk, n, D, gate_width, dtype, device, seed=seed + 1
    )
    return [q, k_new, v_new, gate, k_cache, v_cache]


ATTENTION_CASES = {  # B, H, Hkv, n, Nk, D, gate width, causal
    "training_chunk": (2, 2, 2, 37, 37, 32, 1, True),
    "per_channel_gqa": (1, 4, 2, 33, 33, 16, 16, True),
    "suffix_of_cache": (2, 2, 1, 20, 45, 32, 1, True),
    "not_causal": (1, 2, 2, 25, 30, 64, 64, False),
    "decode": (2, 4, 2, 1, 40, 16, 1, True),
}


def check_looped_attention(inputs, causal, dtype):
    q = inputs[0]
    grads = [torch.randn_like(q), torch.randn_like(inputs[4]), torch.randn_like(inputs[5])]
    with memops.backend("triton"), count_launches() as launches:
        outputs, input_grads = with_grads(lambda *a: memops.looped_attention(*a, causal=causal), inputs, grads)
    assert launches["looped_attention_fwd_kernel"] == 1 and launches["looped_update_fwd_kernel"] == 0
    assert launches["memory_attention_dkdv_kernel"] == 1 and launches["looped_update_bwd_kernel"] == 1
    ref_outputs, ref_grads = with_grads(
        lambda *a: reference.looped_attention(*a, causal=causal),
        [t.double() for t in inputs],
        [g.double() for g in grads],
    )
    for name, out, ref in zip(("out", "k", "v"), outputs, ref_outputs):
        assert_close_to_reference(out, ref, dtype, name=name)
    for name, grad, ref in zip(("q", "k_new", "v_new", "gate", "k_cache", "v_cache"), input_grads, ref_grads):
        assert_close_to_reference(grad, ref, dtype, name=f"grad {name}", scale=2.0)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_looped_attention_matches_float64(case, device):
    *shape, gate_width, causal = ATTENTION_CASES[case]
    check_looped_attention(make_attention_inputs(*shape, gate_width, torch.float32, device), causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
def test_looped_attention_16_bit(dtype, device):
    check_looped_attention(make_attention_inputs(1, 4, 2, 33, 40, 32, 1, dtype, device), True, dtype)


def test_first_loop_without_cache_is_plain_attention(device):
    q, k_new, v_new, gate, _, _ = make_attention_inputs(1, 2, 2, 9, 9, 16, 1, torch.float32, device)
    with memops.backend("triton"):
        out, k, v = memops.looped_attention(q, k_new, v_new, gate)
        expected = memops.memory_attention(q, k_new, v_new, causal=True)
    assert k is k_new and v is v_new
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@given(
    gate_value=st.sampled_from([0.0, 1.0]),
    n=st.integers(1, 20),
    extra=st.integers(0, 10),
    gate_width=st.sampled_from([1, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gate_limits_property(gate_value, n, extra, gate_width, seed):
    # g = 0: the updated rows are the new k, v; g = 1: the cache is untouched. Either way, attention over it.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k_new, v_new, gate, k_cache, v_cache = make_attention_inputs(
        1, 2, 1, n, n + extra, 16, gate_width, torch.float32, device, seed=seed
    )
    gate = torch.full_like(gate, gate_value)
    with memops.backend("triton"):
        out, k, v = memops.looped_attention(q, k_new, v_new, gate, k_cache, v_cache)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        if gate_value == 0.0:
            expected_k[:, :, extra:], expected_v[:, :, extra:] = k_new, v_new
        expected_out = memops.memory_attention(q, expected_k, expected_v, causal=True)
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)


def test_four_loop_chain_gradients(device):
    # One layer looped four times in training: every loop recomputes all rows and updates the shared
    # cache; the loss reads every loop's output, so gradients run through the whole chain of updates.
    generator = torch.Generator(device=device).manual_seed(0)
    B, H, Hkv, N, D = 1, 2, 1, 17, 16
    loops = [
        [randn(generator, device, torch.float32, *shape) for shape in ((B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, D))]
        + [torch.rand(B, Hkv, N, 1, generator=generator, device=device)]
        for _ in range(4)
    ]
    weights = [torch.randn(B, H, N, D, generator=generator, device=device) for _ in range(4)]

    def chain(attention, tensors, backend):
        leaves = [[t.detach().clone().requires_grad_() for t in loop] for loop in tensors]
        with memops.backend(backend):
            k_cache = v_cache = None
            loss = 0.0
            for (q, k_new, v_new, gate), w in zip(leaves, weights):
                out, k_cache, v_cache = attention(q, k_new, v_new, gate, k_cache, v_cache)
                loss = loss + (out.to(w.dtype) * w).sum()
            loss.backward()
        return [t.grad for loop in leaves for t in loop]

    ours = chain(memops.looped_attention, loops, "triton")
    theirs = chain(reference.looped_attention, [[t.double() for t in loop] for loop in loops], "reference")
    for index, (grad, ref) in enumerate(zip(ours, theirs)):
        if index == 3:  # the first loop's gate is unused (no cache yet)
            assert grad is None or not grad.ne(0).any()
            continue
        assert_close_to_reference(grad, ref, torch.float32, name=f"grad {index}", scale=2.0)


def test_in_place_looped_attention(device):
    inputs = make_attention_inputs(1, 2, 2, 1, 12, 16, 1, torch.float32, device)
    with memops.backend("triton"), count_launches() as launches:
        expected = memops.looped_attention(*inputs)
        k_cache, v_cache = inputs[4].clone(), inputs[5].clone()
        out, k, v = memops.looped_attention(*inputs[:4], k_cache, v_cache, inplace=True)
    assert k is k_cache and launches["looped_update_fwd_kernel"] == 1
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    assert torch.equal(k, expected[1]) and torch.equal(v, expected[2])


def test_looped_attention_gradcheck_fp64(device):
    inputs = [t.requires_grad_() for t in make_attention_inputs(1, 2, 1, 3, 5, 16, 1, torch.float64, device)]
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(lambda *a: memops.looped_attention(*a), inputs, fast_mode=True)


def test_looped_attention_opcheck(device):
    inputs = [t.requires_grad_() for t in make_attention_inputs(1, 2, 1, 5, 9, 16, 1, torch.float32, device)]
    torch.library.opcheck(torch.ops.memops.looped_attention.default, (*inputs, True, 0.25))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_looped_attention_compile(backend, device):
    if backend == "reference":
        device = "cpu"
    inputs = make_attention_inputs(1, 2, 1, 5, 9, 16, 1, torch.float32, device)

    def loss(*tensors):
        out, k, v = memops.looped_attention(*tensors)
        return out.square().sum() + k.sum() + v.sum()

    check_compiled_grads(loss, inputs, backend=backend, device=device, kernel="looped_attention_fwd_kernel")


def test_nan_gate_propagates(device):
    inputs = make_attention_inputs(1, 2, 1, 4, 6, 16, 1, torch.float32, device)
    inputs[3][0, 0, 1, 0] = float("nan")
    with memops.backend("triton"):
        out, k, _ = memops.looped_attention(*inputs)
    # The NaN gate poisons its own cache row only; attention then propagates it (as SDPA does: a masked
    # key's zero weight times a NaN value is still NaN), with no crash.
    assert k[0, 0, 3].isnan().all() and not k[0, 0, [0, 1, 2, 4, 5]].isnan().any()
    assert out[0, :, 1:].isnan().all()


# --- bad input -----------------------------------------------------------------------------------------

BAD_UPDATE = {
    "gate_shape": (
        lambda kc, vc, kn, vn, g: (kc, vc, kn, vn, g[..., :1, :]),
        {},
        ValueError,
        r"gate must be \(B, Hkv, n, 1\)",
    ),
    "gate_width": (lambda kc, vc, kn, vn, g: (kc, vc, kn, vn, g.expand(-1, -1, -1, 3)), {}, ValueError, "gate must be"),
    "cache_head_dim": (
        lambda kc, vc, kn, vn, g: (kc[..., :4], vc[..., :4], kn, vn, g),
        {},
        ValueError,
        r"k_cache must be \(B=1",
    ),
    "v_cache_shape": (
        lambda kc, vc, kn, vn, g: (kc, vc[:, :, :-1], kn, vn, g),
        {},
        ValueError,
        "v_cache must have k_cache's shape",
    ),
    "v_new_shape": (
        lambda kc, vc, kn, vn, g: (kc, vc, kn, vn[:, :1], g),
        {},
        ValueError,
        "v_new must have k_new's shape",
    ),
    "dtype": (lambda kc, vc, kn, vn, g: (kc.double(), vc, kn, vn, g), {}, TypeError, "k_cache must have k_new's dtype"),
    "int_gate": (lambda kc, vc, kn, vn, g: (kc, vc, kn, vn, g.long()), {}, TypeError, "gate must be floating point"),
    "device": (lambda kc, vc, kn, vn, g: (kc, vc, kn, vn, g.to("meta")), {}, ValueError, "gate is on meta"),
    "rows_count": (
        lambda *a: a,
        {"rows": slice(0, 2)},
        ValueError,
        r"rows slice\(0, 2, None\) names 2 cache rows but k_new has 3",
    ),
    "rows_none": (lambda *a: a, {}, ValueError, "with rows=None, k_new must have the cache's 8 rows"),
    "rows_range": (lambda *a: a, {"rows": torch.tensor([0, 1, 8])}, IndexError, r"rows must lie in \[0, 8\)"),
    "rows_float": (lambda *a: a, {"rows": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "rows must be None, a slice"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATE))
def test_bad_update_input(case, device):
    make_bad, kwargs, error, message = BAD_UPDATE[case]
    inputs = make_update_inputs(1, 2, 8, 3, 8, 1, torch.float32, device)
    if "rows" not in kwargs and case not in ("rows_none",):
        kwargs = {"rows": slice(5, 8)}
    with memops.backend("triton"), count_launches() as launches, pytest.raises(error, match=message):
        memops.looped_kv_update(*make_bad(*inputs), **kwargs)
    assert sum(launches.values()) == 0


def test_in_place_with_grad_is_an_error(device):
    inputs = make_update_inputs(1, 2, 4, 4, 8, 1, torch.float32, device)
    inputs[2].requires_grad_()
    with pytest.raises(ValueError, match="inplace=True is for inference"):
        memops.looped_kv_update(*inputs, inplace=True)
    with pytest.raises(ValueError, match="inplace=True is for inference"):
        q = torch.randn(1, 2, 4, 8, device=device)
        memops.looped_attention(q, inputs[2], inputs[3], inputs[4], inputs[0], inputs[1], inplace=True)


def test_bad_looped_attention_input(device):
    q, k_new, v_new, gate, k_cache, v_cache = make_attention_inputs(1, 2, 1, 5, 9, 16, 1, torch.float32, device)
    with pytest.raises(ValueError, match="k_new has 5 rows but the cache only 3"):
        memops.looped_attention(q, k_new, v_new, gate, k_cache[:, :, :3], v_cache[:, :, :3])
    with pytest.raises(ValueError, match="k_cache and v_cache must be given together"):
        memops.looped_attention(q, k_new, v_new, gate, k_cache)
    with pytest.raises(ValueError, match="looped_attention: q's 3 heads must be a multiple"):
        memops.looped_attention(
            q[:, :1].expand(-1, 3, -1, -1),
            k_new.expand(-1, 2, -1, -1),
            v_new.expand(-1, 2, -1, -1),
            gate.expand(-1, 2, -1, -1),
            k_cache.expand(-1, 2, -1, -1),
            v_cache.expand(-1, 2, -1, -1),
        )


# --- the decode cache ----------------------------------------------------------------------------------


def decode(cache, steps, loops, *, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    returned = None
    for _ in range(steps):
        for loop in range(loops):
            k = torch.randn(1, 2, 1, 8, generator=generator, device=device)
            gate = torch.rand(1, 2, 1, 1, generator=generator, device=device)
            returned = cache.update(k, k * 2, 0, loop, gate)
    return returned


def test_shared_cache_memory_is_independent_of_loops(device):
    one, eight = memops.SharedLoopKVCache(1), memops.SharedLoopKVCache(1)
    with memops.backend("triton"):
        decode(one, steps=20, loops=1, device=device)
        decode(eight, steps=20, loops=8, device=device)
    assert one.memory_bytes() == eight.memory_bytes() > 0
    assert one.get_seq_length(0) == eight.get_seq_length(0) == 20


def test_shared_cache_update_semantics(device):
    cache = memops.SharedLoopKVCache(2)
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randn(1, 2, 5, 8, generator=generator, device=device)
    ones = torch.ones(1, 2, 5, 1, device=device)
    with memops.backend("triton"), count_launches() as launches:
        keys, values = cache.update(prompt, -prompt, 1, 0, ones)  # loop 0: append
        torch.testing.assert_close(keys, prompt) and torch.testing.assert_close(values, -prompt)
        refined = torch.randn(1, 2, 5, 8, generator=generator, device=device)
        gate = torch.rand(1, 2, 5, 8, generator=generator, device=device)
        keys, values = cache.update(refined, -refined, 1, 1, gate)  # loop 1: blend in place
    assert launches["looped_update_fwd_kernel"] == 1
    torch.testing.assert_close(keys, gate * prompt + (1 - gate) * refined)
    torch.testing.assert_close(values, -(gate * prompt + (1 - gate) * refined))
    assert cache.get_seq_length(1) == 5 and cache.get_seq_length(0) == 0
    with pytest.raises(ValueError, match="loop 1 updates the last 6 rows but layer 1 holds 5"):
        cache.update(
            torch.randn(1, 2, 6, 8, device=device),
            torch.randn(1, 2, 6, 8, device=device),
            1,
            1,
            torch.ones(1, 2, 6, 1, device=device),
        )
    with pytest.raises(ValueError, match=r"layer 1 caches \(B, Hkv, D, dtype, device\)"):
        cache.update(
            torch.randn(2, 2, 1, 8, device=device),
            torch.randn(2, 2, 1, 8, device=device),
            1,
            0,
            torch.ones(2, 2, 1, 1, device=device),
        )
    with pytest.raises(IndexError, match=r"layer_idx must be in \[0, 2\)"):
        cache.update(prompt, prompt, 2, 0, ones)


# --- GPU acceptance ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_ouro_shape(dtype):
    # Ouro-1.4B-like: 16 heads x 128, a 2K training chunk.
    check_looped_attention(make_attention_inputs(1, 16, 16, 2048, 2048, 128, 1, dtype, "cuda"), True, dtype)
