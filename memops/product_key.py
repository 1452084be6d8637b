"""Product-key memory ops: public functions and their torch.library registration.

``weighted_gather`` -> ``memops::weighted_gather`` (custom op) -> ``memops.kernels.product_key`` on backend
"triton"; backend "reference" calls ``memops.reference.product_key`` directly (differentiable by autograd).
"""

from __future__ import annotations

import math

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import backward_op, contiguous, custom_op
from memops._validation import can_read_values, check_bool
from memops.optim import ROW_SPARSE_EAGER, in_backward_optimizer, update_in_backward
from memops.quantized import QUANTIZED_NO_GRAD, QuantizedTable, check_float_table

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_weighted_gather_inputs(values, indices: torch.Tensor, weights: torch.Tensor) -> None:
    """values: the float table or a QuantizedTable (whose own checks hold its data and scales)."""
    quantized = isinstance(values, QuantizedTable)
    values = values.data if quantized else values
    for name, t in (("values", values), ("indices", indices), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"weighted_gather: {name} must be a torch.Tensor{' or a memops.QuantizedTable' * (name == 'values')}"
                f", got {type(t).__name__}"
            )
    if values.dim() != 2:
        raise ValueError(f"weighted_gather: values must be a 2-D (S, D) table, got shape {tuple(values.shape)}")
    if not quantized:
        check_float_table(values, "values", "weighted_gather")
        if not values.is_floating_point():
            raise TypeError(f"weighted_gather: values must be a floating-point tensor, got {values.dtype}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"weighted_gather: indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() < 1:
        raise ValueError("weighted_gather: indices must have shape (..., K), got a 0-d tensor")
    if not weights.is_floating_point():
        raise TypeError(f"weighted_gather: weights must be a floating-point tensor, got {weights.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(
            f"weighted_gather: weights must have the shape of indices (..., K) = {tuple(indices.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    for name, t in (("indices", indices), ("weights", weights)):
        if t.device != values.device:
            raise ValueError(f"weighted_gather: {name} is on {t.device} but values is on {values.device}")


def _check_index_range(indices: torch.Tensor, num_rows: int) -> None:
    # One min/max reduction and one host sync per call (H100: about 0.1 ms at T=4096, K=128; see
    # docs/product_key_gather.md); `check_indices=False` skips it.
    if indices.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(indices)).tolist()
    if low < 0 or high >= num_rows:
        raise IndexError(
            f"weighted_gather: indices must lie in [0, {num_rows}) (the rows of values), "
            f"found values in [{low}, {high}]"
        )


def _triton_table(values: torch.Tensor) -> torch.Tensor:
    # Kernels address (T, K) and (T, D) operands as dense row-major; the value table only needs unit
    # column stride, so a column slice of a huge table is never copied.
    return values if values.stride(1) == 1 else values.contiguous()


def _weighted_gather_fwd(values, indices, weights, check_indices, deterministic):
    from memops.kernels import product_key as product_key_kernels

    if check_indices:
        _check_index_range(indices, values.shape[0])
    return product_key_kernels.weighted_gather_fwd(_triton_table(values), *contiguous(indices, weights))


def _weighted_gather_bwd(grad_out, values, indices, weights, deterministic, values_grad, weights_grad):
    from memops.kernels import product_key as product_key_kernels

    grad_out, indices, weights = contiguous(grad_out, indices, weights)
    options = dict(values_grad=values_grad, weights_grad=weights_grad)
    options["values_grad_algorithm"] = "segment" if deterministic else "auto"
    return product_key_kernels.weighted_gather_bwd(grad_out, _triton_table(values), indices, weights, **options)


def _quantized_gather_fwd(data, scales, indices, weights, block_size, out_dtype):
    from memops.kernels import product_key as product_key_kernels

    return product_key_kernels.weighted_gather_fwd(
        _triton_table(data), *contiguous(indices, weights), scales=_triton_table(scales), block_size=block_size,
        out_dtype=out_dtype,
    )  # fmt: skip


def _quantized_gather_bwd(grad_out, data, scales, indices, weights, block_size, out_dtype):
    from memops.kernels import product_key as product_key_kernels

    grad_out, indices, weights = contiguous(grad_out, indices, weights)
    _, grad_weights = product_key_kernels.weighted_gather_bwd(
        grad_out, _triton_table(data), indices, weights, values_grad=False, scales=_triton_table(scales),
        block_size=block_size,
    )  # fmt: skip
    return grad_weights


# An 8-bit table's gather: for inference, so the table gets no gradient (the weights still do).
_quantized_gather_op = custom_op(
    "weighted_gather_quantized",
    _quantized_gather_fwd,
    "(Tensor data, Tensor scales, Tensor indices, Tensor weights, int block_size, ScalarType out_dtype) -> Tensor out",
    fake=lambda data, scales, indices, weights, block_size, out_dtype: data.new_empty(
        (indices.shape[0], data.shape[1]), dtype=out_dtype
    ),
    backward=backward_op(
        "weighted_gather_quantized_backward",
        _quantized_gather_bwd,
        "(Tensor grad_out, Tensor data, Tensor scales, Tensor indices, Tensor weights, int block_size, "
        "ScalarType out_dtype) -> Tensor grad_weights",
        grads=("weights",),
    ),
)


_weighted_gather_op = custom_op(
    "weighted_gather",
    _weighted_gather_fwd,
    "(Tensor values, Tensor indices, Tensor weights, bool check_indices, bool deterministic) -> Tensor out",
    fake=lambda values, indices, weights, *_: values.new_empty((indices.shape[0], values.shape[1])),
    backward=backward_op(
        "weighted_gather_backward",
        _weighted_gather_bwd,
        "(Tensor grad_out, Tensor values, Tensor indices, Tensor weights, bool deterministic, bool values_grad, "
        "bool weights_grad) -> (Tensor grad_values, Tensor grad_weights)",
        grads=("values", "weights"),
    ),
)


def weighted_gather(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    check_indices: bool = True,
    deterministic: bool = False,
    sparse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted sum of gathered table rows: ``out[..., :] = sum_k weights[..., k] * values[indices[..., k], :]``.

    The value read of a product-key memory; the semantics of
    ``F.embedding_bag(indices, values, mode="sum", per_sample_weights=weights)``.

    Args:
        values: (S, D) fp32, fp16, bf16 or fp64 table. S can be millions of rows. Any row stride. Or a
            :class:`memops.QuantizedTable` (8-bit rows dequantized in registers; for inference: it gets no
            gradient, the weights still do).
        indices: (..., K) int32 or int64, each in [0, S). Duplicates within and across rows are fine.
        weights: (..., K) floating point, any float dtype.
        check_indices: raise IndexError for an index outside [0, S) (one min/max reduction and a host
            sync per call). With False, an out-of-range index reads out of bounds on the Triton path.
            Under torch.compile the reference path leaves the check to embedding_bag.
        deterministic: the values grad by a sorted segment reduction with no atomics, bit-identical across
            runs; also on under ``torch.use_deterministic_algorithms(True)`` (FlashAttention's and
            engram_lookup's flag of the same name).
        sparse: give ``values`` a ``torch.sparse_coo`` grad instead (one (D,) row ``weights[t, k] *
            grad_out[t]`` per pick, uncoalesced, as ``nn.Embedding(sparse=True)``'s) for the row-sparse
            optimizers (memops.optim, torch.optim.SparseAdam); ``weights`` still get a dense grad. A table
            given to :func:`memops.optim.apply_optimizer_in_backward` gets no grad at all: the backward hands
            its optimizer the picked rows, the weights and grad_out (eager mode).

        out_dtype: the output's dtype (default: values.dtype, or for a QuantizedTable the dtype it was
            quantized from).

    Returns:
        (..., D) tensor in ``out_dtype``, accumulated in fp32 (fp64 for fp64 inputs).

    Backward gives grads to ``values`` (dense (S, D), non-zero only on the gathered rows) and ``weights``.
    """
    quantized = isinstance(values, QuantizedTable)
    _check_weighted_gather_inputs(values, indices, weights)
    check_bool(check_indices, "check_indices", "weighted_gather")
    check_bool(deterministic, "deterministic", "weighted_gather")
    check_bool(sparse, "sparse", "weighted_gather")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"weighted_gather: out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    if quantized:
        return _quantized_weighted_gather(values, indices, weights, check_indices, sparse, out_dtype)
    if out_dtype is not None and out_dtype != values.dtype:
        return weighted_gather(values, indices, weights, check_indices=check_indices, deterministic=deterministic,
                               sparse=sparse).to(out_dtype)  # fmt: skip
    backend = resolve_backend(values)
    out_shape = (*indices.shape[:-1], values.shape[1])
    flat_shape = (math.prod(indices.shape[:-1]), indices.shape[-1])
    indices, weights = indices.reshape(flat_shape), weights.reshape(flat_shape)
    fused = in_backward_optimizer(values) is not None
    if sparse or fused:
        if check_indices and can_read_values(indices):
            _check_index_range(indices, values.shape[0])
        return _row_sparse_read(values, indices, weights, backend, deterministic, fused).reshape(out_shape)
    if backend == "reference":
        # Straight to the reference (autograd through embedding_bag): the custom op's dispatch would cost
        # ~45 us a call, a third of the whole op at small sizes. Under torch.compile the data-dependent range
        # check cannot be traced; embedding_bag's own bounds check still raises there. A table already in the
        # accumulator's dtype goes straight to embedding_bag, whose own check runs as it reads: its error is
        # turned into ours, and the success path pays no extra reduction (a 16-bit table is indexed by
        # torch.unique's rows first, where -1 would wrap, so it is checked up front).
        accumulator = torch.float64 if torch.float64 in (values.dtype, weights.dtype) else torch.float32
        direct = values.dtype == accumulator and values.shape[1] > 0
        if check_indices and can_read_values(indices) and not direct:
            _check_index_range(indices, values.shape[0])
        try:
            out = reference.weighted_gather(values, indices, weights)
        except RuntimeError:
            if check_indices and can_read_values(indices):
                _check_index_range(indices, values.shape[0])  # raises the IndexError naming the argument
            raise
    else:
        out = _weighted_gather_op(values, indices, weights, bool(check_indices), bool(deterministic))
    return out.reshape(out_shape)


def _quantized_weighted_gather(qt, indices, weights, check_indices, sparse, out_dtype):
    if sparse:
        raise TypeError(QUANTIZED_NO_GRAD.format(op="weighted_gather", what="sparse=True asks for its gradient"))
    out_shape = (*indices.shape[:-1], qt.shape[1])
    flat_shape = (math.prod(indices.shape[:-1]), indices.shape[-1])
    indices, weights = indices.reshape(flat_shape), weights.reshape(flat_shape)
    if check_indices and can_read_values(indices):
        _check_index_range(indices, qt.shape[0])
    out_dtype = out_dtype or qt.dtype
    if resolve_backend(qt.data) == "reference":
        out = reference.quantized.weighted_gather(qt.data, qt.scales, qt.block_size, indices, weights, out_dtype)
    else:
        out = _quantized_gather_op(qt.data, qt.scales, indices, weights, qt.block_size, out_dtype)
    return out.reshape(out_shape)


@torch.compiler.disable(reason=ROW_SPARSE_EAGER)
def _row_sparse_read(values, indices, weights, backend, deterministic, fused):
    return _SparseValuesGrad.apply(values, indices, weights, backend, deterministic, fused)


class _SparseValuesGrad(torch.autograd.Function):
    """weighted_gather with a sparse_coo values grad: one (D,) row weights[t, k] * grad_out[t] per pick
    (uncoalesced: the optimizers sum repeats), or (``fused``) no values grad: the picks handed to the table's
    in-backward optimizer as (indices, grad_out, weights), the (T * K, D) rows never formed. The dense weights
    grad from the gather-grad kernel (values grad off) or the reference."""

    @staticmethod
    def forward(ctx, values, indices, weights, backend, deterministic, fused):
        ctx.save_for_backward(values, indices, weights)
        ctx.backend = backend
        ctx.table = values if fused else None  # (the leaf parameter itself: the optimizer's key)
        if backend == "reference":
            return reference.weighted_gather(values.detach(), indices, weights.detach())
        return _weighted_gather_op(values.detach(), indices, weights.detach(), False, bool(deterministic))

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        (T, K), D = indices.shape, values.shape[1]
        grad_values = grad_weights = None
        if ctx.table is not None:  # (the update runs after the weights grad below: at the backward's end)
            update_in_backward(ctx.table, indices.reshape(-1).to(torch.int64), grad_out.contiguous(),
                               scales=weights.reshape(-1).contiguous(), group_size=K)  # fmt: skip
        elif ctx.needs_input_grad[0]:
            picks = (weights.to(grad_out.dtype).unsqueeze(-1) * grad_out.unsqueeze(1)).reshape(T * K, D)
            grad_values = torch.sparse_coo_tensor(
                indices.reshape(1, -1).to(torch.int64), picks.to(values.dtype), values.shape, check_invariants=False
            )  # (the indices were checked, or the caller vouched for them)
        if ctx.needs_input_grad[2]:
            if ctx.backend == "reference":  # the weights grad alone: no (S, D) values grad is formed
                acc = torch.float64 if torch.float64 in (values.dtype, weights.dtype, grad_out.dtype) else torch.float32
                selected = values.detach()[indices].to(acc)
                grad_weights = torch.bmm(selected, grad_out.to(acc).unsqueeze(-1)).squeeze(-1).to(weights.dtype)
            else:
                from memops.kernels import product_key as product_key_kernels

                grad_out, indices, weights = contiguous(grad_out, indices, weights)
                _, grad_weights = product_key_kernels.weighted_gather_bwd(
                    grad_out, _triton_table(values), indices, weights, values_grad=False, weights_grad=True
                )
        return grad_values, None, grad_weights, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Product-key search

# The kernel packs a slot index i1 * n_keys + i2 into 31 bits of an int64 sort key.
MAX_TRITON_SLOTS = 1 << 31


def _check_product_key_topk_inputs(queries: torch.Tensor, sub_keys: torch.Tensor, topk: int) -> None:
    for name, t in (("queries", queries), ("sub_keys", sub_keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"product_key_topk: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"product_key_topk: {name} must be a floating-point tensor, got {t.dtype}")
    if queries.dim() < 2:
        raise ValueError(f"product_key_topk: queries must be (..., Hm, Dk), got shape {tuple(queries.shape)}")
    heads, key_dim = queries.shape[-2], queries.shape[-1]
    if key_dim % 2:
        raise ValueError(f"product_key_topk: queries' key dim Dk must be even (two halves), got {key_dim}")
    if sub_keys.dim() != 4 or sub_keys.shape[0] != heads or sub_keys.shape[1] != 2 or sub_keys.shape[3] != key_dim // 2:
        raise ValueError(
            f"product_key_topk: sub_keys must be (Hm={heads}, 2, n_keys, Dk // 2={key_dim // 2}) for queries of "
            f"shape {tuple(queries.shape)}, got {tuple(sub_keys.shape)}"
        )
    if sub_keys.dtype != queries.dtype:
        raise TypeError(f"product_key_topk: sub_keys is {sub_keys.dtype} but queries is {queries.dtype}; cast one")
    if sub_keys.device != queries.device:
        raise ValueError(f"product_key_topk: sub_keys is on {sub_keys.device} but queries is on {queries.device}")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"product_key_topk: topk must be an int, got {type(topk).__name__}")
    n_keys = sub_keys.shape[2]
    if not 1 <= topk <= n_keys:
        raise ValueError(f"product_key_topk: topk must be in [1, n_keys={n_keys}], got {topk}")


def _exact_scores(queries: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """q1 . C1[i1] + q2 . C2[i2] at the given (T, Hm, k) slots, in the inputs' precision."""
    n_keys, half_dim = sub_keys.shape[2], sub_keys.shape[3]
    heads = torch.arange(queries.shape[1], device=queries.device).view(1, -1, 1)
    first = sub_keys[heads, 0, indices // n_keys] @ queries[..., :half_dim, None]
    second = sub_keys[heads, 1, indices % n_keys] @ queries[..., half_dim:, None]
    return (first + second).squeeze(-1)


def search_backward(
    grad_scores: torch.Tensor, queries: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor, *,
    queries_grad: bool = True, keys_grad: bool = True, deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The search's backward on the weighted-gather kernels: (dqueries (T, Hm, Dk), dsub_keys (Hm, 2, n_keys,
    Dk // 2)) in the inputs' dtype, None where not asked. The layout rewrite is
    :func:`memops.reference.product_key_search_as_gather`; ``deterministic`` selects the sorted-segment values
    grad for the sub-keys, bit-identical across runs."""
    from memops.kernels import product_key as product_key_kernels

    table, rows, weights, bags = reference.product_key_search_as_gather(queries, sub_keys, indices, grad_scores)
    grad_queries = grad_keys = None
    if queries_grad:
        grad_queries = product_key_kernels.weighted_gather_fwd(table, rows, weights).reshape(queries.shape)
    if keys_grad:
        grad_keys, _ = product_key_kernels.weighted_gather_bwd(
            bags, table, rows, weights, weights_grad=False, values_grad_algorithm="segment" if deterministic else "auto"
        )
        grad_keys = grad_keys.reshape(sub_keys.shape)
    return grad_queries, grad_keys


def _product_key_topk_fwd(queries, sub_keys, topk, deterministic):
    from memops.kernels import product_key as product_key_kernels

    queries, sub_keys = contiguous(queries, sub_keys)
    scores, indices = product_key_kernels.product_key_search(queries, sub_keys, topk)
    if queries.dtype == torch.float64:
        # The kernel ranks in fp32; fp64 callers (gradcheck) get their scores at full precision.
        scores, order = _exact_scores(queries, sub_keys, indices).sort(dim=-1, descending=True)
        indices = indices.gather(-1, order)
    return scores, indices


def _product_key_topk_fake(queries, sub_keys, topk, deterministic):
    shape = (*queries.shape[:-1], topk)
    score_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    return queries.new_empty(shape, dtype=score_dtype), queries.new_empty(shape, dtype=torch.int64)


def _product_key_topk_bwd(grad_scores, queries, sub_keys, indices, deterministic, queries_grad, sub_keys_grad):
    queries, sub_keys = contiguous(queries, sub_keys)
    options = dict(queries_grad=queries_grad, keys_grad=sub_keys_grad, deterministic=deterministic)
    return search_backward(grad_scores, queries, sub_keys, indices, **options)


_product_key_topk_op = custom_op(
    "product_key_topk",
    _product_key_topk_fwd,
    "(Tensor queries, Tensor sub_keys, int topk, bool deterministic) -> (Tensor scores, Tensor indices)",
    fake=_product_key_topk_fake,
    backward=backward_op(
        "product_key_topk_backward",
        _product_key_topk_bwd,
        "(Tensor grad_scores, Tensor queries, Tensor sub_keys, Tensor indices, bool deterministic, bool queries_grad, "
        "bool sub_keys_grad) -> (Tensor grad_queries, Tensor grad_sub_keys)",
        grads=("queries", "sub_keys"),
    ),
)


def _search_reference_instead(queries: torch.Tensor) -> bool:
    """The search's policy under "auto": fp32 queries on CUDA run the reference (the kernel spills at fp32)."""
    from memops.kernels import product_key as product_key_kernels

    return product_key_kernels.search_reference_instead(queries)


def product_key_topk(
    queries: torch.Tensor, sub_keys: torch.Tensor, topk: int, *, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key search (Lample et al. 2019): per token and memory head, the ``topk`` largest of the
    n_keys**2 slot scores ``q1 . C1[i1] + q2 . C2[i2]``, found from the top-k of each half.

    Args:
        queries: (..., Hm, Dk) fp32, fp16, bf16 or fp64; Dk even. q1, q2 are its two halves.
        sub_keys: (Hm, 2, n_keys, Dk // 2), queries' dtype: the tables C1 = sub_keys[h, 0], C2 = sub_keys[h, 1].
        topk: number of slots per (token, head), 1 <= topk <= n_keys.

    Returns:
        scores: (..., Hm, topk) fp32 (fp64 for fp64 inputs), sorted descending; no 1/sqrt(Dk) scaling.
        indices: (..., Hm, topk) int64 slots ``i1 * n_keys + i2`` in [0, n_keys**2), distinct per row.

    The returned scores are the exact top-k scores (ties may be broken either way). Scores are
    differentiable w.r.t. queries and sub_keys (only the selected sub-key rows get gradient); indices are
    not. fp32 dots use TF32 after ``torch.set_float32_matmul_precision("high")``. fp32 on CUDA runs the
    reference search under the "auto" backend (the kernel spills at fp32; see docs/testing.md). On the Triton path,
    selection ranks in fp32 (fp64 scores are then recomputed exactly), and n_keys**2 must be below 2**31.
    With ``deterministic=True``, or under ``torch.use_deterministic_algorithms(True)``, the sub-key gradient is
    bit-identical across runs (a sorted segment reduction instead of atomics).
    """
    _check_product_key_topk_inputs(queries, sub_keys, topk)
    check_bool(deterministic, "deterministic", "product_key_topk")
    backend = resolve_backend(queries, reference_instead=lambda: _search_reference_instead(queries))
    heads, key_dim = queries.shape[-2], queries.shape[-1]
    out_shape = (*queries.shape[:-1], topk)
    flat = queries.reshape(math.prod(queries.shape[:-2]), heads, key_dim)
    if backend == "reference":
        scores, indices = reference.product_key_topk(flat, sub_keys, topk)
    else:
        n_keys = sub_keys.shape[2]
        if n_keys * n_keys >= MAX_TRITON_SLOTS:
            raise ValueError(
                f"product_key_topk: the Triton kernel needs n_keys**2 < 2**31, got n_keys={n_keys}; "
                "use backend 'reference'"
            )
        scores, indices = _product_key_topk_op(flat, sub_keys, topk, bool(deterministic))
    return scores.reshape(out_shape), indices.reshape(out_shape)
