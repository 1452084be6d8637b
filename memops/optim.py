"""Row-sparse optimizers for giant memory tables: each step reads and writes only the rows its gradient names.

``SparseAdam`` (lazy Adam, torch.optim.SparseAdam's math) and ``RowwiseAdagrad`` (FBGEMM's exact row-wise
Adagrad, one fp32 accumulator per row) take the ``torch.sparse_coo`` gradients that
``weighted_gather(sparse=True)``, ``engram_lookup(sparse=True)`` or ``nn.Embedding(sparse=True)`` produce. On
CUDA one Triton kernel per step sums the duplicate rows and updates them (kernels/optim.py); elsewhere the
reference (memops/reference/optim.py) does the same in PyTorch. The math of both is in those files' headers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._validation import check_bool, check_number

_DENSE_GRAD_HELP = (
    "it needs a sparse gradient (torch.sparse_coo with one sparse dim, one row per entry): use "
    "memops.weighted_gather(..., sparse=True), memops.engram_lookup(..., sparse=True), nn.Embedding(sparse=True) "
    "or another op that produces one, or a "
    "dense optimizer (torch.optim.AdamW) for this parameter"
)


def _row_sparse(grad: torch.Tensor, param: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n,) int64, values (n, D)) of a row-sparse grad of the (R, D) table ``param``; repeats allowed."""
    if not grad.is_sparse:
        raise TypeError(f"{name}: got a dense gradient for a ({', '.join(map(str, param.shape))}) table; "
                        f"{_DENSE_GRAD_HELP}")  # fmt: skip
    if param.dim() != 2 or grad.sparse_dim() != 1 or grad.shape != param.shape:
        raise ValueError(
            f"{name}: expects (R, D) tables with row-sparse gradients (sparse_dim 1) of their shape, got a "
            f"{tuple(param.shape)} table and a {tuple(grad.shape)} gradient with sparse_dim {grad.sparse_dim()}"
        )
    values = grad._values()
    return grad._indices()[0], values if values.stride(-1) == 1 else values.contiguous()


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class _RowSparseOptimizer(torch.optim.Optimizer):
    """The step both optimizers share: each table with a gradient, its (rows, values), its state made on first
    use, then the family's update (``_update``) on the backend the table's device picks."""

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update(self, param: torch.Tensor, state: dict, group: dict, rows, values, backend: str, seed) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every table with a gradient; returns the closure's loss, if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, values = _row_sparse(param.grad, param, type(self).__name__)
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                # stochastic rounding: a fresh seed per table and step from torch's generator (torch.manual_seed
                # makes a run repeatable)
                seed = int(torch.randint(0, 2**31 - 1, ())) if group["stochastic_rounding"] else None
                self._update(param, state, group, rows, values, resolve_backend(param), seed)
        return loss


class SparseAdam(_RowSparseOptimizer):
    """Lazy Adam for tables with row-sparse gradients: torch.optim.SparseAdam's math, one fused kernel per step.

    Moments and parameters change only for the rows present in a step's gradient (duplicate rows are summed
    first); bias correction uses the parameter's step count, which every step that finds a gradient advances
    (an empty one too), as torch.optim.SparseAdam's does. ``weight_decay`` is decoupled and applied to the
    touched rows only, in torch.optim.AdamW's order: w <- w * (1 - lr * weight_decay), then the Adam step.

    Args:
        params: (R, D) tables (fp32, fp64, bf16 or fp16), or param groups (a group per learning rate).
        lr, betas, eps: as torch.optim.SparseAdam.
        weight_decay: decoupled weight decay of the touched rows.
        maximize: ascend the objective.
        stochastic_rounding: write a bf16 / fp16 table back with unbiased stochastic rounding (FBGEMM's option;
            seeded from torch's generator) instead of round-to-nearest, so updates smaller than half a unit in
            the last place are not lost on average.

    State per table: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (R, D) fp32 (fp64 for fp64 tables). The
    update runs in fp32.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
        weight_decay: float = 0.0, maximize: bool = False, stochastic_rounding: bool = False,
    ) -> None:  # fmt: skip
        op = "SparseAdam"
        check_number(lr, "lr", op, low=0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{op}: betas must be a pair of floats, got {betas!r}")
        for index, beta in enumerate(betas):
            check_number(beta, f"betas[{index}]", op, low=0.0)
            if beta >= 1.0:
                raise ValueError(f"{op}: betas[{index}] must be in [0, 1), got {beta}")
        check_number(eps, "eps", op, low=0.0, strictly=True)
        check_number(weight_decay, "weight_decay", op, low=0.0)
        check_bool(maximize, "maximize", op)
        check_bool(stochastic_rounding, "stochastic_rounding", op)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        stochastic_rounding=stochastic_rounding)  # fmt: skip
        super().__init__(params, defaults)

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros(param.shape, dtype=_state_dtype(param), device=param.device)
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=_state_dtype(param), device=param.device)

    def _update(self, param: torch.Tensor, state: dict, group: dict, rows, values, backend: str, seed) -> None:
        state["step"] += 1
        beta1, beta2 = group["betas"]
        options = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], maximize=group["maximize"], seed=seed)  # fmt: skip
        moments = (state["exp_avg"], state["exp_avg_sq"])
        if backend == "reference":
            reference.optim.sparse_adam_update(param, *moments, rows, values, **options)
        else:
            from memops.kernels import optim as optim_kernels

            optim_kernels.sparse_adam_step(param, *moments, rows, values, **options)


class RowwiseAdagrad(_RowSparseOptimizer):
    """FBGEMM's exact row-wise Adagrad for tables with row-sparse gradients: one fp32 accumulator per row.

    For each touched row r with summed gradient g (duplicate rows summed first):
    ``G_r += mean((g + weight_decay * w_r) ** 2)``, ``w_r -= lr * (g + weight_decay * w_r) / (sqrt(G_r) + eps)``
    (weight decay in FBGEMM's L2 mode, as torch.optim.Adagrad's). State memory is 4 bytes per row instead of
    Adam's 8 * D.

    Args:
        params: (R, D) tables (fp32, fp64, bf16 or fp16), or param groups.
        lr, eps: the step size and the denominator's epsilon.
        weight_decay: L2 weight decay of the touched rows.
        stochastic_rounding: write a bf16 / fp16 table back with unbiased stochastic rounding (as SparseAdam).

    State per table: ``sum_sq`` (R,) fp32 (fp64 for fp64 tables). The update runs in fp32.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-2, eps: float = 1e-8, *, weight_decay: float = 0.0,
        stochastic_rounding: bool = False,
    ) -> None:  # fmt: skip
        op = "RowwiseAdagrad"
        check_number(lr, "lr", op, low=0.0)
        check_number(eps, "eps", op, low=0.0)
        check_number(weight_decay, "weight_decay", op, low=0.0)
        check_bool(stochastic_rounding, "stochastic_rounding", op)
        super().__init__(
            params, dict(lr=lr, eps=eps, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding)
        )

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["sum_sq"] = torch.zeros(param.shape[0], dtype=_state_dtype(param), device=param.device)

    def _update(self, param: torch.Tensor, state: dict, group: dict, rows, values, backend: str, seed) -> None:
        options = dict(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"], seed=seed)
        if backend == "reference":
            reference.optim.rowwise_adagrad_update(param, state["sum_sq"], rows, values, **options)
        else:
            from memops.kernels import optim as optim_kernels

            optim_kernels.rowwise_adagrad_step(param, state["sum_sq"], rows, values, **options)
