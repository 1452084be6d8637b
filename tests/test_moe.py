"""dMoE: memops.block_route (fused routing kernel), unique_experts, memops.moe_ffn (grouped GEMMs) (BlockMoE:
test_nn_block_moe.py), against float64 references written from the algorithm and a per-slot expert loop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memops
from memops import reference
from memops.reference.moe import expert_ffn
from memops.testing import assert_close_to_reference, check_compiled_grads, count_launches, relative_error

GEMM_KERNELS = ("grouped_gemm_kernel", "grouped_weight_grad_kernel")


def make_logits(B, N, E, device, *, seed=0, dtype=torch.float32):
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(B, N, E, generator=generator, device=device).to(dtype)


def route_both(logits, **kwargs):
    """The Triton routing (with grads through the weights) and the float64 reference (idem)."""
    leaf = logits.detach().clone().requires_grad_()
    with memops.backend("triton"), count_launches() as launches:
        ids, weights, coreset = memops.block_route(leaf, **kwargs)
    grad = torch.randn_like(weights)
    weights.backward(grad)
    leaf64 = logits.detach().double().requires_grad_()
    bias = kwargs.pop("expert_bias", None)
    ref_ids, ref_weights, ref_coreset = reference.block_route(
        leaf64, expert_bias=None if bias is None else bias.double(), **kwargs
    )
    ref_weights.backward(grad.double())
    assert launches["block_route_kernel"] == 1
    return (ids, weights, coreset, leaf.grad), (ref_ids, ref_weights, ref_coreset, leaf64.grad)


ROUTING = {  # B, N, E, kwargs
    "sigmoid_blocks": (2, 40, 64, dict(block_size=16, top_k=4, min_experts=6)),
    "softmax_mixtral_like": (2, 50, 8, dict(block_size=32, top_k=2, min_experts=2, score_func="softmax")),
    "bias_and_groups": (
        2,
        37,
        64,
        dict(block_size=16, top_k=4, min_experts=8, n_groups=8, topk_groups=4, routed_scaling=2.5),
    ),
    "partial_last_block": (1, 21, 32, dict(block_size=8, top_k=3, min_experts=5, top_p=0.4)),
    "experts_not_power_of_two": (1, 19, 60, dict(block_size=8, top_k=6, min_experts=6, score_func="softmax")),
    "token_level": (2, 21, 64, dict(block_size=None, top_k=4, n_groups=4, topk_groups=2)),
    "unnormalized": (1, 33, 32, dict(block_size=16, top_k=4, min_experts=4, normalize=False, routed_scaling=2.0)),
    "top_p_one": (1, 16, 16, dict(block_size=16, top_k=2, min_experts=2, top_p=1.0)),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", sorted(ROUTING))
def test_routing_matches_float64(case, device):
    B, N, E, kwargs = ROUTING[case]
    kwargs = dict(kwargs)
    if case == "bias_and_groups":
        kwargs["expert_bias"] = 0.05 * torch.randn(E, device=device)
    ours, ref = route_both(make_logits(B, N, E, device), **kwargs)
    ids, weights, coreset, grad = ours
    ref_ids, ref_weights, ref_coreset, ref_grad = ref
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids.cpu()), "ids differ from the reference (sorted by routing score)"
    assert_close_to_reference(weights, ref_weights, torch.float32, name="weights")
    assert_close_to_reference(grad, ref_grad, torch.float32, name="grad router_logits")
    if kwargs["block_size"] is None:
        assert coreset is None and ref_coreset is None
    else:
        assert coreset.dtype == torch.bool and torch.equal(coreset.cpu(), ref_coreset.cpu())


def test_reference_routing_follows_the_algorithm():
    # One block written out by hand: the coreset is the top-p prefix of the summed top-k sigmoid votes.
    logits = make_logits(1, 4, 6, "cpu", seed=3).double()
    ids, weights, coreset = reference.block_route(logits, block_size=4, top_k=2, top_p=0.5, min_experts=2)
    s = torch.sigmoid(logits[0])
    votes = torch.zeros(6, dtype=torch.float64)
    for row in s:
        top = row.topk(2).indices
        votes[top] += row[top]
    shares = votes / votes.sum()
    ranked = shares.sort(descending=True)
    cumulative, expected = 0.0, set()
    for share, expert in zip(ranked.values.tolist(), ranked.indices.tolist()):
        if cumulative <= 0.5 or len(expected) < 2:
            expected.add(expert)
        cumulative += share
    assert set(torch.nonzero(coreset[0, 0]).flatten().tolist()) == expected
    for t in range(4):
        allowed = s[t].clone()
        allowed[[e for e in range(6) if e not in expected]] = float("-inf")
        assert ids[0, t].tolist() == allowed.topk(2).indices.tolist()
        picked = s[t][ids[0, t].long()]
        torch.testing.assert_close(weights[0, t], picked / picked.sum())


def test_experts_nobody_votes_for_join_only_through_min_experts(device):
    # Every token's top-2 are experts 0 and 1, so they hold all the votes. With top_p = 1 the exclusive
    # cumulative sum of the zero-vote experts is 1 <= top_p, and without the zero-vote rule they would all
    # join the coreset.
    logits = torch.full((1, 8, 16), -4.0, device=device)
    logits[..., :2] = 4.0
    logits += 0.1 * torch.randn(1, 8, 16, generator=torch.Generator(device=device).manual_seed(0), device=device)
    for backend in ("triton", "reference"):
        with memops.backend(backend):
            _, _, coreset = memops.block_route(logits, block_size=8, top_k=2, min_experts=3, top_p=1.0)
        assert coreset.sum().item() == 3 and coreset[0, 0, :2].all(), backend  # {0, 1} + min_experts' third


@given(
    N=st.integers(1, 40),
    E_log2=st.integers(3, 6),
    top_k=st.integers(1, 4),
    block_size=st.integers(1, 16),
    top_p=st.floats(0.05, 1.0),
    extra=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_routing_properties(N, E_log2, top_k, block_size, top_p, extra, seed):
    # Every token's ids lie in its block's coreset, the coreset holds at least min_experts, ids are distinct.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    E = 1 << E_log2
    min_experts = min(top_k + extra, E)
    with memops.backend("triton"):
        ids, _, coreset = memops.block_route(
            make_logits(1, N, E, device, seed=seed),
            block_size=block_size,
            top_k=top_k,
            top_p=top_p,
            min_experts=min_experts,
        )
    assert (coreset.sum(-1) >= min_experts).all()
    block_of_token = torch.arange(N, device=device) // block_size
    in_coreset = coreset[0][block_of_token].gather(-1, ids[0].long())
    assert in_coreset.all()
    assert (ids[0].sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("values", ["distinct", "ties", "all-equal", "neg-zero-and-inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_indices_equal_the_stable_sort(values, dtype):
    # The fast path (topk) answers only when the k + 1 largest are distinct; every other row layout must
    # still give the stable sort's indices (ties to the lower index).
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 40, 64, generator=generator, dtype=dtype)  # above top_entries' small-row size
    if values == "ties":
        scores = (scores * 4).round() / 4
    elif values == "all-equal":
        scores = torch.full_like(scores, 0.5)
    elif values == "neg-zero-and-inf":
        scores[..., ::3] = -0.0
        scores[..., 1::3] = 0.0
        scores[0, 0] = float("-inf")
    elif values == "nan":
        scores[1, 2, 5] = float("nan")
    for k in (1, 8, 63, 64):
        for rows in (scores, scores[:1, :1]):  # the topk path, and the small-row path (one stable sort)
            expected = torch.sort(rows, dim=-1, descending=True, stable=True)
            top_values, top_ids = reference.moe.top_entries(rows, k)
            assert torch.equal(top_ids, expected.indices[..., :k]), (values, k)
            assert torch.equal(top_values, expected.values[..., :k]) or top_values.isnan().any()


def test_unique_experts():
    ids = torch.tensor([[[0, 1], [1, 2], [5, 0], [5, 5]]], dtype=torch.int32)  # blocks of 2: {0,1,2}, {0,5}
    assert memops.unique_experts(ids, 2).tolist() == [[3, 2]]
    assert memops.unique_experts(ids, 3).tolist() == [[4, 1]]


def test_block_routing_uses_fewer_experts_than_token_routing(device):
    # Structured logits (each block prefers a few experts) and random ones: the coreset bounds the count.
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, 64, 64, generator=generator, device=device)
    with memops.backend("triton"):
        token_ids, _, _ = memops.block_route(logits, block_size=None, top_k=4)
        block_ids, _, coreset = memops.block_route(logits, block_size=32, top_k=4, min_experts=8, top_p=0.5)
    token_count = memops.unique_experts(token_ids, 32).float().mean()
    block_count = memops.unique_experts(block_ids, 32).float().mean()
    assert block_count <= coreset.sum(-1).float().max() and block_count < token_count


def test_block_route_opcheck(device):
    logits = make_logits(1, 20, 16, device).requires_grad_()
    torch.library.opcheck(
        torch.ops.memops.block_route.default, (logits, None, 8, 2, 0.6, 4, False, 1, 1, 1.0, True, False)
    )


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize(
    "T, k, E, block_m",
    [(19, 2, 6, 16), (300, 8, 256, 64), (5, 1, 8, 16), (0, 2, 4, 16), (64, 4, 60, 16), (40, 2, 3, 16)],
)
def test_align_kernel_equals_the_stable_sort_layout(T, k, E, block_m, device):
    from memops.kernels import moe as kernels
    from memops.reference.moe import align_slots

    generator = torch.Generator(device=device).manual_seed(T)
    ids = torch.randint(0, E, (T, k), generator=generator, device=device, dtype=torch.int32)
    if T >= 40:
        ids[:, 0] = 1  # one hot expert: a long run
    with count_launches() as launches:
        layout = kernels.align(ids, E, block_m)
    assert launches["align_kernel"] == 1
    for name, ours, expected in zip(
        ("sorted_slot", "block_expert", "expert_start", "expert_end"), layout, align_slots(ids, E, block_m)
    ):
        assert torch.equal(ours, expected), name


# --- moe_ffn ---------------------------------------------------------------------------------------------


def make_ffn_inputs(T, d, inter, E, k, dtype, device, *, seed=0, used=None):
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, d, generator=generator, device=device).to(dtype)
    w_gate_up = (torch.randn(E, 2 * inter, d, generator=generator, device=device) * d**-0.5).to(dtype)
    w_down = (torch.randn(E, d, inter, generator=generator, device=device) * inter**-0.5).to(dtype)
    pool = used if used is not None else E
    ids = torch.stack([torch.randperm(pool, generator=generator, device=device)[:k] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, k, generator=generator, device=device)
    return x, w_gate_up, w_down, ids, weights


def slot_loop_reference(x, w_gate_up, w_down, ids, weights):
    """The oracle: every (token, slot) through its expert, one at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    rows = []
    for t in range(x.shape[0]):
        row = sum(
            weights[t, j].double()
            * expert_ffn(x[t : t + 1].double(), w_gate_up[ids[t, j]].double(), w_down[ids[t, j]].double())[0]
            for j in range(ids.shape[1])
        )
        rows.append(row)
    return torch.stack(rows) if rows else out


def check_ffn(inputs, dtype):
    x, w_gate_up, w_down, ids, weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down, weights)]
    with memops.backend("triton"), count_launches() as launches:
        y = memops.moe_ffn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        grad = torch.randn_like(y)
        y.backward(grad)
    assert launches["grouped_gemm_kernel"] == 2 + 3 and launches["grouped_weight_grad_kernel"] == 2
    assert y.dtype == dtype
    refs = [t.detach().double().requires_grad_() for t in (x, w_gate_up, w_down, weights)]
    expected = slot_loop_reference(refs[0], refs[1], refs[2], ids, refs[3])
    expected.backward(grad.double())
    assert_close_to_reference(y, expected, dtype, name="y")
    for name, leaf, ref in zip(("x", "w_gate_up", "w_down", "topk_weights"), leaves, refs):
        assert_close_to_reference(leaf.grad, ref.grad, dtype, name=f"grad {name}", scale=2.0)
    return leaves


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("shape", [(19, 32, 48, 6, 2), (33, 64, 32, 16, 4), (5, 16, 16, 8, 1)])
def test_moe_ffn_matches_slot_loop(shape, device):
    check_ffn(make_ffn_inputs(*shape, torch.float32, device), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
def test_moe_ffn_16_bit(dtype, device):
    check_ffn(make_ffn_inputs(17, 32, 32, 8, 2, dtype, device), dtype)


def test_unused_experts_get_zero_weight_grads(device):
    leaves = check_ffn(make_ffn_inputs(12, 16, 16, 8, 2, torch.float32, device, used=4), torch.float32)
    assert not leaves[1].grad[4:].ne(0).any() and not leaves[2].grad[4:].ne(0).any()
    assert leaves[1].grad[:4].ne(0).any()


def test_moe_ffn_reference_is_the_cpu_path():
    x, w_gate_up, w_down, ids, weights = make_ffn_inputs(9, 16, 16, 4, 2, torch.float32, "cpu")
    with memops.backend("reference"), count_launches() as launches:
        y = memops.moe_ffn(x, w_gate_up, w_down, ids, weights)
    assert sum(launches.values()) == 0
    assert_close_to_reference(y, slot_loop_reference(x, w_gate_up, w_down, ids, weights), torch.float32)


def test_moe_ffn_gradcheck_fp64(device):
    x, w_gate_up, w_down, ids, weights = make_ffn_inputs(4, 16, 16, 3, 2, torch.float64, device)
    leaves = [t.requires_grad_() for t in (x, w_gate_up, w_down, weights.double())]
    with memops.backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b, c, w: memops.moe_ffn(a, b, c, ids, w), leaves, fast_mode=True)


def test_moe_experts_opcheck(device):
    x, w_gate_up, w_down, ids, _ = make_ffn_inputs(6, 16, 16, 4, 2, torch.float32, device)
    args = (x.requires_grad_(), w_gate_up.requires_grad_(), w_down.requires_grad_(), ids)
    torch.library.opcheck(torch.ops.memops.moe_experts.default, args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_route_and_ffn_compile(backend, device):
    if backend == "reference":
        device = "cpu"
    x, w_gate_up, w_down, _, _ = make_ffn_inputs(16, 16, 16, 8, 2, torch.float32, device)
    router = torch.randn(8, 16, device=device) * 0.5

    def layer(x, w_gate_up, w_down, router):
        ids, weights, _ = memops.block_route((x @ router.t())[None], block_size=8, top_k=2, min_experts=4)
        return memops.moe_ffn(x, w_gate_up, w_down, ids[0], weights[0]).square().sum()

    check_compiled_grads(
        layer, [x, w_gate_up, w_down, router], backend=backend, device=device, kernel="grouped_gemm_kernel"
    )


# --- bad input --------------------------------------------------------------------------------------------

BAD_ROUTE = {
    "top_k_above_E": (dict(top_k=17), ValueError, r"top_k must be in \[1, E=16\]"),
    "min_experts_above_E": (dict(min_experts=17), ValueError, r"min_experts must be in \[top_k=2, E=16\]"),
    "min_experts_below_top_k": (dict(top_k=4, min_experts=2), ValueError, "a coreset must hold each token's top_k"),
    "top_p_zero": (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    "top_p_above_one": (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    "groups_do_not_divide": (dict(n_groups=3), ValueError, "n_groups must divide E=16"),
    "topk_groups_above_groups": (
        dict(n_groups=4, topk_groups=5),
        ValueError,
        r"topk_groups must be in \[1, n_groups=4\]",
    ),
    "top_k_above_kept_groups": (
        dict(top_k=6, min_experts=6, n_groups=8, topk_groups=2),
        ValueError,
        "top_k=6 exceeds the 4 experts of the 2 kept groups",
    ),
    "score_func": (dict(score_func="relu"), ValueError, "score_func must be one of"),
    "bias_shape": (dict(expert_bias=torch.zeros(15)), ValueError, r"expert_bias must be \(E,\) = \(16,\)"),
    "block_size": (dict(block_size=0), ValueError, "block_size must be None or an int >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROUTE))
def test_bad_route_input(case):
    kwargs, error, message = BAD_ROUTE[case]
    kwargs = {"top_k": 2, "min_experts": 4, **kwargs}
    with count_launches() as launches, pytest.raises(error, match=message):
        memops.block_route(make_logits(1, 8, 16, "cpu"), **kwargs)
    assert sum(launches.values()) == 0


def test_bad_route_tensor():
    with pytest.raises(ValueError, match=r"router_logits must be \(B, N, E\)"):
        memops.block_route(torch.randn(8, 16))
    with pytest.raises(TypeError, match="router_logits must be floating point"):
        memops.block_route(torch.zeros(1, 8, 16, dtype=torch.long))


BAD_FFN = {
    "ids_out_of_range": (
        lambda x, gu, dn, i, w: (x, gu, dn, i + 100, w),
        IndexError,
        r"topk_ids must lie in \[0, E=4\)",
    ),
    "ids_float": (lambda x, gu, dn, i, w: (x, gu, dn, i.float(), w), TypeError, "topk_ids must be int32 or int64"),
    "weights_shape": (
        lambda x, gu, dn, i, w: (x, gu, dn, i, w[:, :1]),
        ValueError,
        "topk_weights must be a float tensor",
    ),
    "w_down_shape": (
        lambda x, gu, dn, i, w: (x, gu, dn[..., :-1], i, w),
        ValueError,
        r"w_down must be \(E=4, d=16, I=16\)",
    ),
    "w_gate_up_dim": (
        lambda x, gu, dn, i, w: (x, gu[..., :-1], dn, i, w),
        ValueError,
        r"w_gate_up must be \(E, 2I, d=16\)",
    ),
    "dtype": (lambda x, gu, dn, i, w: (x, gu.double(), dn, i, w), TypeError, "w_gate_up must have x's dtype"),
    "ids_tokens": (lambda x, gu, dn, i, w: (x, gu, dn, i[:-1], w[:-1]), ValueError, r"topk_ids must be \(T=6, k\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FFN))
def test_bad_ffn_input(case, device):
    make_bad, error, message = BAD_FFN[case]
    args = make_bad(*make_ffn_inputs(6, 16, 16, 4, 2, torch.float32, device))
    with memops.backend("triton"), count_launches() as launches, pytest.raises(error, match=message):
        memops.moe_ffn(*args)
    assert sum(launches.values()) == 0


# --- GPU acceptance ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.at_scale
def test_cuda_llada2_layer():
    # LLaDA2.0-mini MoE layer: d 2048, 256 experts of 512, top-8, 8 groups keep 4, scaling 2.5; 4 blocks.
    torch.manual_seed(0)
    logits = torch.randn(1, 128, 256, device="cuda")
    ours, ref = route_both(
        logits, block_size=32, top_k=8, min_experts=16, n_groups=8, topk_groups=4, routed_scaling=2.5
    )
    assert torch.equal(ours[0].cpu(), ref[0].cpu()) and torch.equal(ours[2].cpu(), ref[2].cpu())
    inputs = make_ffn_inputs(128, 2048, 512, 256, 8, torch.bfloat16, "cuda")
    check_ffn((*inputs[:3], ours[0][0], ours[1][0].detach()), torch.bfloat16)


def test_unchecked_ids_skip_the_range_check(device):
    x, w_gate_up, w_down, ids, weights = make_ffn_inputs(6, 16, 16, 4, 2, torch.float32, device)
    with memops.backend("triton"), count_launches() as launches:
        checked = memops.moe_ffn(x, w_gate_up, w_down, ids, weights)
        unchecked = memops.moe_ffn(x, w_gate_up, w_down, ids, weights, check_ids=False)
    assert torch.equal(checked, unchecked) and launches["grouped_gemm_kernel"] == 4


def official_gate_weights(router_logits, ids, *, routed_scaling):
    """Transcribed from fscdc/dMoE evaluations/models/modeling_llada2_moe_be_adaptive.py, LLaDA2MoeGate.forward:
    selected_scores = sigmoid(logits) at the chosen ids; renormalised by their sum (+1e-20) only
    ``if self.top_k > 1``; then times routed_scaling_factor."""
    scores = torch.sigmoid(router_logits.float())
    selected = scores.gather(-1, ids.long())
    if ids.shape[-1] > 1:
        selected = selected / (selected.sum(-1, keepdim=True) + 1e-20)
    return selected * routed_scaling


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_routing_weights_follow_the_official_top_k_rule(top_k, backend, device):
    device = device if backend == "triton" else "cpu"
    logits = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(top_k)).to(device).requires_grad_()
    with memops.backend(backend):
        ids, weights, _ = memops.block_route(
            logits, block_size=None, top_k=top_k, min_experts=top_k, routed_scaling=2.5, normalize=True
        )
        expected = official_gate_weights(logits, ids, routed_scaling=2.5)
        assert relative_error(weights, expected.detach()) < 1e-6
        if top_k == 1:  # the raw sigmoid score, not 1.0
            assert bool((weights < 2.5 - 1e-3).all())
        grad = torch.randn_like(weights)
        (got,) = torch.autograd.grad(weights, logits, grad)
        (want,) = torch.autograd.grad(expected, logits, grad)
    assert relative_error(got, want) < 1e-5


def official_llada2_block_gate(
    logits, expert_bias, *, top_k, n_group, topk_group, core_threshold, guard_size, routed_scaling
):
    """Transcribed from fscdc/dMoE evaluations/models/modeling_llada2_moe_be_adaptive.py, LLaDA2MoeGate
    (group_limited_topk, block_experts_select, forward with mode "aggregate"), for one block: seq_len equals
    the block size, so there is no prefix. Returns (topk_idx (B, N, k), topk_weight (B, N, k), coreset (B, E))."""
    B, N, E = logits.shape
    scores = torch.sigmoid(logits.float())
    routing = scores + expert_bias.view(1, 1, -1)

    def group_limited_topk(s):
        group_scores = s.view(s.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(s.shape[0], n_group, E // n_group).reshape(s.shape[0], -1)
        return torch.topk(s.masked_fill(~score_mask.bool(), float("-inf")), k=top_k, dim=-1)

    local_scores, local_idx = torch.topk(routing, k=top_k, dim=-1)  # the vote: plain top-k
    votes = torch.zeros_like(routing).scatter_(-1, local_idx, local_scores).sum(dim=1)
    votes = votes / (votes.sum(dim=-1, keepdim=True) + 1e-20)
    sorted_votes, sorted_idx = torch.sort(votes, dim=-1, descending=True)
    cum = torch.cumsum(sorted_votes, dim=-1)
    keep = cum <= core_threshold
    keep[..., 0] = True
    exceed = cum > core_threshold
    keep = keep | (exceed & ~torch.cat([torch.zeros_like(exceed[..., :1]), exceed[..., :-1]], dim=-1))
    coreset = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, sorted_idx, keep)
    need_fix = coreset.sum(dim=-1) < guard_size
    fallback = torch.zeros_like(coreset).scatter_(1, torch.topk(votes, k=guard_size, dim=-1).indices, True)
    coreset = torch.where(need_fix.unsqueeze(-1), fallback, coreset)
    constrained = routing.masked_fill(~coreset.unsqueeze(1), float("-inf"))
    picked, idx = group_limited_topk(constrained.reshape(-1, E))
    idx = idx.view(B, N, top_k)
    selected = scores.gather(-1, idx)
    weight = selected / (selected.sum(-1, keepdim=True) + 1e-20) if top_k > 1 else selected
    return idx, weight * routed_scaling, coreset, torch.isfinite(picked).all(-1).view(B, N)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_route_matches_the_official_llada2_gate(backend, device):
    # LLaDA2's settings: E = 256, top-8, 8 groups keep 4, top_p 0.6, block 32; guard 12 (the training gate).
    device = device if backend == "triton" else "cpu"
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, 256, generator=generator)
    bias = torch.randn(256, generator=generator) * 0.01
    official = official_llada2_block_gate(
        logits, bias, top_k=8, n_group=8, topk_group=4, core_threshold=0.6, guard_size=12, routed_scaling=2.5
    )
    results = {}
    for vote in ("plain", "group_limited"):
        with memops.backend(backend):
            ids, weights, coreset = memops.block_route(
                logits.to(device),
                block_size=32,
                top_k=8,
                top_p=0.6,
                min_experts=12,
                expert_bias=bias.to(device),
                n_groups=8,
                topk_groups=4,
                routed_scaling=2.5,
                vote=vote,
            )
        results[vote] = (ids.cpu(), weights.cpu(), coreset.cpu())
    ids, weights, coreset = results["plain"]
    assert torch.equal(coreset[:, 0], official[2])  # the same coreset in 4 of 4 blocks
    finite = official[3]  # tokens the official gate fills
    same_ids = (ids.long().sort(-1).values == official[0].sort(-1).values).all(-1)
    assert bool(same_ids[finite].all()) and int(finite.sum()) > 100, (int(same_ids.sum()), int(finite.sum()))
    order, official_order = ids.long().argsort(-1), official[0].argsort(-1)
    assert relative_error(weights.gather(-1, order)[finite], official[1].gather(-1, official_order)[finite]) < 1e-6
    # memops' former vote (group-limited) picks other coresets on these logits
    assert not torch.equal(results["group_limited"][2][:, 0], official[2])
