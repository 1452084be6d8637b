"""Property suite of the surfaces added after the first fuzz run (issue 30): the Engram family, the composed
memory-attention path and the packed (varlen) ops. Every example runs both backends (Triton under the
interpreter on CPU) on random valid shapes and on the edge classes of issue 30 (scale <= 0 and inf, NaN and
inf inputs, empty dims, ids and pad ids at the int64 limits, eps 0), checking against a float64 oracle:
finite entries within the dtype's tolerance, NaN and inf in the same places on every backend and path.

At least 100 examples per op per backend in every profile (derandomized in CI's).
"""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memops
from memops.reference.engram import engram_hash_params
from memops.testing import TOLERANCES, count_launches, relative_error

EXAMPLES = max(100, settings().max_examples)
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def agree(name, out, ref, dtype=torch.float32, scale=2.0):
    """out equals the float64 ref: the same NaN and inf places, finite entries within tolerance."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    assert torch.equal(out.isnan(), ref.isnan()), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"{name}: inf pattern differs"
    finite = torch.isfinite(ref)
    if finite.any():
        error = relative_error(out[finite], ref[finite])
        assert error <= scale * TOLERANCES[dtype], f"{name}: relative error {error:.2e}"


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def poison(t, kind, seed):
    """t with one entry set to NaN, +inf or -inf (kind), or t itself (kind None)."""
    if kind is None or t.numel() == 0:
        return t
    t = t.clone()
    t.view(-1)[seed % t.numel()] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
    return t


POISON = st.sampled_from([None, None, "nan", "inf", "-inf"])


# --- Engram -------------------------------------------------------------------------------------------------


@PROPERTY
@given(
    B=st.integers(0, 2), L=st.integers(0, 6), N=st.integers(2, 4), h=st.integers(1, 3), seed=st.integers(0, 2**20),
    extreme=st.booleans(), pad_id=st.sampled_from([0, 2, -1, 2**53 + 1, 2**62, -(2**63), 2**63 - 1]),
)  # fmt: skip
def test_ngram_hash_is_bit_exact_on_both_backends(B, L, N, h, seed, extreme, pad_id):
    multipliers, primes = engram_hash_params((1,), [97] * (N - 1), max_ngram_size=N, n_head_per_ngram=h, seed=seed,
                                             tokenizer_vocab_size=500)[1]  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(2**62), 2**62, (B, L), generator=g) if extreme else torch.randint(0, 500, (B, L), generator=g)
    results = []
    for backend in ("triton", "reference"):
        with memops.backend(backend), count_launches() as launches:
            results.append(memops.ngram_hash(ids, multipliers, primes, pad_id=pad_id))
        assert launches["ngram_hash_kernel"] == (backend == "triton" and B * L > 0)
    assert torch.equal(results[0], results[1])
    assert results[0].shape == (B, L, (N - 1) * h) and bool(((results[0] >= 0) & (results[0] < primes.max())).all())


@PROPERTY
@given(
    R=st.integers(0, 5), G=st.integers(0, 3), C=st.integers(0, 40), seed=st.integers(0, 2**20),
    eps=st.sampled_from([None, 0.0, 1e-6, 1.0]), key_poison=POISON, query_poison=POISON,
    dtype=st.sampled_from([torch.float32, torch.float64]),
)  # fmt: skip
def test_engram_gate_agrees_with_float64(R, G, C, seed, eps, key_poison, query_poison, dtype):
    key = poison(randn(seed, R, G, C), key_poison, seed)
    query = poison(randn(seed + 1, R, G, C), query_poison, seed + 7)
    value = randn(seed + 2, R, C)
    w_k, w_q = randn(seed + 3, G, C).abs() + 0.5, randn(seed + 4, G, C).abs() + 0.5
    eps64 = eps if eps is not None else torch.finfo(dtype).eps
    expected = memops.reference.engram.engram_gate(key.double(), query.double(), w_k.double(), w_q.double(),
                                                   value.double(), eps=eps64)  # fmt: skip
    for backend in ("triton", "reference"):
        with memops.backend(backend), count_launches() as launches:
            out = memops.engram_gate(*(t.to(dtype) for t in (key, query, w_k, w_q, value)), eps=eps)
        agree(f"engram_gate {backend}", out, expected, dtype)
        assert launches["engram_gate_fwd_kernel"] == (backend == "triton" and R * G * C > 0)


@PROPERTY
@given(
    B=st.integers(1, 2), L=st.integers(0, 9), G=st.integers(1, 2), C=st.integers(1, 20), K=st.integers(1, 4),
    dilation=st.sampled_from([1, 2, 3, 5, 2**40]), eps=st.sampled_from([0.0, 1e-5]), activation=st.booleans(),
    residual=st.booleans(), x_poison=POISON, seed=st.integers(0, 2**20),
)  # fmt: skip
def test_short_conv_agrees_with_float64(B, L, G, C, K, dilation, eps, activation, residual, x_poison, seed):
    x = poison(randn(seed, B, L, G, C), x_poison, seed)
    weight = 0.3 * randn(seed + 1, G * C, K)
    norm_weight = randn(seed + 2, G, C).abs() + 0.5
    options = dict(dilation=dilation, eps=eps, activation=activation, residual=residual)
    expected = memops.reference.engram.short_conv(x.double(), weight.double(), norm_weight.double(), **options)
    for backend in ("triton", "reference"):
        with memops.backend(backend), count_launches() as launches:
            out = memops.short_conv(x, weight, norm_weight, **options)
        agree(f"short_conv {backend}", out, expected)
        assert launches["short_conv_fwd_kernel"] == (backend == "triton" and x.numel() > 0)


@PROPERTY
@given(B=st.integers(1, 2), L=st.integers(1, 5), context=st.integers(0, 2), seed=st.integers(0, 2**20),
       d=st.integers(1, 9))  # fmt: skip
def test_engram_lookup_reads_the_hashed_rows(B, L, context, seed, d):
    multipliers, primes = engram_hash_params((1,), [41, 37], max_ngram_size=3, n_head_per_ngram=2, seed=seed,
                                             tokenizer_vocab_size=500)[1]  # fmt: skip
    sizes = primes.reshape(-1)
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    table = randn(seed, int(sizes.sum()), d)
    ids = torch.randint(0, 500, (B, context + L), generator=torch.Generator().manual_seed(seed))
    # The oracle: the reference hash (bit-exact, tested above), offsets, and a plain gather.
    rows = memops.reference.engram.ngram_hash(ids, multipliers, primes, pad_id=2)[:, context:] + offsets
    expected = table[rows].flatten(-2)
    for backend in ("triton", "reference"):
        with memops.backend(backend), count_launches() as launches:
            out = memops.engram_lookup(ids, table, multipliers, primes, offsets, pad_id=2, context=context)
        assert torch.equal(out, expected), backend
        assert launches["engram_lookup_fwd_kernel"] == (backend == "triton")


# --- the composed memory-attention path ---------------------------------------------------------------------


def attention_oracle(q, k, v, mem_k, mem_v, causal, scale):
    q, k, v, mem_k, mem_v = (t.double() for t in (q, k, v, mem_k, mem_v))
    keys, values = torch.cat([mem_k.unsqueeze(0), k], 2), torch.cat([mem_v.unsqueeze(0), v], 2)
    logits = scale * q @ keys.transpose(-1, -2)
    N, Nk, M = q.shape[2], k.shape[2], mem_k.shape[1]
    if causal:
        hidden = torch.cat(
            [torch.zeros(N, M, dtype=torch.bool), torch.arange(Nk)[None] > torch.arange(N)[:, None] + Nk - N], 1
        )
        logits = logits.masked_fill(hidden, -math.inf)
    empty = torch.isneginf(logits).all(-1, keepdim=True)
    out = torch.softmax(logits.masked_fill(empty, 0.0), -1) @ values
    return out.masked_fill(empty, 0.0)


@PROPERTY
@given(
    N=st.integers(1, 9), extra_keys=st.integers(0, 6), M=st.integers(0, 4), causal=st.booleans(),
    scale=st.sampled_from([None, 0.0, -0.7, 2.0]), seed=st.integers(0, 2**20), where=st.sampled_from(
        [None, None, "q", "k", "v", "mem_k"]), kind=st.sampled_from(["nan", "inf"]),
)  # fmt: skip
def test_composed_fused_and_reference_agree(N, extra_keys, M, causal, scale, seed, where, kind):
    Nk = N + extra_keys
    q, k, v = randn(seed, 1, 2, N, 16), randn(seed + 1, 1, 2, Nk, 16), randn(seed + 2, 1, 2, Nk, 16)
    mem_k, mem_v = randn(seed + 3, 2, M, 16), randn(seed + 4, 2, M, 16)
    if where is not None and not (where == "mem_k" and M == 0):
        # in the first key and memory row, which every row sees; any entry of q and v
        value = math.nan if kind == "nan" else math.inf
        if where in ("q", "v"):
            {"q": q, "v": v}[where].view(-1)[seed % (q.numel() if where == "q" else v.numel())] = value
        elif where == "k":
            k[0, seed % 2, 0, seed % 16] = value
        else:
            mem_k[seed % 2, 0, seed % 16] = value
    s = 16**-0.5 if scale is None else scale
    expected = attention_oracle(q, k, v, mem_k, mem_v, causal, s)
    outs = {}
    for backend, impl in (("reference", "auto"), ("triton", "fused"), ("triton", "composed")):
        with memops.backend(backend), count_launches() as launches:
            outs[impl] = memops.memory_attention(q, k, v, mem_k, mem_v, causal=causal, scale=scale, impl=impl)
        kernels = launches["memory_attention_fwd_kernel"] + launches["lse_merge_kernel"]  # (scale <= 0: fused)
        assert (kernels > 0) == (backend == "triton")
    if where is None or where == "v":  # finite logits: the oracle's values
        for impl, out in outs.items():
            agree(f"memory_attention {impl}", out, expected)
    else:  # the NaN rows agree across the three paths
        rows = outs["auto"].isnan().any(-1)
        for impl in ("fused", "composed"):
            assert torch.equal(outs[impl].isnan().any(-1), rows), impl


# --- packed (varlen) ops ------------------------------------------------------------------------------------


@PROPERTY
@given(
    lengths=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=3), M=st.integers(0, 2),
    causal=st.booleans(), seed=st.integers(0, 2**20), op=st.sampled_from(["memory", "retention"]),
    where=st.sampled_from([None, None, "q", "k", "v", "mem"]), kind=st.sampled_from(["nan", "inf", "-inf"]),
)  # fmt: skip
def test_varlen_ops_agree_across_backends(lengths, M, causal, seed, op, where, kind):
    """Finite inputs: the backends agree to tolerance. One NaN or +-inf in q, k, v or the memory: the same
    outputs are NaN (and inf) on both backends, as for the padded ops."""
    if op == "retention":  # causal, and every query sees a key of its own sequence
        lengths = [(n, max(n, nk)) for n, nk in lengths]
    cu_q = torch.tensor([0] + [sum(n for n, _ in lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(nk for _, nk in lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = randn(seed, tq, 2, 16), randn(seed + 1, tk, 1, 16), randn(seed + 2, tk, 1, 16)
    mem = randn(seed + 3, 1, M, 16) if M else None
    if where is not None:
        target = {"q": q, "k": k, "v": v, "mem": mem}[where]
        if target is not None and target.numel():
            target.view(-1)[seed % target.numel()] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
    max_q, max_k = max(max(n for n, _ in lengths), 1), max(max(nk for _, nk in lengths), 1)
    outs = []
    for backend in ("triton", "reference"):
        with memops.backend(backend), count_launches() as launches:
            if op == "memory":
                outs.append(memops.memory_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, mem, mem, causal=causal))
            else:
                log_beta = -0.3 * randn(seed + 4, tk, 1).abs()
                outs.append(memops.retention_attention_varlen(q, k, v, log_beta, cu_q, cu_k, max_q, max_k,
                                                              mem_k=mem, mem_v=mem))  # fmt: skip
        assert (launches[f"{op}_attention_fwd_kernel"] > 0) == (backend == "triton" and tq > 0)
    agree(f"{op}_attention_varlen", outs[0], outs[1].double())
