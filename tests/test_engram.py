"""Engram's ops (the layer is tests/test_nn_engram.py). The n-gram hash and fused lookup: the hash parameters
and hash bit-exact against a transcription of the official demo's NumPy rule (tests/engram_demo.py), int64
wrap-around included; the Triton lookup (interpreter on CPU) against the float64 reference, the table
gradient in both modes, bad inputs, opcheck and compile; the gate and the short conv likewise."""

import numpy as np
import pytest
import torch
from engram_demo import DemoShortConv, demo_gate, demo_hash_mapping, demo_isprime, demo_ngram_hashes

import memops
from memops import reference
from memops.reference.engram import engram_hash_params, is_prime, next_prime, table_offsets
from memops.testing import assert_close_to_reference, check_compiled_grads, count_launches, relative_error

CONFIGS = [
    # (layer_ids, vocab_sizes, max_ngram_size, n_head, seed, tokenizer_vocab_size)
    ((1, 15), (129280 * 5, 129280 * 5), 3, 8, 0, 128000),  # the demo's own config (a plausible compressed V)
    ((0, 3, 7), (101, 211, 307), 4, 3, 42, 5000),
    ((2,), (17, 19), 3, 2, 123456789, 1),  # V = 1: the largest multipliers, products wrap for ids >= 2
]


def make_params(layer_ids, vocab_sizes, n, h, seed, vocab):
    return engram_hash_params(
        layer_ids, vocab_sizes, max_ngram_size=n, n_head_per_ngram=h, seed=seed, tokenizer_vocab_size=vocab
    )


def test_prime_search():
    assert [p for p in range(60) if is_prime(p)] == [p for p in range(60) if demo_isprime(p)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1) and not is_prime(3215031751)  # a strong pseudoprime
    assert next_prime(13) == 17 and next_prime(12, {13}) == 17


@pytest.mark.parametrize("config", CONFIGS, ids=["demo", "4-gram", "wrap"])
def test_hash_params_match_the_demo(config):
    layer_ids, vocab_sizes, n, h, seed, vocab = config
    params = make_params(*config)
    multipliers, sizes = demo_hash_mapping(layer_ids, vocab_sizes, n, h, seed, vocab)
    assert list(params) == list(layer_ids)
    for layer_id in layer_ids:
        m, primes = params[layer_id]
        assert m.dtype == torch.int64 and primes.dtype == torch.int64
        np.testing.assert_array_equal(m.numpy(), multipliers[layer_id])
        np.testing.assert_array_equal(primes.numpy(), np.array(sizes[layer_id]))
    all_primes = torch.cat([p.flatten() for _, p in params.values()])
    assert all_primes.unique().numel() == all_primes.numel()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("config", CONFIGS, ids=["demo", "4-gram", "wrap"])
def test_ngram_hash_is_bit_exact(config, backend, device, poison_empty):
    layer_ids, vocab_sizes, n, h, seed, vocab = config
    params = make_params(*config)
    multipliers, sizes = demo_hash_mapping(layer_ids, vocab_sizes, n, h, seed, vocab)
    generator = np.random.default_rng(seed)
    for layer_id in layer_ids:
        # in-vocabulary ids, and ids far outside it (negative too), whose products wrap in int64
        for low, high in ((0, max(vocab, 3)), (-(2**62), 2**62)):
            ids = generator.integers(low, high, size=(3, 13), dtype=np.int64)
            pad_id = int(generator.integers(0, max(vocab, 3)))
            expected = demo_ngram_hashes(ids, multipliers[layer_id], sizes[layer_id], n, h, pad_id)
            m, primes = params[layer_id]
            with memops.backend(backend), count_launches() as launches:
                got = memops.ngram_hash(
                    torch.from_numpy(ids).to(device), m.to(device), primes.to(device), pad_id=pad_id
                )
            assert launches["ngram_hash_kernel"] == (backend == "triton")
            assert got.dtype == torch.int64 and got.shape == (3, 13, (n - 1) * h)
            np.testing.assert_array_equal(got.cpu().numpy(), expected)


def test_the_wrap_case_really_wraps():
    # The "wrap" config's products overflow int64: the test above covers wrap-around, not only small values.
    m, _ = make_params(*CONFIGS[2])[2]
    assert int(m.max()) > 2**61
    with np.errstate(over="ignore"):
        assert (np.int64(2**62) * m.numpy()).tolist() != [2**62 * int(v) for v in m]


def lookup_case(device, *, dtype=torch.float32, B=2, L=9, d=8, seed=0, n=3, h=4):
    m, primes = make_params((5,), tuple(23 + 7 * i for i in range(n - 1)), n, h, seed, 300)[5]
    offsets = table_offsets(primes)
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(int(primes.sum()), d, generator=generator).to(dtype)
    ids = torch.randint(0, 300, (B, L), generator=generator)
    return [t.to(device) for t in (ids, table, m, primes, offsets)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "segment"])
def test_lookup_matches_float64(dtype, deterministic, device, poison_empty):
    ids, table, m, primes, offsets = lookup_case(device, dtype=dtype, L=11, d=24)
    table = table.requires_grad_()
    with memops.backend("triton"), count_launches() as launches:
        out = memops.engram_lookup(ids, table, m, primes, offsets, pad_id=3, deterministic=deterministic)
        grad_out = torch.randn_like(out)
        (grad_table,) = torch.autograd.grad(out, table, grad_out)
    assert launches["engram_lookup_fwd_kernel"] == 1 and launches["ngram_hash_kernel"] == 1
    assert launches["values_grad_segment_kernel" if deterministic else "weighted_gather_bwd_kernel"] == 1
    table64 = table.detach().double().requires_grad_()
    ref = reference.engram.engram_lookup(ids, table64, m, primes, offsets, pad_id=3)
    (ref_grad,) = torch.autograd.grad(ref, table64, grad_out.double())
    assert out.dtype == dtype and out.shape == (2, 11, primes.numel() * 24)
    assert torch.equal(out.double(), ref)  # a gather is a copy: exact in every dtype
    assert grad_table.dtype == dtype
    assert_close_to_reference(grad_table, ref_grad, dtype, name="grad_table")
    assert torch.equal(grad_table[ref_grad == 0], torch.zeros_like(grad_table[ref_grad == 0]))


def test_deterministic_grad_is_bit_identical(device):
    ids, table, m, primes, offsets = lookup_case(device, B=4, L=16)
    table = table.requires_grad_()
    grad_out = None
    grads = []
    for _ in range(2):
        with memops.backend("triton"):
            out = memops.engram_lookup(ids, table, m, primes, offsets, pad_id=0, deterministic=True)
            grad_out = torch.randn_like(out, generator=torch.Generator(device=device).manual_seed(1))
            grads.append(torch.autograd.grad(out, table, grad_out)[0])
    assert torch.equal(grads[0], grads[1])


def test_lookup_layouts_and_shapes(device):
    # strided ids (a transposed view) and a column slice of a wider table (unit column stride, row stride 2d)
    ids, table, m, primes, offsets = lookup_case(device, B=3, L=5, d=6)
    wide = torch.randn(table.shape[0], 12, device=device)
    ids_t = ids.t().contiguous().t()
    with memops.backend("triton"):
        out = memops.engram_lookup(ids_t, wide[:, 3:9], m, primes, offsets, pad_id=1)
        empty = memops.engram_lookup(ids[:, :0], table, m, primes, offsets, pad_id=1)
    ref = reference.engram.engram_lookup(ids, wide[:, 3:9], m, primes, offsets, pad_id=1)
    assert torch.equal(out, ref)
    assert empty.shape == (3, 0, primes.numel() * 6)


def test_lookup_reference_equals_demo_embedding(device):
    # The demo: MultiHeadEmbedding(hash ids + offsets) flattened over heads.
    ids, table, m, primes, offsets = lookup_case(device)
    hashes = torch.from_numpy(
        demo_ngram_hashes(ids.cpu().numpy(), m.numpy(), primes.tolist(), 3, primes.shape[1], 7)
    ).to(device)
    demo = torch.nn.functional.embedding(hashes + offsets, table).flatten(start_dim=-2)
    for backend in ("reference", "triton"):
        with memops.backend(backend):
            assert torch.equal(memops.engram_lookup(ids, table, m, primes, offsets, pad_id=7), demo)
    assert relative_error(demo, demo) == 0


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(ids=lambda ids: ids.float()), TypeError, "ids: expected an int32 or int64"),
        (dict(ids=lambda ids: ids[0]), ValueError, r"ids: expected \(B, L\)"),
        (dict(multipliers=lambda m: m.int()), TypeError, "multipliers: expected an int64"),
        (dict(multipliers=lambda m: m[:1]), ValueError, "multipliers: expected"),
        (dict(primes=lambda p: p[:1]), ValueError, "primes: expected"),
        (dict(primes=lambda p: p - p), ValueError, "primes: expected table sizes >= 1"),
        (dict(offsets=lambda o: o[:-1]), ValueError, "offsets: expected"),
        (dict(offsets=lambda o: o.int()), TypeError, "offsets: expected an int64"),
        (dict(offsets=lambda o: o + 1), IndexError, "past the table"),
        (dict(table=lambda t: t[:-1]), IndexError, "past the table"),
        (dict(table=lambda t: t.long()), TypeError, "table: expected a floating-point"),
        (dict(table=lambda t: t[0]), ValueError, r"table: expected \(rows, d\)"),
        (dict(pad_id=lambda p: 1.5), TypeError, "pad_id must be an int"),
    ],
)
def test_bad_lookup_input(change, error, match, device):
    ids, table, m, primes, offsets = lookup_case(device)
    args = dict(ids=ids, table=table, multipliers=m, primes=primes, offsets=offsets, pad_id=2)
    for name, edit in change.items():
        args[name] = edit(args[name])
    with memops.backend("triton"), count_launches() as launches, pytest.raises(error, match=match):
        memops.engram_lookup(
            args["ids"], args["table"], args["multipliers"], args["primes"], args["offsets"], pad_id=args["pad_id"]
        )
    assert not launches


def test_bad_hash_input(device):
    ids, _, m, primes, _ = lookup_case(device)
    with pytest.raises(ValueError, match="primes: expected"):
        memops.ngram_hash(ids, m, primes.t().contiguous(), pad_id=0)
    with pytest.raises(TypeError, match="pad_id must be an int"):
        memops.ngram_hash(ids, m, primes, pad_id=None)


def test_opcheck(device):
    ids, table, m, primes, offsets = lookup_case(device, L=6)
    torch.library.opcheck(torch.ops.memops.ngram_hash.default, (ids, m, primes, 2))
    table = table.requires_grad_()
    torch.library.opcheck(torch.ops.memops.engram_lookup.default, (ids, table, m, primes, offsets, 2, 0, False))
    torch.library.opcheck(torch.ops.memops.engram_lookup.default, (ids, table, m, primes, offsets, 2, 2, True))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, device):
    ids, table, m, primes, offsets = lookup_case(device, L=6)

    def loss(t):
        return memops.engram_lookup(ids, t, m, primes, offsets, pad_id=2).sin().sum()

    check_compiled_grads(loss, [table], backend=backend, device=device, kernel="engram_lookup_fwd_kernel")


# ---------------------------------------------------------------------------------------------------------
# The context gate


def gate_case(device, dtype=torch.float32, B=2, L=5, G=3, C=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(B, L, G, C), (B, L, G, C), (G, C), (G, C), (B, L, C)]
    tensors = [torch.randn(s, generator=generator) for s in shapes]
    tensors[2] = tensors[2].abs() + 0.5
    tensors[3] = tensors[3].abs() + 0.5
    return [t.to(device=device, dtype=dtype) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gate_matches_float64(dtype, device, poison_empty):
    inputs = [t.requires_grad_() for t in gate_case(device, dtype)]
    with memops.backend("triton"), count_launches() as launches:
        out = memops.engram_gate(*inputs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert launches["engram_gate_fwd_kernel"] == 1 and launches["engram_gate_bwd_kernel"] == 1
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.engram.engram_gate(*inputs64, eps=torch.finfo(dtype).eps)
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out.double())
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close_to_reference(out, ref, dtype)
    for name, grad, ref_grad, t in zip(("key", "query", "w_k", "w_q", "value"), grads, ref_grads, inputs):
        assert grad.dtype == t.dtype and grad.shape == t.shape
        assert_close_to_reference(grad, ref_grad, dtype, name=f"grad_{name}", scale=3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gate_equals_the_demo(backend, device):
    key, query, w_k, w_q, value = gate_case(device, C=32, G=4)
    norm1 = torch.nn.ModuleList([torch.nn.RMSNorm(32) for _ in range(4)]).to(device)
    norm2 = torch.nn.ModuleList([torch.nn.RMSNorm(32) for _ in range(4)]).to(device)
    with torch.no_grad():
        for g in range(4):
            norm1[g].weight.copy_(w_k[g])
            norm2[g].weight.copy_(w_q[g])
    expected = demo_gate(key, query, norm1, norm2, value)
    with memops.backend(backend):
        got = memops.engram_gate(key, query, w_k, w_q, value)  # eps None: nn.RMSNorm's default
    assert_close_to_reference(got, expected, torch.float32)


def test_gate_near_zero_score_has_zero_score_grad(device):
    # query orthogonal to the key in every stream: s = 0, gate = 0.5, and no gradient flows into key/query.
    key, query, w_k, w_q, value = gate_case(device, G=1, C=4)
    key = torch.tensor([1.0, 0.0, 0.0, 0.0], device=device).expand(2, 5, 1, 4).clone().requires_grad_()
    query = torch.tensor([0.0, 1.0, 0.0, 0.0], device=device).expand(2, 5, 1, 4).clone().requires_grad_()
    with memops.backend("triton"):
        out = memops.engram_gate(key, query, w_k[:1], w_q[:1], value)
        grad_key, grad_query = torch.autograd.grad(out.sum(), (key, query))
    assert torch.allclose(out, 0.5 * value.unsqueeze(-2))
    assert torch.equal(grad_key, torch.zeros_like(grad_key)) and torch.equal(grad_query, torch.zeros_like(grad_query))


@pytest.mark.parametrize(
    "index, edit, error, match",
    [
        (0, lambda t: t.long(), TypeError, "key: expected a floating-point"),
        (1, lambda t: t[..., :-1], ValueError, "query: expected key's shape"),
        (2, lambda t: t[:-1], ValueError, r"w_k: expected \(G, C\)"),
        (3, lambda t: t.t(), ValueError, r"w_q: expected \(G, C\)"),
        (4, lambda t: t[:1], ValueError, "value: expected"),
    ],
)
def test_bad_gate_input(index, edit, error, match, device):
    inputs = gate_case(device)
    inputs[index] = edit(inputs[index])
    with memops.backend("triton"), count_launches() as launches, pytest.raises(error, match=match):
        memops.engram_gate(*inputs)
    with pytest.raises(ValueError, match="eps: expected"):
        memops.engram_gate(*gate_case(device), eps=-1.0)
    assert not launches


def test_gate_opcheck(device):
    inputs = [t.requires_grad_() for t in gate_case(device, L=3)]
    torch.library.opcheck(torch.ops.memops.engram_gate.default, (*inputs, 1e-6))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gate_compile(backend, device):
    def loss(*tensors):
        return memops.engram_gate(*tensors).sin().sum()

    check_compiled_grads(loss, gate_case(device, L=3), backend=backend, device=device, kernel="engram_gate_fwd_kernel")


# ---------------------------------------------------------------------------------------------------------
# The short convolution


def conv_case(device, dtype=torch.float32, B=2, L=13, G=3, C=24, K=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, G, C, generator=generator)
    weight = torch.randn(G * C, 1, K, generator=generator) * 0.5
    norm_weight = torch.rand(G, C, generator=generator) + 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, weight, norm_weight)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation, residual", [(True, True), (False, False), (True, False)])
def test_short_conv_matches_float64(dtype, activation, residual, device, poison_empty):
    inputs = [t.requires_grad_() for t in conv_case(device, dtype)]
    options = dict(dilation=3, activation=activation, residual=residual)
    with memops.backend("triton"), count_launches() as launches:
        out = memops.short_conv(*inputs, **options)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert launches["short_conv_fwd_kernel"] == 1
    assert launches["short_conv_bwd_dy_kernel"] == 1 and launches["short_conv_bwd_dx_kernel"] == 1
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.engram.short_conv(*inputs64, **options)
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out.double())
    assert out.dtype == dtype
    assert_close_to_reference(out, ref, dtype)
    for name, grad, ref_grad, t in zip(("x", "weight", "norm_weight"), grads, ref_grads, inputs):
        assert grad.dtype == t.dtype and grad.shape == t.shape
        assert_close_to_reference(grad, ref_grad, dtype, name=f"grad_{name}", scale=3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("L, dilation", [(13, 3), (2, 3), (9, 1)])
def test_short_conv_equals_the_demo(backend, L, dilation, device):
    x, weight, norm_weight = conv_case(device, L=L)
    demo = DemoShortConv(24, 4, dilation, 3).to(device)
    with torch.no_grad():
        demo.conv.weight.copy_(weight)
        for g in range(3):
            demo.norms[g].weight.copy_(norm_weight[g])
    with memops.backend(backend):
        got = memops.short_conv(x, weight, norm_weight, dilation=dilation)
    assert_close_to_reference(got, x + demo(x), torch.float32)


def test_short_conv_decode_equals_full(device):
    x, weight, norm_weight = conv_case(device, L=11)
    with memops.backend("triton"):
        full = memops.short_conv(x, weight, norm_weight, dilation=3)
    state = x.new_zeros(2, 3 * 3, 3, 24)
    steps = []
    for t in range(11):
        out, state = memops.short_conv_step(x[:, t], state, weight, norm_weight, dilation=3)
        steps.append(out)
    assert_close_to_reference(torch.stack(steps, 1), full, torch.float32)
    with pytest.raises(ValueError, match="state: expected"):
        memops.short_conv_step(x[:, 0], state[:, 1:], weight, norm_weight, dilation=3)


@pytest.mark.parametrize(
    "index, edit, error, match",
    [
        (0, lambda t: t[0], ValueError, r"x: expected \(B, L, G, C\)"),
        (0, lambda t: t.long(), TypeError, "x: expected a floating-point"),
        (1, lambda t: t[:-1], ValueError, r"weight: expected \(G\*C, 1, K\)"),
        (1, lambda t: t.expand(-1, 2, -1), ValueError, r"weight: expected \(G\*C, 1, K\)"),
        (2, lambda t: t[:, :-1], ValueError, r"norm_weight: expected \(G, C\)"),
    ],
)
def test_bad_short_conv_input(index, edit, error, match, device):
    inputs = conv_case(device)
    inputs[index] = edit(inputs[index])
    with memops.backend("triton"), count_launches() as launches, pytest.raises(error, match=match):
        memops.short_conv(*inputs, dilation=3)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        memops.short_conv(*conv_case(device), dilation=0)
    assert not launches


def test_short_conv_opcheck(device):
    inputs = [t.requires_grad_() for t in conv_case(device, L=5)]
    torch.library.opcheck(torch.ops.memops.short_conv.default, (*inputs, 2, 1e-5, True, True))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_short_conv_compile(backend, device):
    def loss(*tensors):
        return memops.short_conv(*tensors, dilation=3).sin().sum()

    check_compiled_grads(loss, conv_case(device, L=6), backend=backend, device=device, kernel="short_conv_fwd_kernel")


# ---------------------------------------------------------------------------------------------------------
# The module: the demo's Engram transcribed (its hash on the host in NumPy, nn.Embedding, the gate loop and
# ShortConv), the official names loading strictly, and decode against full recomputation.


def test_benchmark_hash_formulations_are_the_reference():
    from memops.benchmarks import engram as bench

    ids = torch.randint(0, 50, (2, 9))
    m, primes = make_params((1,), (11, 13), 3, 2, 0, 50)[1]
    expected = reference.engram.ngram_hash(ids, m, primes, pad_id=2)
    assert torch.equal(bench.torch_hash(ids, m, primes, 2), expected)
    assert torch.equal(bench.numpy_hash(ids, m, primes, 2), expected)


@pytest.mark.parametrize("context", [1, 2, 9])
def test_lookup_with_context_reads_only_the_new_rows(context, device, poison_empty):
    ids, table, m, primes, offsets = lookup_case(device, L=9)
    table = table.requires_grad_()
    full = reference.engram.engram_lookup(ids, table, m, primes, offsets, pad_id=3)
    with memops.backend("triton"):
        part = memops.engram_lookup(ids, table, m, primes, offsets, pad_id=3, context=context)
        grad_out = torch.randn_like(part)
        (grad,) = torch.autograd.grad(part, table, grad_out)
    assert torch.equal(part, full[:, context:])
    (expected,) = torch.autograd.grad(full[:, context:], table, grad_out)
    assert_close_to_reference(grad, expected, torch.float32)
    with pytest.raises(ValueError, match="context must be in"):
        memops.engram_lookup(ids, table, m, primes, offsets, pad_id=3, context=10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_table_grad(backend, device):
    ids, table, m, primes, offsets = lookup_case(device, L=7)
    dense_table = table.clone().requires_grad_()
    sparse_table = table.clone().requires_grad_()
    with memops.backend(backend), count_launches() as launches:
        dense = memops.engram_lookup(ids, dense_table, m, primes, offsets, pad_id=1, context=1)
        sparse = memops.engram_lookup(ids, sparse_table, m, primes, offsets, pad_id=1, context=1, sparse=True)
        grad_out = torch.randn_like(dense)
        dense.backward(grad_out)
        sparse.backward(grad_out)
    assert (launches["ngram_hash_kernel"] > 0) == (backend == "triton")
    assert torch.equal(sparse, dense)
    assert sparse_table.grad.is_sparse
    assert sparse_table.grad._nnz() == ids.shape[0] * (ids.shape[1] - 1) * primes.numel()
    assert_close_to_reference(sparse_table.grad.to_dense(), dense_table.grad, torch.float32)
    optimizer = torch.optim.SparseAdam([sparse_table], lr=0.1)
    before = sparse_table.detach().clone()
    optimizer.step()
    touched = dense_table.grad.abs().sum(1) > 0
    assert not torch.equal(sparse_table[touched], before[touched])
    assert torch.equal(sparse_table[~touched], before[~touched])
