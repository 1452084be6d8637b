"""Property and fuzz suite (issue 16): hypothesis draws valid and invalid inputs for every op family, on both
backends (Triton under the interpreter on CPU), and each case ends in one of three outcomes:

- ``error``: the documented exception type, with the argument named in the message, before any launch;
- ``value``: the result against the float64 reference (itself checked against independent oracles in the
  per-op test files), per-dtype tolerance;
- ``nan``: NaN in an input propagates to exactly the outputs that depend on it, and nowhere else.

Shapes include 0, 1 and non-multiples of every tile; dtypes, index dtypes, non-contiguous and expanded
strides, special values (+-inf, NaN, +-1e4, ties) and wrong argument types are drawn too. Each op runs at
least 100 examples per backend in every profile (CI's draws them with a fixed seed: derandomized, so a run
is reproducible and its time bounded); ``pytest tests/test_fuzz.py --hypothesis-profile memops-long`` draws
300, randomly. After its examples, each test checks that they produced a result and a bad-input error (so a
strategy that stopped drawing one fails), and prints the case counts.
"""

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memops
from memops import reference
from memops.testing import TOLERANCES, count_launches, relative_error

BACKENDS = ["triton", "reference"]
OUTCOMES: Counter = Counter()
# At least 100 examples per op per backend in every profile (derandomized in CI's, random in memops-long).
EXAMPLES = max(100, settings().max_examples)
FUZZ = settings(
    max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None
)


def run_property(prop, backend, family):
    """Run every example of the property ``prop`` on ``backend``, then check that they produced a value (or a
    NaN result) and an error for ``family``: a strategy that stopped drawing one of them would pass silently."""
    before = Counter(OUTCOMES)
    prop(backend)
    seen = OUTCOMES - before
    print(f"\n{family} on {backend}: {dict(sorted(seen.items()))}")
    assert seen[family, "value"] + seen[family, "nan"] > 0, f"{family}: no example computed a result"
    assert seen[family, "error"] > 0, f"{family}: no example was a bad input"


def expect_error(backend, family, call, error, names):
    """The call raises ``error`` naming one of ``names``, and launches nothing."""
    with memops.backend(backend), count_launches() as launches:
        with pytest.raises(error) as raised:
            call()
    message = str(raised.value)
    assert any(name in message for name in names), f"{family}: {error.__name__} does not name {names}: {message}"
    assert not launches, f"{family}: bad input launched {dict(launches)}"
    OUTCOMES[family, "error"] += 1


def check_value(family, out, ref, dtype):
    """Finite entries agree with the float64 reference; non-finite ones have the same pattern."""
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{family}: NaN pattern differs"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(
        out[torch.isinf(out)], ref[torch.isinf(ref)]
    ), f"{family}: inf pattern differs"
    finite = torch.isfinite(ref)
    if finite.any():
        error = relative_error(out[finite], ref[finite])
        assert error <= 2 * TOLERANCES[dtype], f"{family}: relative error {error:.2e}"
    OUTCOMES[family, "nan" if torch.isnan(ref).any() else "value"] += 1


def tensor(draw, shape, dtype, *, low=-1.0, high=1.0):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low).to(dtype)


def maybe_strided(draw, t):
    """t itself, a non-contiguous view with the same values, or an expanded one where a dim is 1."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "padded"]))
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "padded" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    return t


# --- weighted_gather -------------------------------------------------------------------------------------------


@st.composite
def gather_cases(draw):
    S, D, T, K = (
        draw(st.integers(1, 40)),
        draw(st.sampled_from([1, 3, 16, 33])),
        draw(st.integers(0, 9)),
        draw(st.integers(0, 9)),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    values = maybe_strided(draw, tensor(draw, (S, D), dtype))
    indices = torch.tensor(draw(st.lists(st.integers(0, S - 1), min_size=T * K, max_size=T * K)), dtype=torch.long)
    indices = indices.view(T, K).to(draw(st.sampled_from([torch.int32, torch.int64])))
    weights = tensor(draw, (T, K), torch.float32)
    special = draw(st.sampled_from(["none", "nan", "inf", "big", "ties"]))
    if T * K and special != "none":
        t, k = draw(st.integers(0, T - 1)), draw(st.integers(0, K - 1))
        weights[t, k] = {
            "nan": float("nan"),
            "inf": float("inf"),
            "big": 1e4 if dtype != torch.float16 else 1.0,
            "ties": 0.5,
        }[special]
        if special == "ties":
            indices[t] = indices[t, 0]
    bad = draw(st.sampled_from([None] * 4 + ["index_range", "float_indices", "weights_shape", "values_1d"]))
    return values, indices, weights, dtype, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_weighted_gather(backend):
    run_property(fuzz_weighted_gather, backend, "weighted_gather")


@FUZZ
@given(case=gather_cases())
def fuzz_weighted_gather(backend, case):
    values, indices, weights, dtype, bad = case
    if bad == "index_range":  # one row past the table
        indices, weights = torch.tensor([[values.shape[0]]]), torch.ones(1, 1)
        return expect_error(
            backend,
            "weighted_gather",
            lambda: memops.weighted_gather(values, indices, weights),
            IndexError,
            ["indices"],
        )
    if bad is not None:
        args = {
            "float_indices": (values, indices.float(), weights),
            "weights_shape": (values, indices, weights[:, :0] if indices.shape[1] else torch.ones(indices.shape[0], 1)),
            "values_1d": (values[:, 0], indices, weights),
        }[bad]
        error = TypeError if bad == "float_indices" else ValueError
        return expect_error(
            backend, "weighted_gather", lambda: memops.weighted_gather(*args), error, ["indices", "weights", "values"]
        )
    with memops.backend(backend):
        out = memops.weighted_gather(values, indices, weights)
    ref = (weights.double()[..., None] * values.double()[indices.long()]).sum(-2).to(dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    check_value("weighted_gather", out, ref, dtype)


# --- memory_attention ----------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    N, Nk, M = draw(st.integers(0, 40)), draw(st.integers(0, 40)), draw(st.integers(0, 9))
    D = draw(st.sampled_from([16, 32]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    causal = draw(st.booleans())
    q = maybe_strided(draw, tensor(draw, (B, Hkv * group, N, D), dtype, low=-2, high=2))
    k, v = tensor(draw, (B, Hkv, Nk, D), dtype, low=-2, high=2), tensor(draw, (B, Hkv, Nk, D), dtype)
    memory = {}
    if M:
        shape = (Hkv, M, D) if draw(st.booleans()) else (B, Hkv, M, D)
        memory = {"mem_k": tensor(draw, shape, dtype), "mem_v": tensor(draw, shape, dtype)}
        if draw(st.booleans()):
            memory["mem_bias"] = tensor(draw, (M,), dtype)
    special = draw(st.sampled_from(["none", "big", "nan_query"]))
    if special == "big":  # +-1e4 logits: a saturated softmax
        q = q * 1e2
    if special == "nan_query" and N:
        q = q.clone()
        q[0, 0, draw(st.integers(0, N - 1)), 0] = float("nan")
    bad = draw(st.sampled_from([None] * 4 + ["head_dim", "heads", "int_q", "memory_pair"]))
    return q, k, v, memory, causal, dtype, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_memory_attention(backend):
    run_property(fuzz_memory_attention, backend, "memory_attention")


@FUZZ
@given(case=attention_cases())
def fuzz_memory_attention(backend, case):
    q, k, v, memory, causal, dtype, bad = case
    if bad is not None:
        if bad == "head_dim":
            args, kwargs, error, names = (q, k[..., :8], v[..., :8]), {}, ValueError, ["k", "D"]
        elif bad == "heads":
            args, kwargs, error, names = (
                (q[:, :1].expand(-1, 3, -1, -1), k[:, :1].expand(-1, 2, -1, -1), v[:, :1].expand(-1, 2, -1, -1)),
                {},
                ValueError,
                ["H", "Hkv", "heads"],
            )
        elif bad == "int_q":
            args, kwargs, error, names = (q.long(), k, v), {}, TypeError, ["q"]
        else:
            args, kwargs, error, names = (q, k, v), {"mem_k": k}, ValueError, ["mem_k", "mem_v"]
        return expect_error(
            backend, "memory_attention", lambda: memops.memory_attention(*args, causal=causal, **kwargs), error, names
        )
    with memops.backend(backend):
        out, lse = memops.memory_attention(q, k, v, causal=causal, return_lse=True, **memory)
    ref, ref_lse = reference.memory_attention(
        q.double(), k.double(), v.double(), causal=causal, return_lse=True, **{n: t.double() for n, t in memory.items()}
    )
    check_value("memory_attention", out, ref, dtype)
    check_value("memory_attention", lse, ref_lse, dtype)


# --- retention: attention, capacity and loss with documents and special retentions ---------------------------


@st.composite
def retention_cases(draw):
    B, Hkv, group, N, D = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.sampled_from([1, 2])),
        draw(st.integers(1, 40)),
        16,
    )
    q = tensor(draw, (B, Hkv * group, N, D), torch.float32, low=-2, high=2)
    k, v = tensor(draw, (B, Hkv, N, D), torch.float32), tensor(draw, (B, Hkv, N, D), torch.float32)
    log_beta = tensor(draw, (B, Hkv, N), torch.float32, low=-0.5, high=0.0)
    special = draw(st.sampled_from(["none", "zero_beta", "one_beta", "tiny_beta", "nan"]))
    j = draw(st.integers(0, N - 1))
    if special != "none":
        log_beta[0, 0, j] = {"zero_beta": float("-inf"), "one_beta": 0.0, "tiny_beta": -1e4, "nan": float("nan")}[
            special
        ]
    documents = draw(st.sampled_from(["none", "position_ids", "cu_seqlens"]))
    kwargs = {}
    if documents != "none":
        cuts = sorted(draw(st.lists(st.integers(0, N), max_size=4)))
        cu = torch.tensor([0, *cuts, N], dtype=torch.int32)
        if documents == "cu_seqlens":
            kwargs["cu_seqlens"] = cu
        else:
            lengths = (cu[1:] - cu[:-1]).tolist()
            kwargs["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None].expand(B, -1)
    bad = draw(st.sampled_from([None] * 4 + ["positive", "cu_end", "float_ids", "budget"]))
    return q, k, v, log_beta, kwargs, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_retention(backend):
    run_property(fuzz_retention, backend, "retention")


@FUZZ
@given(case=retention_cases())
def fuzz_retention(backend, case):
    q, k, v, log_beta, kwargs, bad = case
    N = q.shape[2]
    if bad == "positive":
        log_beta = log_beta.clone()
        log_beta[0, 0, 0] = 0.5
        return expect_error(
            backend,
            "retention",
            lambda: memops.retention_attention(q, k, v, log_beta, **kwargs),
            ValueError,
            ["log_beta"],
        )
    if bad == "cu_end":
        return expect_error(
            backend,
            "retention",
            lambda: memops.retention_capacity(log_beta, cu_seqlens=torch.tensor([0, N + 1])),
            ValueError,
            ["cu_seqlens"],
        )
    if bad == "float_ids":
        return expect_error(
            backend,
            "retention",
            lambda: memops.capacity_loss(log_beta, 2, position_ids=torch.zeros(1, N)),
            TypeError,
            ["position_ids"],
        )
    if bad == "budget":
        return expect_error(backend, "retention", lambda: memops.capacity_loss(log_beta, "8"), ValueError, ["budget"])
    with memops.backend(backend):
        out = memops.retention_attention(q, k, v, log_beta, **kwargs)
        capacity = memops.retention_capacity(log_beta, **kwargs)
        loss = memops.capacity_loss(log_beta, 2, global_capacity=bool(N % 2), **kwargs)
    doubles = [t.double() for t in (q, k, v, log_beta)]
    check_value("retention", out, reference.retention_attention(*doubles, **kwargs), torch.float32)
    check_value("retention", capacity, reference.retention_capacity(doubles[3], **kwargs), torch.float32)
    check_value(
        "retention", loss, reference.capacity_loss(doubles[3], 2, global_capacity=bool(N % 2), **kwargs), torch.float32
    )


# --- block routing and the expert FFN ----------------------------------------------------------------------------


@st.composite
def routing_cases(draw):
    E = draw(st.sampled_from([4, 8, 16]))
    block_size = draw(st.sampled_from([None, 1, 4, 7]))
    # one interpreted program per block: blocks of one token only over short sequences (time, not coverage)
    B, N = draw(st.integers(1, 2)), draw(st.integers(0, 5 if block_size == 1 else 17))
    n_groups = draw(st.sampled_from([g for g in (1, 2, 4, 8) if E % g == 0]))
    topk_groups = draw(st.integers(1, n_groups))
    top_k = draw(st.integers(1, min(E, topk_groups * (E // n_groups), 4)))
    logits = tensor(draw, (B, N, E), torch.float32, low=-3, high=3)
    if draw(st.booleans()):  # ties: a few distinct values only
        logits = (logits * 2).round() / 2
    kwargs = dict(
        block_size=block_size,
        top_k=top_k,
        min_experts=draw(st.integers(top_k, E)),
        n_groups=n_groups,
        topk_groups=topk_groups,
        score_func=draw(st.sampled_from(["sigmoid", "softmax"])),
        normalize=draw(st.booleans()),
        routed_scaling=draw(st.sampled_from([1.0, 2.5])),
    )
    bad = draw(st.sampled_from([None] * 4 + ["top_k", "n_groups", "normalize", "scaling"]))
    return logits, kwargs, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_block_route_and_experts(backend):
    run_property(fuzz_block_route_and_experts, backend, "block_route")


@FUZZ
@given(case=routing_cases())
def fuzz_block_route_and_experts(backend, case):
    logits, kwargs, bad = case
    E = logits.shape[-1]
    if bad is not None:
        kwargs = {
            **kwargs,
            **{
                "top_k": dict(top_k=E + 1),
                "n_groups": dict(n_groups=3, topk_groups=1),
                "normalize": dict(normalize=1),
                "scaling": dict(routed_scaling=float("inf")),
            }[bad],
        }
        error = TypeError if bad == "normalize" else ValueError
        return expect_error(
            backend,
            "block_route",
            lambda: memops.block_route(logits, **kwargs),
            error,
            ["top_k", "n_groups", "normalize", "routed_scaling", "min_experts"],
        )
    with memops.backend(backend):
        ids, weights, coreset = memops.block_route(logits, **kwargs)
    ref_ids, ref_weights, ref_coreset = reference.block_route(logits, **kwargs)
    assert torch.equal(ids.long(), ref_ids.long()), "ids differ (ties go to the lower index on both backends)"
    assert (coreset is None) == (ref_coreset is None) and (coreset is None or torch.equal(coreset, ref_coreset))
    check_value("block_route", weights, ref_weights, torch.float32)
    # the expert FFN over those routes
    T, d, inner = logits.shape[0] * logits.shape[1], 8, 5
    x = tensor_from(1, (T, d))
    w_gate_up, w_down = tensor_from(2, (E, 2 * inner, d)), tensor_from(3, (E, d, inner))
    flat_ids, flat_weights = ids.reshape(T, kwargs["top_k"]), weights.reshape(T, kwargs["top_k"])
    with memops.backend(backend):
        y = memops.moe_ffn(x, w_gate_up, w_down, flat_ids, flat_weights)
    ref_y = reference.moe_ffn(x.double(), w_gate_up.double(), w_down.double(), flat_ids, flat_weights.double())
    check_value("moe_ffn", y, ref_y, torch.float32)


def tensor_from(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- looped KV update --------------------------------------------------------------------------------------------


@st.composite
def looped_cases(draw):
    B, Hkv, Nk, D = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 30)),
        draw(st.sampled_from([16, 32])),
    )
    n = draw(st.integers(0, Nk))
    cache, new = tensor(draw, (B, Hkv, Nk, D), torch.float32), tensor(draw, (B, Hkv, n, D), torch.float32)
    gate = tensor(draw, (B, Hkv, n, draw(st.sampled_from([1, D]))), torch.float32, low=0.0, high=1.0)
    kind = draw(st.sampled_from(["slice", "tensor", "none"]))
    if kind == "none":
        n, new, gate = Nk, tensor(draw, (B, Hkv, Nk, D), torch.float32), gate.new_full((B, Hkv, Nk, 1), 0.3)
        rows = None
    elif kind == "slice":
        start = draw(st.integers(0, Nk - n))
        rows = slice(start, start + n)
    else:
        rows = torch.randperm(Nk, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))[:n]
    special = draw(st.sampled_from(["none", "inf", "nan"]))
    if special != "none" and n:
        new = new.clone()
        new[0, 0, 0, 0] = float("inf") if special == "inf" else float("nan")
    bad = draw(st.sampled_from([None] * 4 + ["duplicate", "range", "gate_shape"]))
    return cache, new, gate, rows, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_looped_kv_update(backend):
    run_property(fuzz_looped_kv_update, backend, "looped_kv_update")


@FUZZ
@given(case=looped_cases())
def fuzz_looped_kv_update(backend, case):
    cache, new, gate, rows, bad = case
    Nk = cache.shape[2]
    if bad is not None and new.shape[2] >= 1:
        n = new.shape[2]
        if bad == "duplicate" and n >= 2:
            bad_rows, error, names = torch.zeros(n, dtype=torch.long), ValueError, ["rows"]
        elif bad == "gate_shape":
            bad_rows, error, names = rows, ValueError, ["gate"]
            gate = gate[..., :0]
        else:
            bad_rows, error, names = torch.full((n,), Nk), IndexError, ["rows"]
        return expect_error(
            backend,
            "looped_kv_update",
            lambda: memops.looped_kv_update(cache, cache, new, new, gate, rows=bad_rows),
            error,
            names,
        )
    with memops.backend(backend):
        k_out, v_out = memops.looped_kv_update(cache, -cache, new, -new, gate, rows=rows)
    ref_k, ref_v = reference.looped_kv_update(
        cache.double(), -cache.double(), new.double(), -new.double(), gate.double(), rows
    )
    check_value("looped_kv_update", k_out, ref_k, torch.float32)
    check_value("looped_kv_update", v_out, ref_v, torch.float32)


# --- retention cache streams -------------------------------------------------------------------------------------


def test_fuzz_retention_cache_stream():
    run_property(lambda _: fuzz_retention_cache_stream(), "both", "cache")


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), budget=st.integers(1, 6), buffer=st.integers(0, 4), steps=st.integers(1, 10))
def fuzz_retention_cache_stream(seed, budget, buffer, steps):
    """A stream of random updates, some bad, on both backends at once: the budget invariant, all-or-nothing
    failures, returned tensors never changed later, and the same kept rows on both backends."""
    g = torch.Generator().manual_seed(seed)
    caches = {backend: memops.RetentionKVCache(budget, buffer) for backend in BACKENDS}
    returned = []
    for step in range(steps):
        layer = int(torch.randint(0, 2, (1,), generator=g))
        n = int(torch.randint(0, 4, (1,), generator=g))
        k = torch.randn(1, 2, n, 16, generator=g)
        log_beta = -torch.rand(1, 2, n, generator=g) * 0.5
        bad = torch.rand(1, generator=g).item() < 0.15
        if bad and n:
            log_beta[0, 0, 0] = float("nan")
        for backend, cache in caches.items():
            before = cache.get_seq_length(layer)
            with memops.backend(backend):
                if bad and n:
                    with pytest.raises(ValueError, match="log_beta has NaN"):
                        cache.update(k, k, layer, log_beta)
                    assert cache.get_seq_length(layer) == before
                    OUTCOMES["cache", "error"] += 1
                    continue
                keys, values = cache.update(k, k, layer, log_beta)
            assert keys.shape[2] == before + n and torch.equal(keys[:, :, before:], k)
            assert cache.get_seq_length(layer) < budget + buffer or cache.get_seq_length(layer) == budget
            if step % 3 == 0:
                returned.append((keys, keys.clone()))
            OUTCOMES["cache", "value"] += 1
        if not (bad and n):
            a, b = caches["triton"], caches["reference"]
            assert torch.equal(a.positions(layer), b.positions(layer)), "the backends kept different rows"
    for view, copy in returned:
        assert torch.equal(view, copy), "a tensor returned earlier was changed by a later update"
