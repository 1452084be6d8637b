"""Pure-PyTorch definition of block-level MoE routing (dMoE) and the expert FFN: the spec of
``memops.block_route``, ``memops.unique_experts`` and ``memops.moe_ffn``, and their CPU path.

dMoE ("dLLMs with Learnable Block Experts") routes a block of tokens inside a small expert coreset the
block agrees on (the official LLaDA2.0-mini gate). Per block of ``block_size`` tokens and token i:

    s_i   = score_func(logits_i)  (fp32; sigmoid or softmax),   r_i = s_i + expert_bias   (bias: selection only)
    ŝ_i   = r_i on the token's own top-k experts (plain top-k over all experts, as the official gate's
            block_experts_select; vote="group_limited": its group-limited top-k), 0 elsewhere;
            padded tokens do not vote
    S̃     = Σ_i ŝ_i / (Σ_e Σ_i ŝ_i + 1e-20)
    C     = the prefix of S̃ sorted descending whose exclusive cumulative sum is <= top_p (the experts while
            the cumsum stays <= top_p, plus the first to cross it; experts with no vote excluded), at least
            min_experts long
    ids_i = (group-limited) top-k of r_i with experts outside C at -inf
    w_i   = s_i[ids_i] / (Σ s_i[ids_i] + 1e-20) * routed_scaling   (normalize, top_k > 1) or s_i[ids_i] * routed_scaling
            (top_k = 1 is never renormalised, as the official gates: `if self.top_k > 1` in fscdc/dMoE's
            LLaDA2MoeGate.forward, `top_k > 1 and norm_topk_prob` in DeepSeek's)

Group-limited top-k: experts split into n_groups equal groups; a group's score is the sum of its two
largest (masked) r; only experts of the topk_groups best groups compete. Ties go to the lower index.
block_size None is plain token-level routing (no coreset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_scores(router_logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """s = sigmoid or softmax of the logits, in fp32 (fp64 for fp64)."""
    logits = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32))
    return torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, dim=-1)


def top_entries(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int64 indices), each (..., k): every row's k largest entries of ``scores`` (..., E), largest
    first; ties go to the lower index, as a stable descending sort gives them.

    ``topk`` is a quarter of a full stable sort's cost but promises nothing about ties, so it answers only
    when the k + 1 largest values of every row are distinct (then its indices are the only right ones);
    otherwise, when tracing, and for small rows (where one sort beats topk plus the check), the stable sort does.
    """
    E = scores.shape[-1]
    k = min(k, E)
    if not torch.compiler.is_compiling() and scores.numel() > 1 << 12:
        values, indices = scores.topk(min(k + 1, E), dim=-1)
        # Strictly decreasing rows have no tie (and no NaN: NaN > x is False).
        if bool(torch.gt(values[..., :-1], values[..., 1:]).all()):
            return values[..., :k], indices[..., :k]
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of :func:`top_entries`."""
    return top_entries(scores, k)[1]


def _group_limited(scores: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """scores with every expert outside the topk_groups best groups at -inf (group score: the sum of its two
    largest entries; ties go to the lower group)."""
    grouped = scores.unflatten(-1, (n_groups, -1))
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, top_indices(group_scores, topk_groups), True)
    return grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(-2)


def group_limited_topk(scores: torch.Tensor, k: int, n_groups: int, topk_groups: int) -> torch.Tensor:
    """(..., k) ids of the top-k of ``scores`` (..., E) among the experts of the topk_groups best groups
    (group score: the sum of its two largest entries), sorted by score; ties go to the lower index."""
    if n_groups > 1:
        scores = _group_limited(scores, n_groups, topk_groups)
    return top_indices(scores, k)


def block_coreset(
    routing: torch.Tensor, valid: torch.Tensor | None, *, block_size: int, top_k: int, top_p: float, min_experts: int,
    n_groups: int, topk_groups: int, vote: str = "plain",
) -> torch.Tensor:  # fmt: skip
    """(B, n_blocks, E) bool coreset of every block from the routing scores r (B, N, E); ``valid`` (B, N)
    marks the tokens that vote (None: all do), each with its plain top-k (``vote="plain"``, the official gate) or its
    group-limited top-k (``vote="group_limited"``)."""
    B, N, E = routing.shape
    voting = _group_limited(routing, n_groups, topk_groups) if vote == "group_limited" and n_groups > 1 else routing
    picked, ids = top_entries(voting, top_k)
    if voting is not routing:  # too few experts in the kept groups picks -inf entries: vote their real scores
        picked = routing.gather(-1, ids)
    if valid is not None:
        picked = picked * valid.unsqueeze(-1).to(picked.dtype)
    n_blocks = -(-N // block_size)
    if N % block_size:  # pad the last block with tokens that vote nothing
        pad = n_blocks * block_size - N
        picked, ids = F.pad(picked, (0, 0, 0, pad)), F.pad(ids, (0, 0, 0, pad))
    # Each block's votes summed straight into (B, n_blocks, E): no (B, N, E) vote tensor.
    k = ids.shape[-1]
    votes = torch.zeros(B, n_blocks, E, dtype=routing.dtype, device=routing.device).scatter_add_(
        -1, ids.reshape(B, n_blocks, block_size * k), picked.reshape(B, n_blocks, block_size * k)
    )
    shares = votes / (votes.sum(-1, keepdim=True) + 1e-20)
    sorted_shares, order = torch.sort(shares, dim=-1, descending=True, stable=True)
    before = sorted_shares.cumsum(-1) - sorted_shares  # exclusive cumulative sum
    positions = torch.arange(E, device=routing.device)
    # A zero-vote expert adds no mass: it only joins through min_experts (this also keeps top_p = 1 from
    # admitting every expert on rounding).
    keep_sorted = ((before <= top_p) & (sorted_shares > 0)) | (positions < min_experts)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def routing_weights(scores: torch.Tensor, ids: torch.Tensor, *, normalize: bool, routed_scaling: float) -> torch.Tensor:
    """w = s[ids] (renormalised over the k picks when ``normalize`` and k > 1) * routed_scaling, in the scores'
    dtype."""
    picked = scores.gather(-1, ids)
    if normalize and ids.shape[-1] > 1:
        picked = picked / (picked.sum(-1, keepdim=True) + 1e-20)
    return picked * routed_scaling


def block_route(
    router_logits: torch.Tensor, *, block_size: int | None = 32, top_k: int = 8, top_p: float = 0.6,
    min_experts: int = 16, score_func: str = "sigmoid", expert_bias: torch.Tensor | None = None, n_groups: int = 1,
    topk_groups: int = 1, routed_scaling: float = 1.0, normalize: bool = True, vote: str = "plain",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(topk_ids (B, N, top_k) int32, topk_weights (B, N, top_k) fp32 (fp64 for fp64), coreset
    (B, n_blocks, E) bool or None) from router_logits (B, N, E). Weights are differentiable w.r.t. the
    logits; ids are not."""
    scores = router_scores(router_logits, score_func)
    routing = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    routing = routing.detach()
    coreset = None
    if block_size is not None:
        selection = dict(top_k=top_k, top_p=top_p, min_experts=min_experts, n_groups=n_groups, topk_groups=topk_groups)
        coreset = block_coreset(routing, None, block_size=block_size, vote=vote, **selection)
        B, N, E = routing.shape
        if N % block_size == 0:  # a view per block, the coreset broadcast over its tokens: no (B, N, E) mask
            blocks = routing.view(B, N // block_size, block_size, E)
            routing = blocks.masked_fill(~coreset.unsqueeze(2), float("-inf")).view(B, N, E)
        else:
            per_token = coreset.repeat_interleave(block_size, dim=1)[:, :N]
            routing = routing.masked_fill(~per_token, float("-inf"))
    ids = group_limited_topk(routing, top_k, n_groups, topk_groups)
    weights = routing_weights(scores, ids, normalize=normalize, routed_scaling=routed_scaling)
    return ids.to(torch.int32), weights, coreset


def unique_experts(topk_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, n_blocks) int64: the distinct experts the tokens of each block route to (the paper's metric)."""
    B, N, k = topk_ids.shape
    n_blocks = -(-N // block_size)
    if N * k == 0:
        return torch.zeros(B, n_blocks, dtype=torch.int64, device=topk_ids.device)
    # Sort each block's ids and count the changes: no (E,) table, whatever the largest id. The partial last
    # block is padded with -1, which sorts first and is not counted.
    ids = F.pad(topk_ids.long(), (0, 0, 0, n_blocks * block_size - N), value=-1)
    ids = ids.view(B, n_blocks, block_size * k).sort(dim=-1).values
    changes = (ids[..., 1:] != ids[..., :-1]) & (ids[..., 1:] >= 0)
    return changes.sum(-1) + (ids[..., 0] >= 0)


def expert_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU FFN: W_down (SiLU(W_gate x) * (W_up x)); w_gate_up (2I, d) = [W_gate; W_up]."""
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down.t()


def moe_ffn(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """y[t] = Σ_j topk_weights[t, j] * expert_ffn(x[t]; expert topk_ids[t, j]) for x (T, d),
    w_gate_up (E, 2I, d), w_down (E, d, I), topk ids/weights (T, k). One batched matmul per used expert
    over the tokens routed to it. Returns (T, d) in x.dtype; differentiable by autograd."""
    T, k = topk_ids.shape
    if torch.compiler.is_compiling():
        # The per-expert loop has data-dependent shapes; traced, gather each slot's weights instead (memory
        # T * k * 3 * I * d: fine for the sizes one compiles the CPU reference at).
        acc = torch.promote_types(x.dtype, torch.float32)
        ids = topk_ids.long()
        gate, up = torch.einsum("td,tkjd->tkj", x.to(acc), w_gate_up[ids].to(acc)).chunk(2, dim=-1)
        per_slot = torch.einsum("tkj,tkdj->tkd", F.silu(gate) * up, w_down[ids].to(acc))
        return (per_slot * topk_weights.to(acc).unsqueeze(-1)).sum(1).to(x.dtype)
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    tokens = order // k
    acc = torch.promote_types(x.dtype, torch.float32)
    contributions = []
    for expert, chunk in zip(experts.tolist(), torch.split(tokens, counts.tolist())):
        contributions.append(expert_ffn(x[chunk].to(acc), w_gate_up[expert].to(acc), w_down[expert].to(acc)))
    if not contributions:  # no slot (T = 0 or k = 0): zeros, attached to every input's graph
        attached = x[:0].sum() + w_gate_up[:0].sum() + w_down[:0].sum() + topk_weights.sum()
        return torch.zeros_like(x) + attached.to(x.dtype)
    per_slot = torch.cat(contributions)  # slots in expert order
    weights = topk_weights.reshape(-1)[order].to(acc).unsqueeze(-1)
    y = torch.zeros(T, x.shape[1], dtype=acc, device=x.device).index_add_(0, tokens, per_slot * weights)
    return y.to(x.dtype)


def routing_weights_backward(
    grad_weights: torch.Tensor, router_logits: torch.Tensor, topk_ids: torch.Tensor, *, score_func: str,
    normalize: bool, routed_scaling: float,
) -> torch.Tensor:  # fmt: skip
    """d router_logits (B, N, E) of :func:`routing_weights` from grad_weights (B, N, k): only the scores at
    the selected ids carry gradient (selection is hard)."""
    scores = router_scores(router_logits, score_func)
    ids = topk_ids.long()
    picked = scores.gather(-1, ids)
    grad = grad_weights.to(scores.dtype) * routed_scaling
    if normalize and ids.shape[-1] > 1:
        total = picked.sum(-1, keepdim=True) + 1e-20
        grad = grad / total - (grad * picked).sum(-1, keepdim=True) / total**2
    grad_scores = torch.zeros_like(scores).scatter_add_(-1, ids, grad)
    if score_func == "sigmoid":
        grad_logits = grad_scores * scores * (1 - scores)
    else:
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
    return grad_logits.to(router_logits.dtype)


def align_slots(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The expert-sorted, padded slot layout the grouped GEMMs run over (vLLM's moe_align_block_size).

    Slots t * k + j are stably sorted by expert; each expert's run is padded to a multiple of block_m.
    Returns sorted_slot (P,) int32 (the slot at each position, -1 for padding), block_expert (P / block_m,)
    int32 (the expert of each block of positions, -1 past the last), expert_start and expert_end (E,) int64
    position ranges. P = (cdiv(slots, block_m) + E) * block_m bounds the layout without a host sync.
    """
    flat = topk_ids.reshape(-1).long()
    slots = flat.numel()
    device = flat.device
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    expert_end = torch.cumsum(padded, 0)
    expert_start = expert_end - padded
    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    positions = expert_start[sorted_experts] + torch.arange(slots, device=device) - first_of_expert[sorted_experts]
    num_blocks = -(-slots // block_m) + num_experts
    sorted_slot = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=device)
    sorted_slot[positions] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(expert_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_slot, block_expert, expert_start, expert_end
