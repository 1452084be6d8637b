"""TRIM-KV: memops.retention_attention, retention_capacity / capacity_loss and RetentionKVCache (RetentionGate:
test_nn_retention_gate.py).
Triton kernels (interpreter on CPU, compiled on CUDA) against float64 references; the cache against a
plain-Python model of its contract on random streams of appends."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops import reference
from memops.testing import assert_close_to_reference, check_compiled_grads, count_launches

ATTENTION_KERNELS = (
    "retention_attention_fwd_kernel",
    "memory_attention_delta_kernel",
    "memory_attention_dq_kernel",
    "memory_attention_dkdv_kernel",
)


def make_attention_inputs(B, H, Hkv, N, Nk, D, dtype, device, *, seed=0, decay=0.3):
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    log_beta = -decay * torch.rand(B, Hkv, Nk, generator=generator, device=device)  # fp32 beside 16-bit q
    log_beta = log_beta.to(torch.promote_types(dtype, torch.float32))
    return {"q": randn(B, H, N, D), "k": randn(B, Hkv, Nk, D), "v": randn(B, Hkv, Nk, D), "log_beta": log_beta}


def with_memory(inputs, M, *, shared, seed=7):
    generator = torch.Generator(device=inputs["k"].device).manual_seed(seed)
    B, Hkv, _, D = inputs["k"].shape
    shape = (Hkv, M, D) if shared else (B, Hkv, M, D)
    memory = [
        torch.randn(*shape, generator=generator, device=inputs["k"].device).to(inputs["k"].dtype) for _ in range(2)
    ]
    return {**inputs, "mem_k": memory[0], "mem_v": memory[1]}


def run_attention(backend, inputs, grad_out, grad_lse):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    with memops.backend(backend), count_launches() as launches:
        out, lse = memops.retention_attention(**leaves, return_lse=True)
        finite = torch.isfinite(lse)
        torch.autograd.backward([out, lse.masked_fill(~finite, 0.0)], [grad_out, grad_lse])
    return out, lse, {name: t.grad for name, t in leaves.items()}, launches


def check_attention(inputs, dtype):
    q = inputs["q"]
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(q.shape[:3], device=q.device)
    out, lse, grads, launches = run_attention("triton", inputs, grad_out, grad_lse)
    assert all(launches[name] == 1 for name in ATTENTION_KERNELS), dict(launches)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ref_out, ref_lse, ref_grads, _ = run_attention(
        "reference", {name: t.double() for name, t in inputs.items()}, grad_out.double(), grad_lse.double()
    )
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible), "rows with no visible key must have lse -inf"
    assert_close_to_reference(out, ref_out, dtype, name="out")
    assert_close_to_reference(lse[visible], ref_lse[visible], dtype, name="lse")
    for name, grad in grads.items():
        assert_close_to_reference(grad, ref_grads[name], dtype, name=f"grad {name}", scale=2.0)


ATTENTION_CASES = {  # B, H, Hkv, N, Nk, D
    "square": (2, 2, 2, 37, 37, 32),
    "gqa": (1, 4, 2, 33, 33, 16),
    "chunked_prefill": (2, 2, 1, 20, 53, 32),  # N < Nk: queries at the end of a longer key sequence
    "queries_before_keys": (1, 2, 2, 40, 25, 16),  # N > Nk: the first 15 queries see nothing
    "decode": (2, 4, 2, 1, 45, 64),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_retention_attention_matches_float64(case, device):
    inputs = make_attention_inputs(*ATTENTION_CASES[case], torch.float32, device)
    check_attention(inputs, torch.float32)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
def test_retention_attention_16_bit(dtype, device):
    check_attention(make_attention_inputs(2, 4, 2, 37, 37, 32, dtype, device), dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shared", [True, False])
def test_retention_attention_with_memory_rows(shared, device):
    # Memory rows (a learned prefix, memory tokens): visible to every query, no decay; grads to them too.
    inputs = with_memory(make_attention_inputs(2, 4, 2, 29, 33, 32, torch.float32, device), 19, shared=shared)
    check_attention(inputs, torch.float32)


@pytest.mark.usefixtures("deterministic")
def test_retention_attention_shared_memory_deterministic(device):
    inputs = with_memory(make_attention_inputs(3, 2, 1, 17, 17, 16, torch.float32, device), 9, shared=True)
    grad_out = torch.randn_like(inputs["q"])
    grad_lse = torch.zeros(inputs["q"].shape[:3], device=device)
    first = run_attention("triton", inputs, grad_out, grad_lse)[2]
    second = run_attention("triton", inputs, grad_out, grad_lse)[2]
    assert torch.equal(first["mem_k"], second["mem_k"]) and torch.equal(first["mem_v"], second["mem_v"])


def test_zero_log_beta_is_causal_attention(device):
    inputs = make_attention_inputs(2, 4, 2, 33, 40, 32, torch.float32, device)
    with memops.backend("triton"):
        out = memops.retention_attention(inputs["q"], inputs["k"], inputs["v"], torch.zeros_like(inputs["log_beta"]))
        causal = memops.memory_attention(inputs["q"], inputs["k"], inputs["v"], causal=True)
    torch.testing.assert_close(out, causal, rtol=0, atol=0)


def test_strong_decay_attends_to_the_newest_key(device):
    # beta -> 0: every key but the query's own position is decayed away.
    inputs = make_attention_inputs(1, 2, 2, 6, 6, 16, torch.float32, device)
    with memops.backend("triton"):
        out = memops.retention_attention(
            inputs["q"], inputs["k"], inputs["v"], torch.full_like(inputs["log_beta"], -200.0)
        )
    torch.testing.assert_close(out, inputs["v"], rtol=1e-5, atol=1e-5)


def test_retention_attention_gradcheck_fp64(device):
    inputs = make_attention_inputs(1, 2, 1, 5, 7, 16, torch.float64, device)
    leaves = [inputs[name].requires_grad_() for name in ("q", "k", "v", "log_beta")]
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(
            lambda q, k, v, lb: memops.retention_attention(q, k, v, lb), leaves, fast_mode=True
        )


def test_retention_attention_opcheck(device):
    inputs = make_attention_inputs(1, 2, 1, 9, 9, 16, torch.float32, device)
    args = [inputs[name].requires_grad_() for name in ("q", "k", "v", "log_beta")]
    torch.library.opcheck(torch.ops.memops.retention_attention.default, (*args, None, None, None, None, 0.25, False))
    starts, ends, _ = memops.retention.documents("test", 9, 1, None, torch.tensor([0, 4, 9], device=device), device)
    torch.library.opcheck(torch.ops.memops.retention_attention.default, (*args, None, None, starts, ends, 0.25, False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_retention_attention_compile(backend, device):
    if backend == "reference":
        device = "cpu"
    inputs = make_attention_inputs(1, 2, 2, 9, 9, 16, torch.float32, device)

    def loss(q, k, v, lb):
        return memops.retention_attention(q, k, v, lb, check_log_beta=False).square().sum()

    check_compiled_grads(
        loss, list(inputs.values()), backend=backend, device=device, kernel="retention_attention_fwd_kernel"
    )


# --- capacity ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(2, 3, 37), (1, 1, 300), (1, 2, 1), (3, 65)])
def test_capacity_matches_float64(shape, device):
    # N = 300 spans several t and j tiles; (3, 65) is a leading-dims shape.
    generator = torch.Generator(device=device).manual_seed(0)
    log_beta = (-0.2 * torch.rand(*shape, generator=generator, device=device)).requires_grad_()
    with memops.backend("triton"), count_launches() as launches:
        capacity = memops.retention_capacity(log_beta)
        grad = torch.randn_like(capacity)
        capacity.backward(grad)
    assert launches["retention_capacity_fwd_kernel"] == launches["retention_capacity_bwd_kernel"] == 1
    assert capacity.dtype == torch.float32
    log_beta64 = log_beta.detach().double().requires_grad_()
    expected = reference.retention_capacity(log_beta64)
    expected.backward(grad.double())
    assert_close_to_reference(capacity, expected, torch.float32, name="capacity")
    assert_close_to_reference(log_beta.grad, log_beta64.grad, torch.float32, name="grad log_beta")


def test_capacity_closed_forms(device):
    # beta = 1: R_t = t + 1 (every token fully retained); beta -> 0: R_t = 1 (only the newest).
    with memops.backend("triton"):
        full = memops.retention_capacity(torch.zeros(1, 50, device=device))
        none = memops.retention_capacity(torch.full((1, 50), -100.0, device=device))
    torch.testing.assert_close(full, torch.arange(1, 51, dtype=torch.float32, device=device)[None])
    torch.testing.assert_close(none, torch.ones(1, 50, device=device))


def test_capacity_gradcheck_fp64(device):
    log_beta = (-0.3 * torch.rand(2, 19, dtype=torch.float64, device=device)).requires_grad_()
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(memops.retention_capacity, (log_beta,), fast_mode=True)


def test_capacity_loss(device):
    generator = torch.Generator(device=device).manual_seed(0)
    log_beta = (-0.05 * torch.rand(2, 2, 40, generator=generator, device=device)).requires_grad_()
    with memops.backend("triton"):
        loss = memops.capacity_loss(log_beta, 8)
    loss.backward()
    # The definition, written out: the mean over positive entries of relu((R_t - M) / max(t - M, 1)).
    R = reference.retention_capacity(log_beta.detach().double())
    t = torch.arange(40, dtype=torch.float64, device=device)
    excess = torch.relu((R - 8) / torch.clamp(t - 8, min=1))
    torch.testing.assert_close(loss.double(), excess[excess > 0].mean())
    assert log_beta.grad is not None and log_beta.grad.ne(0).any()
    with memops.backend("triton"):  # nothing over budget: zero loss, not NaN
        assert memops.capacity_loss(torch.full((1, 10), -50.0, device=device), 8).item() == 0.0


def test_capacity_opcheck(device):
    log_beta = (-torch.rand(2, 13, device=device)).requires_grad_()
    torch.library.opcheck(torch.ops.memops.retention_capacity.default, (log_beta, None, None))
    starts, ends, _ = memops.retention.documents(
        "test", 13, 2, None, torch.tensor([0, 4, 4, 13], device=device), log_beta.device
    )
    torch.library.opcheck(torch.ops.memops.retention_capacity.default, (log_beta, starts, ends))


# --- bad input -----------------------------------------------------------------------------------------


def _attention_args(device):
    inputs = make_attention_inputs(1, 2, 1, 5, 5, 16, torch.float32, device)
    return inputs["q"], inputs["k"], inputs["v"], inputs["log_beta"]


BAD_ATTENTION = {
    "positive_log_beta": (lambda q, k, v, lb: (q, k, v, lb + 1.0), ValueError, "log_beta must be <= 0"),
    "log_beta_shape": (lambda q, k, v, lb: (q, k, v, lb[..., :-1]), ValueError, r"log_beta must be \(B, Hkv, Nk\)"),
    "log_beta_int": (lambda q, k, v, lb: (q, k, v, lb.long()), TypeError, "log_beta must be floating point"),
    "heads": (
        lambda q, k, v, lb: (q[:, :1], k.expand(-1, 2, -1, -1)[:, :2], v.expand(-1, 2, -1, -1), lb.expand(-1, 2, -1)),
        ValueError,
        "retention_attention: q's 1 heads must be a multiple",
    ),
    "head_dim": (lambda q, k, v, lb: (q, k[..., :8], v, lb), ValueError, "retention_attention: k must be"),
    "dtype": (lambda q, k, v, lb: (q, k.double(), v, lb), TypeError, "retention_attention: k must have q's dtype"),
    "log_beta_device": (lambda q, k, v, lb: (q, k, v, lb.to("meta")), ValueError, "log_beta is on meta"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_ATTENTION))
def test_bad_attention_input(case, backend, device):
    make_bad, error, message = BAD_ATTENTION[case]
    args = make_bad(*_attention_args(device if backend == "triton" else "cpu"))
    with memops.backend(backend), count_launches() as launches, pytest.raises(error, match=message):
        memops.retention_attention(*args)
    assert sum(launches.values()) == 0


def test_nan_log_beta_propagates(device):
    q, k, v, lb = _attention_args(device)
    lb[0, 0, 2] = float("nan")
    with memops.backend("triton"):
        out = memops.retention_attention(q, k, v, lb)
        capacity = memops.retention_capacity(lb)
    assert out[0, :, 2:].isnan().all() and not out[0, :, :2].isnan().any()  # queries that see key 2
    assert capacity[0, 0, 2:].isnan().all() and not capacity[0, 0, :2].isnan().any()


def test_bad_capacity_input(device):
    with pytest.raises(ValueError, match="log_beta must be <= 0"):
        memops.retention_capacity(torch.full((1, 4), 0.5, device=device))
    with pytest.raises(TypeError, match="log_beta must be floating point"):
        memops.retention_capacity(torch.zeros(1, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="budget must be a number >= 0"):
        memops.capacity_loss(torch.zeros(1, 4, device=device), -1)


# --- the cache ---------------------------------------------------------------------------------------


class CacheModel:
    """The cache's contract in plain Python: per (b, h) a list of (position, log_beta, key, value)."""

    def __init__(self, budget, buffer, B, H, score="official"):
        self.budget, self.buffer, self.score = budget, buffer, score
        self.rows = [[[] for _ in range(H)] for _ in range(B)]
        self.position = 0
        self.compactions = 0

    def update(self, k, v, log_beta):
        B, H, n, _ = k.shape
        for b in range(B):
            for h in range(H):
                self.rows[b][h] += [(self.position + i, log_beta[b, h, i], k[b, h, i], v[b, h, i]) for i in range(n)]
        self.position += n
        returned = [
            [
                (torch.stack([r[2] for r in self.rows[b][h]]), torch.stack([r[3] for r in self.rows[b][h]]))
                for h in range(H)
            ]
            for b in range(B)
        ]
        length = len(self.rows[0][0])
        if length >= self.budget + self.buffer and length > self.budget:
            self.compactions += 1
            # scored at (tokens seen + 1) officially, at the next query's position (tokens seen) otherwise
            at = self.position + 1 if self.score == "official" else self.position
            for b in range(B):
                for h in range(H):
                    row = self.rows[b][h]
                    # score in fp32 as the spec; larger first, then the older row
                    score = [float(r[1].float() * float(at - r[0])) for r in row]
                    ranked = sorted(range(len(row)), key=lambda j: (-score[j], j))
                    self.rows[b][h] = [row[j] for j in sorted(ranked[: self.budget])]
        return returned


def run_stream(backend, chunks, budget, buffer, *, B=2, H=2, D=8, seed=0, device="cpu", score="official"):
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = memops.RetentionKVCache(budget, buffer, score=score)
    model = CacheModel(budget, buffer, B, H, score=score)
    with memops.backend(backend):
        for n in chunks:
            k = torch.randn(B, H, n, D, generator=generator, device=device)
            v = torch.randn(B, H, n, D, generator=generator, device=device)
            log_beta = -torch.rand(B, H, n, generator=generator, device=device)
            keys, values = cache.update(k, v, 1, log_beta)
            expected = model.update(k, v, log_beta)
            for b in range(B):
                for h in range(H):
                    assert torch.equal(keys[b, h], expected[b][h][0]) and torch.equal(values[b, h], expected[b][h][1])
            held = cache.get_seq_length(1)
            assert held == len(model.rows[0][0]) and held < budget + buffer or held == budget
            for b in range(B):
                for h in range(H):
                    assert cache.positions(1)[b, h].tolist() == [r[0] for r in model.rows[b][h]]
    return cache, model


@pytest.mark.parametrize("score", ["official", "next_query"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cache_matches_model(backend, score, device):
    chunks = [4, 1, 1, 1, 1, 7, 1, 1, 2, 1, 1, 1, 12, 1]
    cache, model = run_stream(
        backend, chunks, budget=5, buffer=3, device=device if backend == "triton" else "cpu", score=score
    )
    assert model.compactions >= 4
    assert cache.get_seq_length(0) == 0 and len(cache) == 2  # layer 0 never updated


def test_cache_kernels_launch(device):
    with count_launches() as launches:
        run_stream("triton", [6, 3], budget=4, buffer=2, device=device)
    assert launches["retention_select_kernel"] == 2 and launches["cache_gather_kernel"] == 8


@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    budget=st.integers(1, 8),
    buffer=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["reference", "triton"]),
)
def test_cache_property(chunks, budget, buffer, seed, backend):
    device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    run_stream(backend, chunks, budget, buffer, B=1, H=2, D=4, seed=seed, device=device)


def test_cache_keeps_returned_tensors_intact(device):
    cache = memops.RetentionKVCache(budget=3, buffer=1)
    generator = torch.Generator(device=device).manual_seed(0)
    snapshots = []
    with memops.backend("triton"):
        for n in (2, 1, 1, 1, 3):
            k = torch.randn(1, 1, n, 4, generator=generator, device=device)
            keys, values = cache.update(k, k.clone(), 0, -torch.rand(1, 1, n, generator=generator, device=device))
            snapshots.append((keys, keys.clone()))
    for returned, copy in snapshots:  # later appends and compactions did not write into earlier results
        assert torch.equal(returned, copy)


def test_cache_long_prompt_is_attended_in_full_then_compacted(device):
    cache = memops.RetentionKVCache(budget=4, buffer=2)
    k = torch.randn(1, 2, 30, 8, device=device)
    with memops.backend("triton"):
        keys, _ = cache.update(k, k, 0, -torch.rand(1, 2, 30, device=device))
    assert keys.shape[2] == 30 and torch.equal(keys, k)
    assert cache.get_seq_length(0) == 4 and cache.positions(0).shape == (1, 2, 4)
    assert cache.memory_bytes() > 0


BAD_CACHE = {
    "batch": (lambda k, lb: (k[:1], k[:1], lb[:1]), ValueError, r"layer 0 caches \(B, Hkv, D, dtype, device\)"),
    "heads": (lambda k, lb: (k[:, :1], k[:, :1], lb[:, :1]), ValueError, "layer 0 caches"),
    "head_dim": (lambda k, lb: (k[..., :4], k[..., :4], lb), ValueError, "layer 0 caches"),
    "value_shape": (lambda k, lb: (k, k[..., :4], lb), ValueError, "value_states must match key_states"),
    "log_beta_shape": (lambda k, lb: (k, k, lb[..., :1]), ValueError, r"log_beta must be \(B, Hkv, n\)"),
    "keys_3d": (lambda k, lb: (k[0], k[0], lb), ValueError, r"key_states must be \(B, Hkv, n, D\)"),
    "int_log_beta": (lambda k, lb: (k, k, lb.long()), TypeError, "log_beta must be floating point"),
}


@pytest.mark.parametrize("case", sorted(BAD_CACHE))
def test_cache_bad_input(case):
    cache = memops.RetentionKVCache(budget=4, buffer=2)
    k = torch.randn(2, 2, 3, 8)
    cache.update(k, k, 0, -torch.rand(2, 2, 3))
    make_bad, error, message = BAD_CACHE[case]
    keys, values, log_beta = make_bad(k, -torch.rand(2, 2, 3))
    with pytest.raises(error, match=message):
        cache.update(keys, values, 0, log_beta)


@pytest.mark.parametrize(
    "kwargs, message", [(dict(budget=0), "budget must be >= 1"), (dict(budget=4, buffer=-1), "buffer must be >= 0")]
)
def test_cache_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memops.RetentionKVCache(**kwargs)


def test_cache_nan_log_beta_is_an_error(device):
    cache = memops.RetentionKVCache(budget=2, buffer=1)
    k = torch.randn(1, 1, 2, 4, device=device)
    log_beta = -torch.rand(1, 1, 2, device=device)
    log_beta[0, 0, 1] = float("nan")
    with memops.backend("triton"), count_launches() as launches:
        with pytest.raises(ValueError, match="log_beta has NaN"):  # rejected before it joins the cache
            cache.update(k, k, 0, log_beta)
        assert cache.get_seq_length(0) == 0
        cache.update(k, k, 0, -torch.rand(1, 1, 2, device=device))
    assert launches["retention_select_kernel"] == 0


# --- GPU acceptance --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_llm_shape(dtype):
    # A Llama-style layer: 32 query heads over 8 KV heads, head dim 128, 2K tokens.
    check_attention(make_attention_inputs(1, 32, 8, 2048, 2048, 128, dtype, "cuda", decay=0.01), dtype)


@pytest.mark.cuda
def test_cuda_cache_at_budget_1024():
    run_stream("triton", [3000] + [1] * 300, budget=1024, buffer=128, B=1, H=8, D=128, device="cuda")


def official_trimkv_compress(log_beta, positions, seen_tokens, memory_size):
    """Transcribed from ngocbh/trimkv src/trimkv/cache_utils.py, TrimKVCache.compress (lookahead_steps=1, no
    sliding window, no mask): scores = log_beta * (q_idx - kv_positions) with q_idx = seen_tokens + 1, then
    torch.topk(scores, memory_size) and a sort of the indices. Returns the kept positions (B, H, memory_size)."""
    q_idx = seen_tokens + 1
    scores = log_beta.float() * (q_idx - positions)
    top = torch.topk(scores, memory_size, dim=-1).indices
    top, _ = torch.sort(top, dim=-1)
    return positions.gather(-1, top)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eviction_matches_official_trimkv(backend, device):
    # Single compactions from identical states, as the official cache runs them: L = 24 tokens seen (prompt
    # of 24, budget 16); random log_beta in (-1, 0], so ties have probability 0 and topk's arbitrary tie
    # order cannot matter. The official score keeps the same set every time; memops' former rule does not.
    device = device if backend == "triton" else "cpu"
    generator = torch.Generator(device="cpu").manual_seed(0)
    agree = {"official": 0, "next_query": 0}
    trials = 30 if device == "cpu" and backend == "triton" else 300
    for _ in range(trials):
        log_beta = -torch.rand(1, 1, 24, generator=generator)
        k = torch.randn(1, 1, 24, 4, generator=generator)
        expected = official_trimkv_compress(log_beta, torch.arange(24).view(1, 1, 24), 24, 16)
        for score in agree:
            cache = memops.RetentionKVCache(budget=16, buffer=8, score=score)
            with memops.backend(backend):
                cache.update(k.to(device), k.to(device), 0, log_beta.to(device))
            agree[score] += torch.equal(cache.positions(0).cpu(), expected)
    assert agree["official"] == trials, agree
    assert agree["next_query"] < trials, agree  # the two rules really differ on these inputs


# --- packed documents and the global capacity (issue 15, points 4 and 5) ----------------------------------
# Document lengths cross the interpreter's 32-row tiles and the capacity kernels' 64-row tiles, and include a
# document of one token; position_ids packs them as transformers does (each document counts from 0).
DOCUMENT_LENGTHS = [[50, 7, 1, 40, 72], [100, 70]]


def packed_position_ids(lengths_per_row, device):
    return torch.stack([torch.cat([torch.arange(n, device=device) for n in lengths]) for lengths in lengths_per_row])


def official_capacity_loss(log_beta, position_ids, memory_size, *, global_capacity):
    """A plain-Python transcription of the newer official TRIM-KV training loss as issue 15 quotes it: a
    document starts wherever position_ids does not advance by 1, a token's capacity sums over its own
    document, and with global_capacity the capacity is summed over layers and KV heads and compared with
    memory_size * L * Hkv, positions scaled by the same factor. log_beta (B, L, Hkv, N) float64."""
    B, L, Hkv, N = log_beta.shape
    hinge = []
    for b in range(B):
        start = 0
        capacity = torch.zeros(L, Hkv, N, dtype=torch.float64)
        for t in range(N):
            if t > 0 and position_ids[b, t] != position_ids[b, t - 1] + 1:
                start = t
            for j in range(start, t + 1):
                capacity[:, :, t] += torch.exp((t - j) * log_beta[b, :, :, j])
        positions = position_ids[b].double()
        if global_capacity:
            factor = L * Hkv
            excess = (capacity.sum((0, 1)) - memory_size * factor) / torch.clamp(
                positions * factor - memory_size * factor, min=1
            )
        else:
            excess = (capacity - memory_size) / torch.clamp(positions - memory_size, min=1)
        hinge.append(torch.relu(excess).flatten())
    hinge = torch.cat(hinge)
    return hinge[hinge > 0].mean() if (hinge > 0).any() else hinge.sum() * 0


@pytest.mark.parametrize("global_capacity", [True, False])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_capacity_loss_matches_the_official_formula(backend, global_capacity, device):
    generator = torch.Generator(device=device).manual_seed(3)
    B, L, Hkv = 2, 3, 2
    position_ids = packed_position_ids([[9, 1, 14], [24]], device)
    log_beta = -0.08 * torch.rand(B, L, Hkv, 24, generator=generator, device=device)
    expected = official_capacity_loss(log_beta.double().cpu(), position_ids.cpu(), 4, global_capacity=global_capacity)
    assert expected > 0
    with memops.backend(backend):
        loss = memops.capacity_loss(log_beta, 4, global_capacity=global_capacity, position_ids=position_ids)
        # the per-layer list is the stacked tensor, and num_layers checks it
        listed = memops.capacity_loss(
            list(log_beta.unbind(1)), 4, global_capacity=global_capacity, num_layers=L, position_ids=position_ids
        )
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(listed, loss)
    if global_capacity:  # the per-head loss is a different number on the same input
        per_head = memops.capacity_loss(log_beta, 4, position_ids=position_ids)
        assert abs(per_head.item() - loss.item()) > 1e-3


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("documents", ["position_ids", "cu_seqlens"])
def test_capacity_per_document_is_capacity_of_each_document(documents, device):
    # An independent statement of the mask: the packed capacity equals each document's own capacity.
    generator = torch.Generator(device=device).manual_seed(1)
    lengths = [50, 7, 1, 40, 72]
    log_beta = (-0.2 * torch.rand(2, 3, sum(lengths), generator=generator, device=device)).requires_grad_()
    if documents == "position_ids":
        kwargs = {"position_ids": packed_position_ids([lengths, lengths], device)}
    else:
        kwargs = {
            "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        }
    grad = torch.randn(log_beta.shape, generator=generator, device=device)
    with memops.backend("triton"), count_launches() as launches:
        capacity = memops.retention_capacity(log_beta, **kwargs)
        capacity.backward(grad)
    assert launches["retention_capacity_fwd_kernel"] == launches["retention_capacity_bwd_kernel"] == 1
    pieces = log_beta.detach().double().split(lengths, dim=-1)
    pieces = [p.requires_grad_() for p in pieces]
    expected = torch.cat([reference.retention_capacity(p) for p in pieces], dim=-1)
    expected.backward(grad.double())
    assert_close_to_reference(capacity, expected, torch.float32, name="capacity")
    assert_close_to_reference(
        log_beta.grad, torch.cat([p.grad for p in pieces], -1), torch.float32, name="grad log_beta"
    )


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("memory", [False, True])
def test_retention_attention_per_document(memory, device):
    # Packed rows of documents against each document attended on its own (float64), grads included.
    B, H, Hkv, D = 2, 4, 2, 16
    Nk = sum(DOCUMENT_LENGTHS[0])
    inputs = make_attention_inputs(B, H, Hkv, Nk, Nk, D, torch.float32, device, seed=5)
    if memory:
        inputs = with_memory(inputs, 5, shared=True)
    position_ids = packed_position_ids(DOCUMENT_LENGTHS, device)
    grad_out = torch.randn_like(inputs["q"])
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    with memops.backend("triton"), count_launches() as launches:
        out = memops.retention_attention(**leaves, position_ids=position_ids)
        out.backward(grad_out)
    assert all(launches[name] == 1 for name in ATTENTION_KERNELS), dict(launches)
    for b, lengths in enumerate(DOCUMENT_LENGTHS):
        offset = 0
        for n in lengths:
            rows = slice(offset, offset + n)
            piece = {
                name: t.detach()[b : b + 1, :, rows].double().requires_grad_()
                for name, t in inputs.items()
                if name not in ("mem_k", "mem_v")
            }
            piece |= {
                name: inputs[name].detach().double().requires_grad_() for name in ("mem_k", "mem_v") if name in inputs
            }
            expected = reference.retention_attention(**piece)
            expected.backward(grad_out[b : b + 1, :, rows].double())
            assert_close_to_reference(out[b : b + 1, :, rows], expected, torch.float32, name=f"out doc {b}/{offset}")
            for name in ("q", "k", "v", "log_beta"):
                assert_close_to_reference(
                    leaves[name].grad[b : b + 1, :, rows],
                    piece[name].grad,
                    torch.float32,
                    name=f"grad {name} doc {b}/{offset}",
                    scale=2.0,
                )
            offset += n
    if memory:  # the memory grad is the sum over every document of every row
        expected = 0
        for b, lengths in enumerate(DOCUMENT_LENGTHS):
            offset = 0
            for n in lengths:
                rows = slice(offset, offset + n)
                mem = {name: inputs[name].detach().double().requires_grad_() for name in ("mem_k", "mem_v")}
                piece = {name: inputs[name][b : b + 1, :, rows].double() for name in ("q", "k", "v", "log_beta")}
                reference.retention_attention(**piece, **mem).backward(grad_out[b : b + 1, :, rows].double())
                expected = expected + mem["mem_k"].grad
                offset += n
        assert_close_to_reference(leaves["mem_k"].grad, expected, torch.float32, name="grad mem_k", scale=2.0)


@pytest.mark.usefixtures("poison_empty")
def test_retention_attention_documents_with_fewer_queries(device):
    # N < Nk: the queries are the last N keys' positions (bottom-right); cu_seqlens marks the documents.
    inputs = make_attention_inputs(1, 2, 1, 70, 170, 16, torch.float32, device, seed=2)
    cu_seqlens = torch.tensor([0, 33, 33, 64, 65, 130, 170], dtype=torch.int32, device=device)
    grad_out, grad_lse = torch.randn_like(inputs["q"]), torch.randn(inputs["q"].shape[:3], device=device)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    with memops.backend("triton"):
        out, lse = memops.retention_attention(**leaves, cu_seqlens=cu_seqlens, return_lse=True)
        torch.autograd.backward([out, lse], [grad_out, grad_lse])
    doubles = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    ref_out, ref_lse = reference.retention_attention(**doubles, cu_seqlens=cu_seqlens, return_lse=True)
    torch.autograd.backward([ref_out, ref_lse], [grad_out.double(), grad_lse.double()])
    assert_close_to_reference(out, ref_out, torch.float32, name="out")
    assert_close_to_reference(lse, ref_lse, torch.float32, name="lse")
    for name in leaves:
        assert_close_to_reference(leaves[name].grad, doubles[name].grad, torch.float32, name=f"grad {name}", scale=2.0)
    # the same documents through position_ids
    same = reference.retention_attention(
        **{n: t.detach().double() for n, t in inputs.items()},
        position_ids=packed_position_ids([[33, 31, 1, 65, 40]], device),
    )
    torch.testing.assert_close(same, ref_out.detach())


def test_retention_documents_compile(device):
    inputs = make_attention_inputs(1, 2, 2, 40, 40, 16, torch.float32, device)
    position_ids = packed_position_ids([[17, 23]], device)

    def loss(q, k, v, lb):
        out = memops.retention_attention(q, k, v, lb, check_log_beta=False, position_ids=position_ids)
        return out.square().sum() + memops.capacity_loss(
            lb, 4, global_capacity=True, position_ids=position_ids, check_log_beta=False
        )

    check_compiled_grads(
        loss, list(inputs.values()), backend="triton", device=device, kernel="retention_capacity_fwd_kernel"
    )


BAD_DOCUMENTS = {
    "both": (
        dict(position_ids=torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 6])),
        ValueError,
        "position_ids or cu_seqlens, not both",
    ),
    "float position_ids": (dict(position_ids=torch.zeros(1, 6)), TypeError, "position_ids must be an integer"),
    "bool position_ids": (dict(position_ids=torch.zeros(1, 6, dtype=torch.bool)), TypeError, "integer tensor"),
    "position_ids shape": (dict(position_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError, "position_ids must be"),
    "cu_seqlens end": (dict(cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "end at N = 6"),
    "cu_seqlens start": (dict(cu_seqlens=torch.tensor([1, 3, 6])), ValueError, "start at 0"),
    "cu_seqlens decreasing": (dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "not decrease"),
    "cu_seqlens dtype": (dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int16)), TypeError, "int32 or int64"),
    "cu_seqlens shape": (dict(cu_seqlens=torch.tensor([6])), ValueError, r"\(S \+ 1,\)"),
    "cu_seqlens list": (dict(cu_seqlens=[0, 6]), TypeError, "cu_seqlens must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_documents(case, backend):
    kwargs, error, message = BAD_DOCUMENTS[case]
    q, k, v, lb = (torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16), -torch.rand(1, 1, 6))
    with memops.backend(backend), count_launches() as launches:
        for call in (
            lambda: memops.retention_attention(q, k, v, lb, **kwargs),
            lambda: memops.retention_capacity(lb, **kwargs),
            lambda: memops.capacity_loss(lb, 2, **kwargs),
        ):
            with pytest.raises(error, match=message):
                call()
    assert not launches, "bad input must be rejected before any kernel launches"


def test_bad_global_capacity_arguments():
    lb = -torch.rand(1, 2, 3, 8)
    with pytest.raises(ValueError, match="num_layers=3 does not match"):
        memops.capacity_loss(lb, 2, global_capacity=True, num_layers=3)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        memops.capacity_loss(lb, 2, num_layers=0)
    with pytest.raises(ValueError, match="share one shape"):
        memops.capacity_loss([lb[:, 0], lb[:, 0, :2]], 2)
    with pytest.raises(TypeError, match="global_capacity must be a bool"):
        memops.capacity_loss(lb, 2, global_capacity="yes")
    with pytest.raises(ValueError, match="budget must be a number >= 0"):
        memops.capacity_loss(lb, float("nan"))
