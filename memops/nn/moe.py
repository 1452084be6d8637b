"""BlockMoE: a mixture-of-experts FFN layer with dMoE block-level routing (or plain token routing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memops._validation import check_int, check_module_input
from memops.moe import block_route, moe_ffn, unique_experts


class BlockMoE(nn.Module):
    """Router + dMoE block routing + SwiGLU experts (+ shared experts), through :func:`memops.block_route`
    and :func:`memops.moe_ffn`.

    ``y = Σ_j w_j Expert_{e_j}(x) + SharedExpert(x)`` with (e, w) from the router logits ``x W_r^T`` routed in
    blocks of ``block_size`` tokens along N (block_size None: a standard token-routed MoE). Input (B, N, d_model).

    State dict keys: ``router.weight`` (n_experts, d_model); ``expert_bias`` (n_experts,) buffer, added to the
    scores for selection only (aux-loss-free balancing; zeros unless you update it); ``w_gate_up``
    (n_experts, 2 d_expert, d_model); ``w_down`` (n_experts, d_model, d_expert); with shared_experts > 0:
    ``shared_gate_up.weight`` (2 s d_expert, d_model) and ``shared_down.weight`` (d_model, s d_expert).

    ``min_experts`` is clamped into [top_k, n_experts]. ``vote`` ("plain", the official gate's, or
    "group_limited") is :func:`memops.block_route`'s coreset vote. After each forward ``last_topk_ids`` holds the
    (B, N, top_k) routing (a reference, nothing computed); :meth:`unique_experts` gives the per-block count
    of distinct experts (the dMoE metric), with one host sync, when asked.
    """

    def __init__(
        self, d_model: int, d_expert: int, n_experts: int, top_k: int, *, block_size: int | None = 32,
        top_p: float = 0.6, min_experts: int = 16, score_func: str = "sigmoid", n_groups: int = 1,
        topk_groups: int = 1, routed_scaling: float = 1.0, normalize: bool = True, shared_experts: int = 0,
        vote: str = "plain", device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("d_model", d_model), ("d_expert", d_expert), ("n_experts", n_experts), ("top_k", top_k)):
            check_int(value, name, "BlockMoE", low=1)
        check_int(shared_experts, "shared_experts", "BlockMoE", low=0)
        if top_k > n_experts:
            raise ValueError(f"BlockMoE: top_k={top_k} exceeds n_experts={n_experts}")
        factory = {"device": device, "dtype": dtype}
        self.top_k, self.block_size, self.top_p = top_k, block_size, top_p
        self.min_experts = min(max(min_experts, top_k), n_experts)
        self.score_func, self.n_groups, self.topk_groups = score_func, n_groups, topk_groups
        self.routed_scaling, self.normalize, self.vote = routed_scaling, normalize, vote
        self.router = nn.Linear(d_model, n_experts, bias=False, **factory)
        self.register_buffer("expert_bias", torch.zeros(n_experts, device=device, dtype=torch.float32))
        self.w_gate_up = nn.Parameter(torch.randn(n_experts, 2 * d_expert, d_model, **factory) * d_model**-0.5)
        self.w_down = nn.Parameter(torch.randn(n_experts, d_model, d_expert, **factory) * d_expert**-0.5)
        if shared_experts:
            self.shared_gate_up = nn.Linear(d_model, 2 * shared_experts * d_expert, bias=False, **factory)
            self.shared_down = nn.Linear(shared_experts * d_expert, d_model, bias=False, **factory)
        else:
            self.shared_gate_up = self.shared_down = None
        self.last_topk_ids: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids, topk_weights), each (B, N, top_k), of x (B, N, d_model); recorded in last_topk_ids."""
        ids, weights, _ = block_route(
            self.router(x),
            block_size=self.block_size,
            top_k=self.top_k,
            top_p=self.top_p,
            min_experts=self.min_experts,
            score_func=self.score_func,
            expert_bias=self.expert_bias,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            routed_scaling=self.routed_scaling,
            normalize=self.normalize,
            vote=self.vote,
        )
        self.last_topk_ids = ids
        return ids, weights

    def add_shared_experts(self, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """y + the shared experts' SwiGLU of flat (T, d_model); y itself without shared experts."""
        if self.shared_gate_up is None:
            return y
        gate, up = self.shared_gate_up(flat).chunk(2, dim=-1)
        return y + self.shared_down(F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d_model) -> (B, N, d_model)."""
        check_module_input(x, "x", "BlockMoE", width=self.router.in_features, dims=(3,), like=self.router.weight)
        B, N, d = x.shape
        ids, weights = self.route(x)
        flat = x.reshape(B * N, d)
        # The router's ids are in range by construction: no range check, so no host sync per forward.
        y = moe_ffn(
            flat,
            self.w_gate_up,
            self.w_down,
            ids.reshape(B * N, self.top_k),
            weights.reshape(B * N, self.top_k),
            check_ids=False,
        )
        return self.add_shared_experts(y, flat).reshape(B, N, d)

    @torch.no_grad()
    def unique_experts(self, block_size: int | None = None) -> torch.Tensor:
        """(B, n_blocks) distinct experts per block of the last forward (blocks of ``block_size``, default the
        routing block, or 32 for token routing)."""
        if self.last_topk_ids is None:
            raise RuntimeError("BlockMoE.unique_experts: no forward has run yet")
        return unique_experts(self.last_topk_ids, block_size or self.block_size or 32)
