"""Block-level MoE (dMoE): public functions and their torch.library registration.

``block_route`` -> ``memops::block_route`` (custom op) -> ``memops.kernels.moe.block_route`` (one fused
kernel); ``moe_ffn`` -> ``memops::moe_experts`` -> the grouped-GEMM kernels of ``memops.kernels.moe``, then a
weighted sum over each token's k slots. Backend "reference" calls ``memops.reference.moe`` directly.
"""

from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import backward_op, contiguous, custom_op
from memops._validation import can_read_values, check_bool, check_float_tensor, check_int, check_number

SCORE_FUNCS = ("sigmoid", "softmax")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_route_args(
    router_logits, block_size, top_k, top_p, min_experts, score_func, expert_bias, n_groups, topk_groups
) -> None:
    op = "block_route"
    check_float_tensor(router_logits, "router_logits", op, dims=3, layout="(B, N, E)")
    E = router_logits.shape[-1]
    for name, value in (
        ("top_k", top_k),
        ("min_experts", min_experts),
        ("n_groups", n_groups),
        ("topk_groups", topk_groups),
    ):
        if not _is_int(value):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be in [1, E={E}], got {top_k}")
    if block_size is not None and (not _is_int(block_size) or block_size < 1):
        raise ValueError(f"{op}: block_size must be None or an int >= 1, got {block_size!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"{op}: top_p must be in (0, 1], got {top_p!r}")
    if not top_k <= min_experts <= E:
        raise ValueError(
            f"{op}: min_experts must be in [top_k={top_k}, E={E}] (a coreset must hold each token's top_k), "
            f"got {min_experts}"
        )
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"{op}: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if n_groups < 1 or E % n_groups:
        raise ValueError(f"{op}: n_groups must divide E={E}, got {n_groups}")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"{op}: topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
    if top_k > topk_groups * (E // n_groups):
        raise ValueError(
            f"{op}: top_k={top_k} exceeds the {topk_groups * (E // n_groups)} experts of the {topk_groups} kept groups"
        )
    if expert_bias is not None:
        if not isinstance(expert_bias, torch.Tensor) or not expert_bias.is_floating_point():
            raise TypeError(f"{op}: expert_bias must be a floating-point tensor or None")
        if tuple(expert_bias.shape) != (E,):
            raise ValueError(f"{op}: expert_bias must be (E,) = ({E},), got {tuple(expert_bias.shape)}")
        if expert_bias.device != router_logits.device:
            raise ValueError(
                f"{op}: expert_bias is on {expert_bias.device} but router_logits is on {router_logits.device}"
            )


# The block_route op's options after (router_logits, expert_bias), in its schema's order.
_ROUTE_OPTIONS = (
    *("block_size", "top_k", "top_p", "min_experts", "softmax"),
    *("n_groups", "topk_groups", "routed_scaling", "normalize", "group_limited_vote"),
)


def _block_route_fwd(router_logits, expert_bias, *options):
    from memops.kernels import moe as moe_kernels

    router_logits, expert_bias = contiguous(router_logits, expert_bias)
    kwargs = dict(zip(_ROUTE_OPTIONS, options))
    kwargs["block_size"] = kwargs["block_size"] or None  # 0 in the schema: token-level routing
    ids, weights, coreset = moe_kernels.block_route(router_logits, expert_bias, **kwargs)
    # A custom op returns tensors: token-level routing has no coreset, an empty tensor stands for None.
    # Weights come first (opcheck's autograd check sums the outputs in order and chokes on an int first).
    return weights, ids, coreset if coreset is not None else router_logits.new_empty(0, dtype=torch.bool)


def _block_route_fake(router_logits, expert_bias, block_size, top_k, *_options):
    B, N, E = router_logits.shape
    shape = (B, N, top_k)
    coreset_shape = (B, -(-N // block_size), E) if block_size else (0,)
    return (
        router_logits.new_empty(shape, dtype=torch.float32),
        router_logits.new_empty(shape, dtype=torch.int32),
        router_logits.new_empty(coreset_shape, dtype=torch.bool),
    )


def _block_route_bwd(saved, grad_weights, *_):
    """Through the bias-free scores at the chosen ids (the selection itself has no gradient)."""
    score_func = "softmax" if saved.softmax else "sigmoid"
    options = dict(score_func=score_func, normalize=saved.normalize, routed_scaling=saved.routed_scaling)
    return reference.routing_weights_backward(grad_weights, saved.router_logits, saved.ids, **options)


_block_route_op = custom_op(
    "block_route",
    _block_route_fwd,
    "(Tensor router_logits, Tensor? expert_bias, int block_size, int top_k, float top_p, int min_experts, "
    "bool softmax, int n_groups, int topk_groups, float routed_scaling, bool normalize, bool group_limited_vote) "
    "-> (Tensor weights, Tensor ids, Tensor coreset)",
    fake=_block_route_fake,
    backward=_block_route_bwd,
    grads=("router_logits",),
)


def block_route(
    router_logits: torch.Tensor, *, block_size: int | None = 32, top_k: int = 8, top_p: float = 0.6,
    min_experts: int = 16, score_func: str = "sigmoid", expert_bias: torch.Tensor | None = None, n_groups: int = 1,
    topk_groups: int = 1, routed_scaling: float = 1.0, normalize: bool = True, vote: str = "plain",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """dMoE block-level routing: each block of ``block_size`` tokens agrees on an expert coreset, then every
    token routes inside it (the algorithm is in memops.reference.moe and docs/block_moe.md).

    Args:
        router_logits: (B, N, E) float (the router matmul's output).
        block_size: tokens per block (the last may be partial); None for plain token-level routing.
        top_k: experts per token. top_p: coreset mass in (0, 1]. min_experts: smallest coreset, in [top_k, E].
        score_func: "sigmoid" (LLaDA2 / DeepSeek-V3) or "softmax" (Mixtral / Qwen), computed in fp32.
        expert_bias: (E,) added to the scores for selection only (aux-loss-free balancing), or None.
        n_groups, topk_groups: group-limited routing (a group scores the sum of its two best); 1 disables it.
        routed_scaling: factor on the weights. normalize: renormalise each token's weights to sum to 1 first,
            when top_k > 1; with top_k = 1 the weight is the raw score s (sigmoid: in (0, 1)), as the official
            gates (fscdc/dMoE LLaDA2MoeGate, DeepSeek-V3) return it.
        vote: how each token votes for the block's coreset: ``"plain"`` (default), its top-k over all experts,
            as the official gate's ``block_experts_select``; ``"group_limited"``, its group-limited top-k
            (memops' earlier rule). The same when n_groups = 1. Routing inside the coreset is group-limited
            either way, as in the official gate.

    Returns:
        topk_ids (B, N, top_k) int32, sorted by routing score; topk_weights (B, N, top_k) fp32 (fp64 for
        fp64 logits, on both backends; the Triton kernel still ranks in fp32), differentiable
        w.r.t. router_logits (through the bias-free scores at the chosen ids); coreset (B, n_blocks, E) bool,
        or None when block_size is None. Ties go to the lower expert index.
    """
    _check_route_args(
        router_logits, block_size, top_k, top_p, min_experts, score_func, expert_bias, n_groups, topk_groups
    )
    check_bool(normalize, "normalize", "block_route")
    routed_scaling = check_number(routed_scaling, "routed_scaling", "block_route")
    normalize = normalize and top_k > 1  # the official rule: one pick is never renormalised
    if vote not in ("plain", "group_limited"):
        raise ValueError(f"block_route: vote must be 'plain' or 'group_limited', got {vote!r}")
    kwargs = dict(
        block_size=block_size,
        top_k=top_k,
        top_p=float(top_p),
        min_experts=min_experts,
        n_groups=n_groups,
        topk_groups=topk_groups,
        routed_scaling=float(routed_scaling),
        normalize=normalize,
    )
    if resolve_backend(router_logits) == "reference":
        return reference.block_route(router_logits, score_func=score_func, expert_bias=expert_bias, vote=vote, **kwargs)
    kwargs["block_size"] = block_size or 0
    weights, ids, coreset = _block_route_op(
        router_logits,
        expert_bias,
        kwargs.pop("block_size"),
        top_k,
        kwargs.pop("top_p"),
        min_experts,
        score_func == "softmax",
        n_groups,
        topk_groups,
        kwargs.pop("routed_scaling"),
        normalize,
        vote == "group_limited",
    )
    if router_logits.dtype == torch.float64:
        # The kernel ranks and weighs in fp32; fp64 logits get fp64 weights at its ids, as on the reference
        # (differentiable by autograd, the gradcheck path).
        scores = reference.router_scores(router_logits, score_func)
        weights = reference.routing_weights(scores, ids.long(), normalize=normalize, routed_scaling=routed_scaling)
    return ids, weights, (coreset if block_size is not None else None)


def unique_experts(topk_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, n_blocks) int64: how many distinct experts the tokens of each block use (dMoE's metric: fewer means
    fewer expert weights streamed per forward). topk_ids (B, N, k) int8..int64 (not bool), each >= 0 (one
    min check and a host sync, skipped under compile); any size of id (no (E,) table is allocated). Empty
    blocks (k = 0) count 0; the last block may be partial."""
    if (
        not isinstance(topk_ids, torch.Tensor)
        or topk_ids.dim() != 3
        or topk_ids.is_floating_point()
        or topk_ids.is_complex()
        or topk_ids.dtype == torch.bool
    ):
        raise TypeError(
            "unique_experts: topk_ids must be a (B, N, k) integer tensor (not bool), got "
            f"{getattr(topk_ids, 'dtype', type(topk_ids).__name__)} {tuple(getattr(topk_ids, 'shape', ()))}"
        )
    check_int(block_size, "block_size", "unique_experts", low=1)
    if topk_ids.numel() and can_read_values(topk_ids):
        lowest = int(topk_ids.min())
        if lowest < 0:
            raise ValueError(f"unique_experts: topk_ids must be >= 0 (expert indices), found {lowest}")
    return reference.unique_experts(topk_ids, block_size)


# ---------------------------------------------------------------------------------------------------------
# moe_ffn


def _check_ffn_args(x, w_gate_up, w_down, topk_ids, topk_weights, activation, check_ids: bool) -> None:
    op = "moe_ffn"
    for name, t in (
        ("x", x),
        ("w_gate_up", w_gate_up),
        ("w_down", w_down),
        ("topk_ids", topk_ids),
        ("topk_weights", topk_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if activation != "swiglu":
        raise ValueError(f"{op}: activation must be 'swiglu', got {activation!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a (T, d) float tensor, got {tuple(x.shape)} {x.dtype}")
    T, d = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != d or w_gate_up.shape[1] % 2:
        raise ValueError(f"{op}: w_gate_up must be (E, 2I, d={d}), got {tuple(w_gate_up.shape)}")
    E, two_i = w_gate_up.shape[0], w_gate_up.shape[1]
    if E == 0:
        raise ValueError(f"{op}: w_gate_up must hold at least one expert, got E=0 ({tuple(w_gate_up.shape)})")
    if tuple(w_down.shape) != (E, d, two_i // 2):
        raise ValueError(f"{op}: w_down must be (E={E}, d={d}, I={two_i // 2}), got {tuple(w_down.shape)}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"{op}: topk_ids must be (T={T}, k), got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ValueError(f"{op}: topk_weights must be a float tensor of topk_ids' shape {tuple(topk_ids.shape)}")
    if check_ids and topk_ids.numel() and can_read_values(topk_ids):
        low, high = torch.stack(torch.aminmax(topk_ids)).tolist()
        if low < 0 or high >= E:
            raise IndexError(f"{op}: topk_ids must lie in [0, E={E}), found [{low}, {high}]")


def _moe_experts_fwd(x, w_gate_up, w_down, topk_ids):
    from memops.kernels import moe as moe_kernels

    x, w_gate_up, w_down, topk_ids = contiguous(x, w_gate_up, w_down, topk_ids)
    slots, _ = moe_kernels.moe_experts_fwd(x, w_gate_up, w_down, topk_ids, save_preact=False)
    return slots.view(x.shape[0], topk_ids.shape[1], x.shape[1])


def _moe_experts_bwd(grad_slots, x, w_gate_up, w_down, topk_ids):
    from memops.kernels import moe as moe_kernels

    x, w_gate_up, w_down, topk_ids = contiguous(x, w_gate_up, w_down, topk_ids)
    # The gate/up GEMM runs again for its pre-activations rather than keeping (slots, 2I) fp32 from the
    # forward (activation recomputation: one more GEMM, far less memory held between the passes).
    _, (layout, h, preact) = moe_kernels.moe_experts_fwd(x, w_gate_up, w_down, topk_ids, save_preact=True, down=False)
    grad_slots = grad_slots.reshape(-1, x.shape[1]).contiguous()
    return moe_kernels.moe_experts_bwd(grad_slots, x, w_gate_up, w_down, topk_ids, layout, h, preact)


_moe_experts_op = custom_op(
    "moe_experts",
    _moe_experts_fwd,
    "(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_ids) -> Tensor slots",
    fake=lambda x, w_gate_up, w_down, topk_ids: x.new_empty((x.shape[0], topk_ids.shape[1], x.shape[1])),
    backward=backward_op(
        "moe_experts_backward",
        _moe_experts_bwd,
        "(Tensor grad_slots, Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_ids) "
        "-> (Tensor grad_x, Tensor grad_w_gate_up, Tensor grad_w_down)",
        grads=("x", "w_gate_up", "w_down"),
    ),
)


def moe_ffn(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
    topk_weights: torch.Tensor, *, activation: str = "swiglu", check_ids: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Routed SwiGLU experts: ``y[t] = Σ_j w[t, j] · W_down[e] (SiLU(W_gate[e] x[t]) ⊙ W_up[e] x[t])``, e = ids[t, j].

    Args:
        x: (T, d) fp32, fp16, bf16 (callers flatten B·N).
        w_gate_up: (E, 2I, d): rows [0, I) are the gate projection, rows [I, 2I) the up projection.
        w_down: (E, d, I).
        topk_ids: (T, k) int32/int64 in [0, E) (one min/max check and host sync, skipped under compile).
        check_ids: False skips that check, for ids a router produced (in range by construction); an
            out-of-range id then reads out of bounds on the Triton path.
        topk_weights: (T, k) float.

    Returns:
        (T, d) in x.dtype. Gradients reach x, both weight tensors and topk_weights. On the Triton path the
        (token, k) slots are sorted by expert and each expert's run is one grouped GEMM tile sequence: only the
        experts tokens use are read, which is where a block coreset saves bandwidth.
    """
    _check_ffn_args(x, w_gate_up, w_down, topk_ids, topk_weights, activation, check_ids)
    if resolve_backend(x) == "reference":
        return reference.moe_ffn(x, w_gate_up, w_down, topk_ids, topk_weights)
    y_slots = _moe_experts_op(x, w_gate_up, w_down, topk_ids)
    acc = torch.promote_types(x.dtype, torch.float32)
    # The weighted combine over each token's k slots, in a fixed order (deterministic, no atomics).
    return (y_slots.to(acc) * topk_weights.to(acc).unsqueeze(-1)).sum(1).to(x.dtype)
