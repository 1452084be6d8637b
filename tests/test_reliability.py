"""Issue 16: each bad or extreme input that once gave a wrong answer, a NaN, a crash or an unclear error, on
both backends (Triton under the interpreter on CPU). Every test here failed on the code before the fix."""

import pytest
import torch

import memops
from memops import reference
from memops.models.memory_lm import MemoryLM, MemoryLMConfig
from memops.nn import BlockMoE, MemoryAttention, ProductKeyMemory, RetentionGate
from memops.testing import assert_close_to_reference, count_launches

BACKENDS = ["triton", "reference"]


# --- 1. a silently wrong kernel ------------------------------------------------------------------------------


def test_block_route_groups_of_one_expert():
    logits = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(block_size=4, top_k=2, min_experts=3, n_groups=8, topk_groups=2)
    results = {}
    for backend in BACKENDS:
        with memops.backend(backend):
            results[backend] = memops.block_route(logits, **kwargs)
    ids, weights, coreset = results["triton"]
    ref_ids, ref_weights, ref_coreset = results["reference"]
    assert torch.equal(ids, ref_ids) and torch.equal(coreset, ref_coreset)
    torch.testing.assert_close(weights, ref_weights)
    # A group of one scores its only expert, so group-limited routing at 2 of 8 groups is the plain top-2
    # inside the coreset.
    routing = logits[0].sigmoid().masked_fill(~ref_coreset[0, 0], float("-inf"))
    assert torch.equal(ids[0].long(), routing.topk(2, dim=-1).indices)


# --- 2. log_beta = -inf (beta = 0) is legal ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_retention_is_not_nan(backend):
    log_beta = torch.tensor([[[-0.1, float("-inf"), -0.2]]], requires_grad=True)
    with memops.backend(backend):
        capacity = memops.retention_capacity(log_beta)
        loss = memops.capacity_loss(log_beta, 0.5)
        (capacity.sum() + loss).backward()
    expected = torch.tensor(
        [1.0, 1.0 + torch.exp(torch.tensor(-0.1)).item(), 1.0 + torch.exp(torch.tensor(-0.2)).item()]
    )
    torch.testing.assert_close(capacity[0, 0], expected)
    assert torch.isfinite(loss) and torch.isfinite(log_beta.grad).all()

    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 2, 6, 16, generator=generator),
        torch.randn(1, 1, 6, 16, generator=generator),
        torch.randn(1, 1, 6, 16, generator=generator),
    )
    lb = -torch.rand(1, 1, 6, generator=generator)
    lb[0, 0, 2] = float("-inf")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lb)]
    with memops.backend(backend):
        out = memops.retention_attention(*leaves)
        out.square().sum().backward()
    # beta = 0: key 2 is seen by its own query only, as a decay too strong to survive one step
    oracle = reference.retention_attention(q.double(), k.double(), v.double(), lb.double().clamp(min=-1e4))
    assert_close_to_reference(out, oracle, torch.float32)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# --- 3. empty inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K, D", [(0, 4), (2, 0)])
def test_weighted_gather_empty(K, D, backend):
    values = torch.randn(10, D, requires_grad=True)
    weights = torch.randn(3, K, requires_grad=True)
    with memops.backend(backend):
        out = memops.weighted_gather(values, torch.zeros(3, K, dtype=torch.long), weights)
        out.sum().backward()
    assert out.shape == (3, D) and not out.any()
    assert not values.grad.any() and weights.grad.shape == (3, K)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, k", [(0, 2), (3, 0)])
def test_moe_ffn_without_slots(T, k, backend):
    x = torch.randn(T, 8, requires_grad=True)
    w_gate_up, w_down = torch.randn(4, 6, 8, requires_grad=True), torch.randn(4, 8, 3, requires_grad=True)
    weights = torch.rand(T, k, requires_grad=True)
    with memops.backend(backend):
        out = memops.moe_ffn(x, w_gate_up, w_down, torch.zeros(T, k, dtype=torch.long), weights)
    assert out.shape == (T, 8) and not out.any() and out.grad_fn is not None
    out.sum().backward()
    assert not x.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_without_experts(backend):
    with memops.backend(backend), count_launches() as launches:
        with pytest.raises(ValueError, match="at least one expert"):
            memops.moe_ffn(
                torch.randn(0, 8),
                torch.randn(0, 6, 8),
                torch.randn(0, 8, 3),
                torch.zeros(0, 2, dtype=torch.long),
                torch.rand(0, 2),
            )
    assert not launches


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_on_zero_tokens(backend):
    torch.manual_seed(0)
    with memops.backend(backend):
        pkm = ProductKeyMemory(12, 10, n_keys=8, heads=2, topk=4, key_dim=16)
        out = pkm(torch.randn(0, 12))
        assert out.shape == (0, 10)
        out.sum().backward()
        assert pkm(torch.randn(2, 0, 12)).shape == (2, 0, 10)
        moe = BlockMoE(16, 8, 8, 2, block_size=4, min_experts=2)
        y = moe(torch.randn(2, 0, 16))
        assert y.shape == (2, 0, 16)
        y.sum().backward()
        scores, indices = memops.product_key_topk(torch.randn(5, 0, 16), torch.randn(0, 2, 8, 8), 4)
        assert scores.shape == indices.shape == (5, 0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_edge_cases(backend):
    torch.manual_seed(0)
    model = MemoryLM(
        MemoryLMConfig(
            vocab_size=16,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            max_positions=32,
            prefix_length=0,
            pkm_layers=(),
            kv_budget=8,
            kv_buffer=2,
        )
    )
    with memops.backend(backend):
        tokens, _ = model.generate(torch.zeros(0, 3, dtype=torch.long), 4)
        assert tokens.shape == (0, 7)
        with pytest.raises(ValueError, match="at least one token"):
            model.generate(torch.zeros(2, 0, dtype=torch.long), 4)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
            model.generate(torch.zeros(1, 3, dtype=torch.long), -2)
        with pytest.raises(IndexError, match=r"must lie in \[0, vocab_size=16\)"):
            model(torch.full((1, 3), 16))
        with pytest.raises(TypeError, match="integer token ids"):
            model(torch.zeros(1, 3))


# --- 4. caches -----------------------------------------------------------------------------------------------


def test_retention_cache_layer_indices():
    cache = memops.RetentionKVCache(budget=4, buffer=2)
    k = torch.randn(1, 1, 3, 8)
    cache.update(k, k, 10**9, -torch.rand(1, 1, 3))  # sparse: no billion placeholders
    assert cache.get_seq_length(10**9) == 3 and cache.get_seq_length(0) == 0 and len(cache) == 10**9 + 1
    assert cache.memory_bytes() < 10**4
    for call in (
        lambda: cache.get_seq_length(-1),
        lambda: cache.positions(-1),
        lambda: cache.log_beta(-1),
        lambda: cache.update(k, k, -1, -torch.rand(1, 1, 3)),
    ):
        with pytest.raises(IndexError, match="layer_idx must be >= 0"):
            call()
    with pytest.raises(TypeError, match="layer_idx must be an int"):
        cache.get_seq_length(1.0)


def test_shared_loop_cache_layer_indices():
    cache = memops.SharedLoopKVCache(2)
    for call in (lambda: cache.get_seq_length(5), lambda: cache.get_seq_length(-1)):
        with pytest.raises(IndexError, match=r"layer_idx must be in \[0, 2\)"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retention_cache_update_is_all_or_nothing(backend):
    cache = memops.RetentionKVCache(budget=3, buffer=1)
    k = torch.randn(1, 2, 2, 8)
    with memops.backend(backend):
        cache.update(k, k, 0, -torch.rand(1, 2, 2))
        before = (cache.get_seq_length(0), cache.positions(0).clone(), cache.log_beta(0).clone())
        bad = -torch.rand(1, 2, 2)
        bad[0, 1, 0] = float("nan")
        with pytest.raises(ValueError, match="log_beta has NaN"):
            cache.update(k, k, 0, bad)
        assert cache.get_seq_length(0) == before[0]
        assert torch.equal(cache.positions(0), before[1]) and torch.equal(cache.log_beta(0), before[2])
        # later clean updates work, and the cache stays within budget + buffer
        for _ in range(5):
            keys, _ = cache.update(k, k, 0, -torch.rand(1, 2, 2))
            assert keys.shape[2] <= 3 + 1 + 2 and cache.get_seq_length(0) <= 3 + 1
        # without the per-update check, the failing compaction still leaves the cache as it was
        lazy = memops.RetentionKVCache(budget=3, buffer=1, check_log_beta=False)
        lazy.update(k, k, 0, bad)
        length = lazy.get_seq_length(0)
        with pytest.raises(ValueError, match="log_beta has NaN"):
            lazy.update(k, k, 0, -torch.rand(1, 2, 2))
        assert lazy.get_seq_length(0) == length


def test_caches_filled_under_inference_mode():
    retention, shared = memops.RetentionKVCache(budget=4, buffer=2), memops.SharedLoopKVCache(1)
    k, gate = torch.randn(1, 1, 2, 16), torch.full((1, 1, 2, 1), 0.5)
    with torch.inference_mode():
        kept, _ = retention.update(k, k, 0, -torch.rand(1, 1, 2))
        shared.update(k, k, 0, 0, gate)
    keys, _ = retention.update(k, k, 0, -torch.rand(1, 1, 2))
    assert keys.shape[2] == 4 and torch.equal(keys[:, :, :2], kept)
    keys, _ = shared.update(k * 2, k * 2, 0, 1, gate)
    torch.testing.assert_close(keys, 1.5 * k)


# --- 5. accepted without error ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_looped_argument_checks(backend):
    gate = torch.full((1, 1, 3, 1), 0.5)
    new, cache = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 5, 16)
    with memops.backend(backend), count_launches() as launches:
        with pytest.raises(ValueError, match="q must have k_new's n=3 rows"):
            memops.looped_attention(torch.randn(1, 2, 2, 16), new, new, gate, cache, cache)
        with pytest.raises(ValueError, match="q must have k_new's n=3 rows"):
            memops.looped_attention(torch.randn(1, 2, 2, 16), new, new, gate)
        with pytest.raises(ValueError, match="rows must be distinct"):
            memops.looped_kv_update(
                cache, cache, new[:, :, :2], new[:, :, :2], gate[:, :, :2], rows=torch.tensor([3, 3])
            )
    assert not launches


def test_unique_experts_ids():
    with pytest.raises(ValueError, match="topk_ids must be >= 0"):
        memops.unique_experts(torch.tensor([[[-1, 2]]]), 2)
    with pytest.raises(TypeError, match="not bool"):
        memops.unique_experts(torch.ones(1, 2, 2, dtype=torch.bool), 2)
    counts = memops.unique_experts(torch.tensor([[[2**40, 2**40], [3, 2**40], [1, 1]]]), 2)
    assert counts.tolist() == [[2, 1]]
    assert memops.unique_experts(torch.zeros(2, 3, 0, dtype=torch.long), 2).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(normalize="no"), TypeError, "normalize must be a bool"),
        (dict(routed_scaling="2"), TypeError, "routed_scaling must be a number"),
        (dict(routed_scaling=float("nan")), ValueError, "routed_scaling must be finite"),
    ],
)
def test_block_route_scalar_types(kwargs, error, message, backend):
    with memops.backend(backend), count_launches() as launches:
        with pytest.raises(error, match=message):
            memops.block_route(torch.randn(1, 4, 8), block_size=4, top_k=2, min_experts=2, **kwargs)
    assert not launches


def test_module_and_config_sizes():
    for make, message in [
        (lambda: MemoryAttention(32, 2, head_dim=0), "head_dim must be >= 1"),
        (lambda: MemoryAttention(32, 2, num_kv_heads=0), "num_kv_heads must be >= 1"),
        (lambda: MemoryAttention(2, 4), "leaves head_dim 0"),
        (lambda: ProductKeyMemory(8, 8, heads=0), "heads must be >= 1"),
        (lambda: BlockMoE(8, 4, 4, 5), "top_k=5 exceeds n_experts=4"),
        (lambda: MemoryLMConfig(moe_experts=2, moe_top_k=3).validate(), "moe_top_k=3 must not exceed"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="budget must be a number >= 0"):
        memops.capacity_loss(-torch.rand(1, 1, 4), float("nan"))


# --- 6. clear errors from the modules ------------------------------------------------------------------------------


def test_module_input_errors():
    attention, moe, gate = MemoryAttention(32, 2), BlockMoE(16, 8, 8, 2, min_experts=2), RetentionGate(16, 2, hidden=8)
    pkm = ProductKeyMemory(12, 10, n_keys=8, heads=2, topk=4, key_dim=16)
    cases = [
        (lambda: attention(torch.randn(1, 4, 31)), ValueError, "x must have 32 features"),
        (lambda: attention(torch.randn(1, 4, 32, dtype=torch.float64)), TypeError, "x is torch.float64"),
        (lambda: attention(torch.randn(4, 32)), ValueError, "x must have 3 dims"),
        (lambda: attention(torch.randn(1, 4, 32), torch.randn(2, 3, 32)), ValueError, "memory must be"),
        (lambda: moe(torch.randn(4, 16)), ValueError, "x must have 3 dims"),
        (lambda: moe(torch.randn(1, 4, 15)), ValueError, "x must have 16 features"),
        (lambda: gate(torch.randn(1, 4, 15)), ValueError, "x must have 16 features"),
        (lambda: pkm(torch.randn(3, 11)), ValueError, "x must have 12 features"),
        (lambda: pkm(torch.zeros(3, 12, dtype=torch.long)), TypeError, "x must be floating point"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# --- 7. the backends agree on inf ------------------------------------------------------------------------------------


def test_backends_agree_on_inf():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 16, generator=generator)
    q[..., 0] = 1.0
    k, v = torch.randn(1, 1, 3, 16, generator=generator), torch.randn(1, 1, 3, 16, generator=generator)
    k[0, 0, 1, 0] = float("inf")  # a +inf logit for every query
    cache, new = torch.randn(1, 1, 4, 16, generator=generator), torch.full((1, 1, 2, 16), float("inf"))
    logits = torch.randn(1, 4, 8, dtype=torch.float64, generator=generator)
    results = {}
    for backend in BACKENDS:
        with memops.backend(backend):
            _, lse = memops.memory_attention(q, k, v, return_lse=True)
            k_out, _ = memops.looped_kv_update(cache, cache, new, new, torch.full((1, 1, 2, 1), 0.25), rows=slice(2, 4))
            _, weights, _ = memops.block_route(logits, block_size=4, top_k=2, min_experts=2)
            results[backend] = (lse, k_out, weights)
    for a, b in zip(results["triton"], results["reference"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isposinf(results["triton"][0]).all() and torch.isposinf(results["triton"][1][:, :, 2:]).all()
    assert results["triton"][2].dtype == torch.float64


# --- 8. meta tensors and FakeTensor tracing ------------------------------------------------------------------------


def test_retention_ops_on_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(device):
        q, k = torch.empty(1, 2, 8, 16, device=device), torch.empty(1, 1, 8, 16, device=device)
        lb = torch.empty(1, 1, 8, device=device)
        out = memops.retention_attention(q, k, k, lb, cu_seqlens=torch.tensor([0, 3, 8], device=device))
        capacity = memops.retention_capacity(lb)
        ids = memops.unique_experts(torch.zeros(1, 4, 2, dtype=torch.long, device=device), 2)
        return out.shape, capacity.shape, ids.shape

    with memops.backend("triton"):
        assert run("meta") == ((1, 2, 8, 16), (1, 1, 8), (1, 2))
        with FakeTensorMode():
            assert run("cpu") == ((1, 2, 8, 16), (1, 1, 8), (1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_log_beta_beside_nan_is_rejected(backend):
    # found by the fuzz suite: max() is NaN when a NaN is present, which hid the positive entry
    with memops.backend(backend), pytest.raises(ValueError, match="log_beta must be <= 0"):
        memops.retention_capacity(torch.tensor([[[0.5, float("nan")]]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_gives_a_nan_row(backend):
    # found by the fuzz suite: torch's CPU flash SDPA returns 0 for a NaN query row; the spec says NaN
    q, k = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 5, 16)
    q[0, 0, 1, 0] = float("nan")
    with memops.backend(backend):
        out = memops.memory_attention(q, k, k)
        decayed = memops.retention_attention(q, k, k, -torch.rand(1, 1, 5))
    for o in (out, decayed):
        assert o[0, 0, 1].isnan().all() and not o[0, 0, [0, 2]].isnan().any()
