"""Row-sparse optimizers for giant memory tables: each step reads and writes only the rows its gradient names.

``SparseAdam`` (lazy Adam, torch.optim.SparseAdam's math) and ``RowwiseAdagrad`` (FBGEMM's exact row-wise
Adagrad, one fp32 accumulator per row) take the ``torch.sparse_coo`` gradients that
``weighted_gather(sparse=True)``, ``engram_lookup(sparse=True)`` or ``nn.Embedding(sparse=True)`` produce. On
CUDA one Triton kernel per step sums the duplicate rows and updates them (kernels/optim.py); elsewhere the
reference (memops/reference/optim.py) does the same in PyTorch. The math of both is in those files' headers.

``apply_optimizer_in_backward`` fuses the update into the backward instead: the memops ops that read a table
hand its optimizer the rows they read and the rows' gradients, and no gradient of the table is formed.
"""

from __future__ import annotations

import math
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
    """(rows (n,) int64, values (n, D)) of a row-sparse grad of the (R, ...) table ``param`` (D the product of
    its trailing dims); repeats allowed."""
    if not grad.is_sparse:
        raise TypeError(f"{name}: got a dense gradient for a ({', '.join(map(str, param.shape))}) table; "
                        f"{_DENSE_GRAD_HELP}")  # fmt: skip
    if param.dim() < 2 or grad.sparse_dim() != 1 or grad.shape != param.shape:
        raise ValueError(
            f"{name}: expects (R, D) (or (R, ...)) tables with row-sparse gradients (sparse_dim 1) of their shape, "
            f"got a {tuple(param.shape)} table and a {tuple(grad.shape)} gradient with sparse_dim {grad.sparse_dim()}"
        )
    values = grad._values()
    values = values.reshape(values.shape[0], math.prod(param.shape[1:]))  # (an (R, ...) table's rows flattened)
    return grad._indices()[0], values if values.stride(-1) == 1 else values.contiguous()


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """An (R, ...) table or state as (R, D): the kernels and the reference address rows of D elements."""
    return t if t.dim() <= 2 else t.view(t.shape[0], math.prod(t.shape[1:]))


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class _RowSparseOptimizer(torch.optim.Optimizer):
    """The step both optimizers share: each table with a gradient, its (rows, values), its state made on first
    use, then the family's update (``_update``) on the backend the table's device picks."""

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update(self, param: torch.Tensor, state: dict, group: dict, rows, grads, backend: str, seed, **entries):
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
                if param.grad is not None:
                    rows, values = _row_sparse(param.grad, param, type(self).__name__)
                    self._update_group(param, group, rows, values)
        return loss

    @torch.no_grad()
    def update_rows(
        self, param: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, *, scales: torch.Tensor | None = None,
        group_size: int = 1,
    ) -> None:  # fmt: skip
        """One step of ``param`` from row gradients given directly, as the fused backward of a memops op calls it.

        Args:
            param: one of this optimizer's (R, D) tables (an (R, ...) table counts as rows of D = its trailing
                dims' product elements).
            rows: (n,) int64, each in [0, R) or -1 (no row: the entry is skipped); repeats are summed.
            grads: (ceil(n / group_size), D) floating point, unit last stride: entry e's gradient is
                ``scales[e] * grads[e // group_size]``.
            scales: (n,) floating point, contiguous, or None (1).
            group_size: entries per row of ``grads`` (a weighted gather's K picks share one output gradient).
        """
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                self._update_group(param, group, rows, grads, scales=scales, group_size=group_size)
                return
        raise ValueError(f"{type(self).__name__}.update_rows: param is not one of this optimizer's tables")

    def _update_group(self, param, group, rows, grads, **entries) -> None:
        state = self.state[param]
        if not state:
            self._init_state(param, state)
        # stochastic rounding: a fresh seed per table and step from torch's generator (torch.manual_seed makes a
        # run repeatable)
        seed = int(torch.randint(0, 2**31 - 1, ())) if group["stochastic_rounding"] else None
        self._update(_rows_view(param), state, group, rows, grads, resolve_backend(param), seed, **entries)


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

    def _update(self, param: torch.Tensor, state: dict, group: dict, rows, grads, backend: str, seed, **entries):
        state["step"] += 1
        beta1, beta2 = group["betas"]
        options = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], maximize=group["maximize"], seed=seed,
                       **entries)  # fmt: skip
        moments = (_rows_view(state["exp_avg"]), _rows_view(state["exp_avg_sq"]))
        if backend == "reference":
            reference.optim.sparse_adam_update(param, *moments, rows, grads, **options)
        else:
            from memops.kernels import optim as optim_kernels

            optim_kernels.sparse_adam_step(param, *moments, rows, grads, **options)


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

    def _update(self, param: torch.Tensor, state: dict, group: dict, rows, grads, backend: str, seed, **entries):
        options = dict(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"], seed=seed, **entries)
        if backend == "reference":
            reference.optim.rowwise_adagrad_update(param, state["sum_sq"], rows, grads, **options)
        else:
            from memops.kernels import optim as optim_kernels

            optim_kernels.rowwise_adagrad_step(param, state["sum_sq"], rows, grads, **options)


# ---------------------------------------------------------------------------------------------------------
# The optimizer fused into the backward

_IN_BACKWARD = "_in_backward_optimizers"
# Why the ops' row-sparse reads are torch.compiler.disable()d: torch.compile graph-breaks around them (and
# fullgraph=True refuses them with this reason) instead of tracing a backward that builds a sparse grad or
# queues a table update.
ROW_SPARSE_EAGER = (
    "memops: a sparse=True read, or a read of a table with an optimizer in its backward "
    "(memops.optim.apply_optimizer_in_backward), runs eagerly: its backward builds a sparse grad or updates the table"
)  # torch.distributed.optim's attribute: its helpers find ours too


def apply_optimizer_in_backward(optimizer_class: type, params: Iterable, optimizer_kwargs: dict) -> None:
    """Update ``params`` inside the backward pass, as their row gradients are formed (FBGEMM / torchrec's fused
    optimizer; torchrec's and ``torch.distributed.optim._apply_optimizer_in_backward``'s signature).

    Every table gets its own ``optimizer_class(**optimizer_kwargs)`` instance. From then on the backward of a
    memops op that reads the table (``weighted_gather``, ``engram_lookup``, ``nn.ProductKeyMemory``,
    ``nn.Engram`` and their sharded forms) hands the optimizer the rows it read and their gradients
    (``update_rows``): the row-sparse kernel sums repeated rows and updates them, and no gradient of the
    table's size, dense or sparse, is formed. ``param.grad`` stays ``None``. A gradient that reaches
    ``param.grad`` another way (``nn.Embedding(sparse=True)``, ``sparse=True`` ops) is stepped on and cleared
    by a hook as it accumulates.

    What this means for training loops:

    - The table is updated once per backward call that reaches it, and once per op call that read it: a table
      read by two calls in one forward takes two steps. With gradient accumulation over micro-batches each
      micro-batch updates the table; to accumulate first, do not apply this: read with ``sparse=True`` (the
      sparse gradients of several backward calls add up in ``param.grad``) and call the optimizer's
      ``step()`` once.
    - Gradient clipping and loss scaling do not see these tables' gradients (as with FBGEMM's fused
      optimizers). The reads run eagerly: ``torch.compile`` graph-breaks around them, and
      ``fullgraph=True`` refuses them with that reason.
    - For a checkpoint, save each optimizer's ``state_dict()`` (:func:`in_backward_optimizers` lists them in
      parameter order); it holds tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it.

    Args:
        optimizer_class: :class:`SparseAdam` or :class:`RowwiseAdagrad`.
        params: (R, D) leaf tables (nn.Parameter) that require grad.
        optimizer_kwargs: the optimizer's keyword arguments (``lr``, ``betas``, ...).
    """
    op = "apply_optimizer_in_backward"
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, _RowSparseOptimizer)):
        raise TypeError(
            f"{op}: optimizer_class must be memops.optim.SparseAdam or memops.optim.RowwiseAdagrad (a row-sparse "
            f"optimizer the kernels can run in the backward), got {optimizer_class!r}"
        )
    if not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"{op}: optimizer_kwargs must be a dict of the optimizer's arguments, got {optimizer_kwargs!r}")
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor) or not param.is_leaf or not param.requires_grad or param.dim() < 2:
            raise ValueError(f"{op}: params[{index}] must be an (R, D) (or (R, ...)) leaf tensor that requires grad "
                             "(a table)")  # fmt: skip
        if getattr(param, _IN_BACKWARD, None):
            raise ValueError(f"{op}: params[{index}] already has an optimizer in its backward")
    optimizers = [optimizer_class([param], **optimizer_kwargs) for param in params]  # all built before any is set
    for param, optimizer in zip(params, optimizers):
        setattr(param, _IN_BACKWARD, [optimizer])
        param.register_post_accumulate_grad_hook(_step_and_clear)


def update_in_backward(
    param: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, *, scales: torch.Tensor | None = None,
    group_size: int = 1,
) -> None:  # fmt: skip
    """From the backward of an op that read ``param``: hand its in-backward optimizer the rows read and their
    gradients (as :meth:`SparseAdam.update_rows` takes them). The update runs when the backward pass ends, after
    every gradient that needs the table's current rows (a weighted gather's weights grad) was formed, and all
    reads of one table in that pass are one step (a table shared by several layers, as Memory Layers at Scale
    shares its values, steps once on the sum of their gradients)."""
    optimizer = in_backward_optimizer(param)
    pending = optimizer.__dict__.setdefault("_pending_reads", {})
    task = torch._C._current_graph_task_id()
    reads = pending.get(task)
    if reads is None:
        pending.clear()  # reads queued by a backward pass that failed before its end are never applied
        reads = pending[task] = []
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _apply_reads(optimizer, param, task))
    reads.append((rows, grads, scales, group_size))


def _apply_reads(optimizer: _RowSparseOptimizer, param: torch.Tensor, task: int) -> None:
    reads = optimizer._pending_reads.pop(task)
    if len(reads) == 1:
        rows, grads, scales, group_size = reads[0]
        optimizer.update_rows(param, rows, grads, scales=scales, group_size=group_size)
        return
    # several reads: one step on all their entries (each read's (n, D) entry gradients formed here)
    entries, dtype = [], _state_dtype(param)
    for rows, grads, scales, group_size in reads:
        expanded = grads.to(dtype)
        if group_size != 1:
            expanded = expanded.repeat_interleave(group_size, dim=0)[: rows.shape[0]]
        entries.append(expanded if scales is None else expanded * scales.to(dtype).unsqueeze(1))
    rows = torch.cat([read[0] for read in reads])
    optimizer.update_rows(param, rows, torch.cat(entries).contiguous())


def _step_and_clear(param: torch.Tensor) -> None:
    """A gradient that reached ``param.grad`` outside the fused path: step on it, then drop it."""
    if param.grad is not None:
        try:
            in_backward_optimizer(param).step()
        finally:  # (a refused grad is dropped too: the next backward starts clean)
            param.grad = None


def in_backward_optimizer(param: torch.Tensor) -> _RowSparseOptimizer | None:
    """The optimizer :func:`apply_optimizer_in_backward` put in ``param``'s backward, or None."""
    optimizers = getattr(param, _IN_BACKWARD, None)
    return optimizers[0] if optimizers and isinstance(optimizers[0], _RowSparseOptimizer) else None


def in_backward_optimizers(module_or_params) -> list[_RowSparseOptimizer]:
    """The in-backward optimizers of a module's parameters (or of a list of tensors), in parameter order, for
    checkpointing: ``[o.state_dict() for o in in_backward_optimizers(model)]``."""
    params = module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module) else module_or_params
    return [optimizer for optimizer in map(in_backward_optimizer, params) if optimizer is not None]
