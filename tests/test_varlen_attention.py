"""Packed (varlen) memory, retention and looped attention: the Triton kernels (interpreter on CPU) against the
float64 reference that runs each sequence on its own, gradients of every input, equality with the padded
ops, the program grid, opcheck, torch.compile over varying lengths, and bad input."""

import pytest
import torch

import memops
from memops.kernels import attention as attention_kernels
from memops.testing import assert_close_to_reference, count_launches, relative_error

H, HKV, D, M = 4, 2, 16, 5
# Lengths around the interpreter's 32-row blocks: empty, one, below, at, above, a multiple, odd.
LENGTHS_Q = [0, 1, 31, 32, 33, 64, 5]
LENGTHS_K = [3, 1, 31, 40, 33, 64, 0]  # causal with fewer queries than keys (and an empty key set)
BACKWARD_KERNELS = ("memory_attention_dq_kernel", "memory_attention_dkdv_kernel")


def cu_seqlens(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def randn(generator, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=generator, device=device).to(dtype)


def memory_inputs(kind, S, generator, dtype, device, *, bias=True):
    if kind is None:
        return {}
    shape = (S, HKV, M, D) if kind == "per_sequence" else (HKV, M, D)
    inputs = {"mem_k": randn(generator, *shape, dtype=dtype, device=device)}
    inputs["mem_v"] = randn(generator, *shape, dtype=dtype, device=device)
    if bias:
        bias_shape = (S, HKV, M) if kind == "per_sequence" else (M,)
        inputs["mem_bias"] = randn(generator, *bias_shape, dtype=torch.float32, device=device)
    return inputs


def run_both(fn, inputs, *, dtype, seed=1):
    """fn(**leaves) -> outputs on backend triton (dtype) and on the float64 reference; the backward through
    every output with one set of random output grads. Returns ((outs, grads) triton, (outs, grads) ref,
    launches)."""
    results = {}
    launches = None
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        leaves = {
            name: (t.detach().to(cast) if t.is_floating_point() else t).requires_grad_(t.is_floating_point())
            for name, t in inputs.items()
        }
        with memops.backend(backend), count_launches() as counted:
            outs = fn(**leaves)
            generator = torch.Generator(device=outs[0].device).manual_seed(seed)
            grads_out = [torch.randn(o.shape, generator=generator, device=o.device).to(o.dtype) for o in outs]
            torch.autograd.backward(list(outs), grads_out)
        grads = {
            n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in leaves.items() if t.requires_grad
        }
        results[backend] = (outs, grads)
        if backend == "triton":
            launches = counted
    return results["triton"], results["reference"], launches


def assert_matches(triton, reference, dtype, names):
    for name, out, ref in zip(names, triton[0], reference[0]):
        if name == "lse":  # rows that see no key have lse -inf in both; compare the rest
            empty = torch.isneginf(ref)
            assert torch.equal(torch.isneginf(out).cpu(), empty.cpu()), "lse: -inf rows differ"
            out, ref = out.masked_fill(empty, 0.0), ref.masked_fill(empty, 0.0)
        assert_close_to_reference(out, ref, dtype, name=name)
    for name, grad in triton[1].items():
        assert_close_to_reference(grad, reference[1][name], dtype, name=f"d{name}", scale=3)


def packed(lengths_q, lengths_k, generator, dtype, device, *, kv_heads=HKV):
    return {
        "q": randn(generator, sum(lengths_q), H, D, dtype=dtype, device=device),
        "k": randn(generator, sum(lengths_k), kv_heads, D, dtype=dtype, device=device),
        "v": randn(generator, sum(lengths_k), kv_heads, D, dtype=dtype, device=device),
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("memory", [None, "per_sequence", "shared"])
def test_memory_attention_varlen_matches_float64(causal, memory, device, poison_empty):
    dtype = torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = packed(LENGTHS_Q, LENGTHS_K, generator, dtype, device)
    inputs.update(memory_inputs(memory, len(LENGTHS_Q), generator, dtype, device))
    cu_q, cu_k = cu_seqlens(LENGTHS_Q, device), cu_seqlens(LENGTHS_K, device)

    def fn(q, k, v, **memory):
        return memops.memory_attention_varlen(
            q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), **memory, causal=causal, return_lse=True
        )

    triton, reference, launches = run_both(fn, inputs, dtype=dtype)
    assert all(launches[name] == 1 for name in ("memory_attention_fwd_kernel", *BACKWARD_KERNELS))
    assert launches["memory_attention.varlen"] == 1
    out, lse = triton[0]
    assert out.shape == inputs["q"].shape and lse.shape == (H, sum(LENGTHS_Q)) and lse.dtype == torch.float32
    assert_matches(triton, reference, "tf32" if torch.cuda.is_available() else dtype, ["out", "lse"])


def test_memory_attention_varlen_float64_is_exact(device):
    generator = torch.Generator(device=device).manual_seed(1)
    lengths_q, lengths_k = [17, 0, 40], [17, 9, 40]
    inputs = packed(lengths_q, lengths_k, generator, torch.float64, device, kv_heads=1)  # MQA
    inputs.update(memory_inputs("per_sequence", 3, generator, torch.float64, device))
    inputs["mem_k"], inputs["mem_v"] = inputs["mem_k"][:, :1], inputs["mem_v"][:, :1]
    inputs["mem_bias"] = inputs["mem_bias"][:, :1].double()
    cu_q, cu_k = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)

    def fn(q, k, v, **memory):
        return memops.memory_attention_varlen(q, k, v, cu_q, cu_k, 40, 40, **memory, causal=True, return_lse=True)

    triton, reference, _ = run_both(fn, inputs, dtype=torch.float64)
    assert_matches(triton, reference, torch.float64, ["out", "lse"])


@pytest.mark.parametrize("memory", [None, "per_sequence", "shared"])
def test_retention_attention_varlen_matches_float64(memory, device, poison_empty):
    dtype = torch.float32
    generator = torch.Generator(device=device).manual_seed(2)
    inputs = packed(LENGTHS_Q, LENGTHS_K, generator, dtype, device)
    inputs.update(memory_inputs(memory, len(LENGTHS_Q), generator, dtype, device, bias=False))
    # strong decay, so the distances (counted within each sequence) matter
    inputs["log_beta"] = -torch.rand(sum(LENGTHS_K), HKV, generator=generator, device=device) * 0.5
    cu_q, cu_k = cu_seqlens(LENGTHS_Q, device), cu_seqlens(LENGTHS_K, device)

    def fn(q, k, v, log_beta, **memory):
        return memops.retention_attention_varlen(q, k, v, log_beta, cu_q, cu_k, 64, 64, **memory, return_lse=True)

    triton, reference, launches = run_both(fn, inputs, dtype=dtype)
    assert all(launches[name] == 1 for name in ("retention_attention_fwd_kernel", *BACKWARD_KERNELS))
    assert launches["retention_attention.varlen"] == 1
    assert triton[1]["log_beta"].shape == inputs["log_beta"].shape
    assert_matches(triton, reference, "tf32" if torch.cuda.is_available() else dtype, ["out", "lse"])


@pytest.mark.parametrize("gate_width", [1, D])
@pytest.mark.parametrize("causal", [True, False])
def test_looped_attention_varlen_matches_float64(gate_width, causal, device, poison_empty):
    dtype = torch.float32
    lengths = [0, 1, 33, 64, 7]
    total = sum(lengths)
    generator = torch.Generator(device=device).manual_seed(3)
    inputs = {"q": randn(generator, total, H, D, device=device)}
    for name in ("k_new", "v_new", "k_cache", "v_cache"):
        inputs[name] = randn(generator, total, HKV, D, device=device)
    inputs["gate"] = torch.rand(total, HKV, gate_width, generator=generator, device=device)
    cu = cu_seqlens(lengths, device)

    def fn(q, k_new, v_new, gate, k_cache, v_cache):
        return memops.looped_attention_varlen(q, k_new, v_new, gate, cu, 64, k_cache, v_cache, causal=causal)

    triton, reference, launches = run_both(fn, inputs, dtype=dtype)
    assert launches["looped_attention.varlen"] == 1 and launches["looped_update_bwd_kernel"] == 1
    assert launches["looped_attention_fwd_kernel"] == 1
    assert_matches(triton, reference, "tf32" if torch.cuda.is_available() else dtype, ["out", "k", "v"])


def test_looped_attention_varlen_first_loop_is_plain_attention(device):
    generator = torch.Generator(device=device).manual_seed(4)
    lengths = [5, 12]
    q = randn(generator, 17, H, D, device=device)
    k, v = randn(generator, 17, HKV, D, device=device), randn(generator, 17, HKV, D, device=device)
    gate = torch.rand(17, HKV, 1, generator=generator, device=device)
    cu = cu_seqlens(lengths, device)
    with memops.backend("triton"):
        out, k_out, v_out = memops.looped_attention_varlen(q, k, v, gate, cu, 12)
        expected = memops.memory_attention_varlen(q, k, v, cu, cu, 12, 12, causal=True)
    assert k_out is k and v_out is v and torch.equal(out, expected)


def _pad(packed_rows, lengths, length):
    """(total, heads, D) rows of equal-length sequences -> (S, heads, length, D)."""
    return packed_rows.view(len(lengths), length, *packed_rows.shape[1:]).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_padded_ops_on_equal_lengths(causal, device):
    """Where both apply (every sequence the same length), the packed ops give the padded ops' results."""
    S, N = 3, 40
    generator = torch.Generator(device=device).manual_seed(5)
    inputs = packed([N] * S, [N] * S, generator, torch.float32, device)
    memory = memory_inputs("per_sequence", S, generator, torch.float32, device)
    log_beta = -torch.rand(S * N, HKV, generator=generator, device=device) * 0.2
    cu = cu_seqlens([N] * S, device)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    with memops.backend("triton"):
        out, lse = memops.memory_attention_varlen(q, k, v, cu, cu, N, N, **memory, causal=causal, return_lse=True)
        padded = [_pad(t, [N] * S, N) for t in (q, k, v)]
        out_p, lse_p = memops.memory_attention(*padded, **memory, causal=causal, return_lse=True)
        retention = memops.retention_attention_varlen(q, k, v, log_beta, cu, cu, N, N)
        retention_p = memops.retention_attention(*padded, log_beta.view(S, N, HKV).transpose(1, 2))
    assert relative_error(out, out_p.transpose(1, 2).reshape(S * N, H, D)) < 1e-6
    assert relative_error(lse, lse_p.transpose(0, 1).reshape(H, S * N)) < 1e-6
    assert relative_error(retention, retention_p.transpose(1, 2).reshape(S * N, H, D)) < 1e-6


def test_deterministic_shared_memory_grads_equal_atomic(device, deterministic):
    generator = torch.Generator(device=device).manual_seed(6)
    inputs = packed(LENGTHS_Q, LENGTHS_K, generator, torch.float32, device)
    inputs.update(memory_inputs("shared", len(LENGTHS_Q), generator, torch.float32, device))
    cu_q, cu_k = cu_seqlens(LENGTHS_Q, device), cu_seqlens(LENGTHS_K, device)

    def grads():
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
        with memops.backend("triton"):
            out = memops.memory_attention_varlen(
                leaves["q"], leaves["k"], leaves["v"], cu_q, cu_k, 64, 64,
                leaves["mem_k"], leaves["mem_v"], mem_bias=leaves["mem_bias"], causal=True,
            )  # fmt: skip
        out.square().sum().backward()
        return [leaves[n].grad for n in ("mem_k", "mem_v", "mem_bias")]

    fixed = grads()  # deterministic mode: per-sequence partials summed in a fixed order
    assert all(torch.equal(a, b) for a, b in zip(fixed, grads()))
    torch.use_deterministic_algorithms(False)
    for a, b in zip(fixed, grads()):  # atomics into one buffer
        assert relative_error(a, b) < 1e-5


def test_grid_covers_the_sequences_blocks_only():
    """Programs map to (sequence, block) pairs: sequence s gets cdiv(len_s, BLOCK) of them, and the grid is
    their sum plus at most S, not S x cdiv(max_len, BLOCK)."""
    lengths = [0, 1, 31, 32, 33, 1000, 5]
    cu = cu_seqlens(lengths)
    program_seq, first_block, grid = attention_kernels.varlen_programs(cu, sum(lengths), 32)
    counts = [-(-n // 32) for n in lengths]
    assert first_block.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    assert sum(counts) <= grid <= sum(counts) + len(lengths) < len(lengths) * -(-max(lengths) // 32)
    expected = [s for s, c in enumerate(counts) for _ in range(c)]
    assert program_seq.tolist() == expected + [len(lengths)] * (grid - sum(counts))  # the rest: no sequence
    # the key-block programs of the backward: each sequence's memory blocks first
    _, first_block, grid = attention_kernels.varlen_programs(cu, sum(lengths), 32, blocks_per_seq=2)
    assert first_block.tolist() == [0, *torch.tensor([c + 2 for c in counts]).cumsum(0).tolist()]


def _opcheck_inputs(device):
    generator = torch.Generator(device=device).manual_seed(7)
    lengths_q, lengths_k = [3, 0, 9], [5, 2, 9]
    inputs = packed(lengths_q, lengths_k, generator, torch.float32, device)
    memory = memory_inputs("per_sequence", 3, generator, torch.float32, device)
    return inputs, memory, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


def test_opcheck(device):
    inputs, memory, cu_q, cu_k = _opcheck_inputs(device)
    q, k, v = (t.requires_grad_() for t in inputs.values())
    mem = [memory[name].requires_grad_() for name in ("mem_k", "mem_v", "mem_bias")]
    op = torch.ops.memops.memory_attention_varlen.default
    torch.library.opcheck(op, (q, k, v, *mem, cu_q, cu_k, True, 0.25, False))
    log_beta = (-torch.rand(k.shape[0], HKV, device=device)).requires_grad_()
    torch.library.opcheck(
        torch.ops.memops.retention_attention_varlen.default, (q, k, v, log_beta, None, None, cu_q, cu_k, 0.25, False)
    )
    rows = [torch.randn(14, HKV, D, device=device, requires_grad=True) for _ in range(4)]
    gate = torch.rand(14, HKV, 1, device=device).requires_grad_()
    q_rows = torch.randn(14, H, D, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.memops.looped_attention_varlen.default,
        (q_rows, rows[0], rows[1], gate, rows[2], rows[3], cu_seqlens([5, 9], device), True, 0.25),
    )


def test_torch_compile_varying_lengths_does_not_recompile(device):
    """fullgraph=True over batches of new lengths (new totals and a new S): with the packed dims marked
    dynamic, one graph serves them all; max_seqlen is a plain int the graph never reads."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager" if device == "cpu" else "inductor")

    def loss(q, k, v, log_beta, cu, max_seqlen):
        out = memops.memory_attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
        out = out + memops.retention_attention_varlen(q, k, v, log_beta, cu, cu, max_seqlen, max_seqlen)
        return out.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    generator = torch.Generator(device=device).manual_seed(8)
    torch._dynamo.reset()
    with memops.backend("triton"):
        for lengths in ([5, 17, 0], [33, 2], [1, 9, 40, 3]):
            total = sum(lengths)
            tensors = packed(lengths, lengths, generator, torch.float32, device)
            log_beta = -torch.rand(total, HKV, generator=generator, device=device) * 0.1
            cu = cu_seqlens(lengths, device)
            for t in (*tensors.values(), log_beta):
                torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(cu, 0)
            leaves = [t.requires_grad_() for t in (*tensors.values(), log_beta)]
            compiled(*leaves, cu, max(lengths)).backward()
            eager = [t.detach().clone().requires_grad_() for t in leaves]
            loss(*eager, cu, max(lengths)).backward()
            for a, b in zip(leaves, eager):
                assert_close_to_reference(a.grad, b.grad, torch.float32)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs for 3 length sets"


# --- bad input ---------------------------------------------------------------------------------

CU = [0, 3, 3, 8]


def _bad_call(change):
    q, k, v = torch.randn(8, H, D), torch.randn(8, HKV, D), torch.randn(8, HKV, D)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=torch.tensor(CU, dtype=torch.int32),
                cu_seqlens_k=torch.tensor(CU, dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=5)  # fmt: skip
    args.update(change(args))
    return lambda: memops.memory_attention_varlen(**args)


BAD = {
    "cu_seqlens int64": (lambda a: {"cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q must be int32"),
    "not from 0": (
        lambda a: {"cu_seqlens_q": torch.tensor([1, 3, 3, 8], dtype=torch.int32)},
        ValueError,
        "start at 0",
    ),
    "decreasing": (
        lambda a: {"cu_seqlens_k": torch.tensor([0, 4, 3, 8], dtype=torch.int32)},
        ValueError,
        "not decrease",
    ),
    "last != total": (
        lambda a: {"cu_seqlens_q": torch.tensor([0, 3, 3, 7], dtype=torch.int32)},
        ValueError,
        "total = 8",
    ),
    "max_seqlen too small": (lambda a: {"max_seqlen_k": 4}, ValueError, "max_seqlen_k=4 is smaller"),
    "max_seqlen not int": (lambda a: {"max_seqlen_q": 5.0}, TypeError, "max_seqlen_q must be an int"),
    "S differs": (
        lambda a: {"cu_seqlens_k": torch.tensor([0, 8], dtype=torch.int32), "max_seqlen_k": 8},
        ValueError,
        "same S \\+ 1",
    ),
    "padded q": (lambda a: {"q": a["q"][None]}, ValueError, "q must be 3-D"),
    "k head dim": (lambda a: {"k": torch.randn(8, HKV, 8), "v": torch.randn(8, HKV, 8)}, ValueError, "D=16"),
    "memory batch": (
        lambda a: {"mem_k": torch.randn(2, HKV, M, D), "mem_v": torch.randn(2, HKV, M, D)},
        ValueError,
        "S=3",
    ),
    "bias batch": (
        lambda a: {
            "mem_k": torch.randn(3, HKV, M, D),
            "mem_v": torch.randn(3, HKV, M, D),
            "mem_bias": torch.randn(2, HKV, M),
        },
        ValueError,
        r"\(S, Hkv, M\)",
    ),  # fmt: skip
    "cu_seqlens a list": (lambda a: {"cu_seqlens_q": CU}, TypeError, "must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_launch(case):
    change, error, message = BAD[case]
    with memops.backend("triton"), count_launches() as launches, pytest.raises(error, match=message):
        _bad_call(change)()
    assert not launches


def test_bad_retention_and_looped_input():
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k = torch.randn(8, H, D), torch.randn(8, HKV, D)
    with memops.backend("triton"), count_launches() as launches:
        with pytest.raises(ValueError, match=r"log_beta must be \(total_k, Hkv\)"):
            memops.retention_attention_varlen(q, k, k, torch.zeros(HKV, 8), cu, cu, 5, 5)
        with pytest.raises(ValueError, match="log_beta must be <= 0"):
            memops.retention_attention_varlen(q, k, k, torch.full((8, HKV), 0.1), cu, cu, 5, 5)
        with pytest.raises(ValueError, match=r"gate must be \(total, Hkv, 1\)"):
            memops.looped_attention_varlen(q, k, k, torch.rand(8, HKV, 3), cu, 5, k, k)
        with pytest.raises(ValueError, match="k_cache and v_cache must be given together"):
            memops.looped_attention_varlen(q, k, k, torch.rand(8, HKV, 1), cu, 5, k)
        with pytest.raises(ValueError, match="k_cache must have k_new's shape"):
            memops.looped_attention_varlen(q, k, k, torch.rand(8, HKV, 1), cu, 5, k[:4], k[:4])
    assert not launches


# --- modules -----------------------------------------------------------------------------------

MODULE_LENGTHS = [7, 0, 33, 1]


def _per_sequence(module_call, x, lengths):
    """The padded module on each sequence alone (batch 1), its outputs packed back."""
    outs, start = [], 0
    for n in lengths:
        if n:
            outs.append(module_call(x[start : start + n][None], start, n)[0])
        start += n
    return torch.cat(outs)


def test_memory_attention_module_packed_equals_per_sequence(device):
    torch.manual_seed(9)
    layer = memops.nn.MemoryAttention(
        64, 4, num_kv_heads=2, causal=True, prefix_length=3, rotary=memops.nn.RotaryEmbedding(16)
    ).to(device)
    total = sum(MODULE_LENGTHS)
    x = torch.randn(total, 64, device=device, requires_grad=True)
    memory = torch.randn(len(MODULE_LENGTHS), 2, 64, device=device)
    cu = cu_seqlens(MODULE_LENGTHS, device)
    with memops.backend("triton"), count_launches() as launches:
        packed_out = layer(x, memory, cu_seqlens=cu, max_seqlen=33)
        packed_out.square().sum().backward()
    assert launches["memory_attention.varlen"] == 1 and packed_out.shape == (total, 64)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    s_of = {start: s for s, start in enumerate(cu[:-1].tolist())}
    with memops.backend("reference"):  # RoPE positions restart at 0 in every sequence
        expected = _per_sequence(lambda xs, start, n: layer(xs, memory[s_of[start]][None]), x.detach(), MODULE_LENGTHS)
        expected.square().sum().backward()
    assert relative_error(packed_out, expected) < 1e-5
    for name, p in layer.named_parameters():
        assert relative_error(grads[name], p.grad) < 1e-4, name


def test_retention_and_looped_modules_packed_equal_per_sequence(device):
    torch.manual_seed(10)
    gate_net = memops.nn.RetentionGate(64, 2, hidden=8).to(device)
    retention = memops.nn.RetentionAttention(64, 4, num_kv_heads=2, rotary=memops.nn.RotaryEmbedding(16)).to(device)
    looped = memops.nn.LoopedAttention(64, 4, num_kv_heads=2, causal=True).to(device)
    total = sum(MODULE_LENGTHS)
    x = torch.randn(total, 64, device=device)
    gate = torch.rand(total, 2, 1, device=device)
    cu = cu_seqlens(MODULE_LENGTHS, device)
    with memops.backend("triton"):
        out_r = retention(x, gate_net(x), cu_seqlens=cu, max_seqlen=33)
        first, shared = looped(x, gate, cu_seqlens=cu, max_seqlen=33)
        second, _ = looped(first, gate, shared=shared, cu_seqlens=cu, max_seqlen=33)
    with memops.backend("reference"):
        expected_r = _per_sequence(lambda xs, start, n: retention(xs, gate_net(xs)), x, MODULE_LENGTHS)

        def two_loops(xs, start, n):
            g = gate[start : start + n].transpose(0, 1)[None]  # (1, Hkv, n, 1)
            y, cache = looped(xs, g)
            return looped(y, g, shared=cache)[0]

        expected_loop = _per_sequence(two_loops, x, MODULE_LENGTHS)
    assert relative_error(out_r, expected_r) < 1e-5
    assert relative_error(second, expected_loop) < 1e-5


def test_module_packed_bad_input():
    layer = memops.nn.MemoryAttention(32, 4)
    cu = cu_seqlens([3, 5])
    with pytest.raises(ValueError, match="both cu_seqlens and max_seqlen"):
        layer(torch.randn(8, 32), cu_seqlens=cu)
    with pytest.raises(ValueError, match="must have 2 dims"):
        layer(torch.randn(1, 8, 32), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match=r"memory must be \(S=2, M, d_model\)"):
        layer(torch.randn(8, 32), torch.randn(3, 2, 32), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="no cache and no prefix"):
        memops.nn.LoopedAttention(32, 4, prefix_length=2)(torch.randn(8, 32), torch.rand(8, 4, 1), cu_seqlens=cu,
                                                          max_seqlen=5)  # fmt: skip


def test_rotary_embedding_depends_on_relative_position_only():
    rope = memops.nn.RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    rq, rk = rope(q, k)  # the same vectors at positions 0..5
    scores = rq[0, 0] @ rk[0, 0].T
    assert torch.allclose(scores[1, 0], scores[5, 4], atol=1e-5) and torch.allclose(scores[0, 0], scores[3, 3])
    assert not torch.allclose(scores[1, 0], scores[2, 0])  # it does rotate
    shifted, _ = rope(q, k, position_ids=torch.arange(6)[None] + 2)
    assert torch.allclose(shifted[0, 0, :4], rq[0, 0, 2:], atol=1e-6)


def test_capacity_loss_takes_the_packed_gate_output(device):
    """The capacity and loss of issue 12 take the same cu_seqlens: the gate's (Hkv, total) output of packed x."""
    gate_net = memops.nn.RetentionGate(64, 2, hidden=8).to(device)
    x = torch.randn(sum(MODULE_LENGTHS), 64, device=device)
    log_beta, cu = gate_net(x), cu_seqlens(MODULE_LENGTHS, device)
    with memops.backend("triton"):
        packed = memops.retention_capacity(log_beta, cu_seqlens=cu)
        loss = memops.capacity_loss(log_beta[None], 4.0, cu_seqlens=cu)
    with memops.backend("reference"):
        start, pieces = 0, []
        for n in MODULE_LENGTHS:
            pieces.append(memops.retention_capacity(log_beta[:, start : start + n]))
            start += n
        expected_loss = memops.capacity_loss(log_beta[None], 4.0, cu_seqlens=cu)
    assert relative_error(packed, torch.cat(pieces, dim=1)) < 1e-5 and relative_error(loss, expected_loss) < 1e-5


def test_flash_varlen_baseline_builds_the_same_op():
    """benchmarks/attention_varlen.py's FlashAttention-varlen baseline puts the memory rows in front of every sequence's
    packed keys; bottom-right causal attention over those is memory attention (checked on the reference)."""
    from memops.benchmarks import attention_varlen as bench

    generator = torch.Generator().manual_seed(11)
    lengths = [5, 0, 12]
    inputs = packed(lengths, lengths, generator, torch.float64, "cpu")
    memory = memory_inputs("shared", 3, generator, torch.float64, "cpu", bias=False)
    cu = cu_seqlens(lengths)
    k, cu_k = bench._with_memory_rows(inputs["k"], memory["mem_k"], cu)
    v, _ = bench._with_memory_rows(inputs["v"], memory["mem_v"], cu)
    concatenated = memops.reference.memory_attention_varlen(inputs["q"], k, v, cu, cu_k, causal=True)
    expected = memops.reference.memory_attention_varlen(
        inputs["q"], inputs["k"], inputs["v"], cu, cu, memory["mem_k"], memory["mem_v"], causal=True
    )
    assert relative_error(concatenated, expected) < 1e-12
