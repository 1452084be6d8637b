"""Engram hashed n-gram memory ops: public functions and their torch.library registration.

``ngram_hash`` -> ``memops::ngram_hash`` and ``engram_lookup`` -> ``memops::engram_lookup`` (custom ops) ->
``memops.kernels.engram`` on backend "triton"; backend "reference" calls ``memops.reference.engram``.
"""

from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import backward_op, custom_op
from memops._validation import can_read_values, check_int
from memops.optim import ROW_SPARSE_EAGER, in_backward_optimizer, update_in_backward
from memops.quantized import QUANTIZED_NO_GRAD, QuantizedTable, check_float_table
from memops.reference.engram import engram_hash_params, table_offsets  # the spec's helpers, public here too

__all__ = [
    "engram_gate",
    "engram_hash_params",
    "engram_lookup",
    "ngram_hash",
    "short_conv",
    "short_conv_step",
    "table_offsets",
]

_ID_DTYPES = (torch.int32, torch.int64)


def _check_hash_inputs(ids, multipliers, primes, pad_id, op: str, offsets=None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{op}: ids: expected an int32 or int64 tensor, got {_describe(ids)}")
    if ids.dim() != 2:
        raise ValueError(f"{op}: ids: expected (B, L), got shape {tuple(ids.shape)}")
    if not isinstance(multipliers, torch.Tensor) or multipliers.dtype != torch.int64:
        raise TypeError(f"{op}: multipliers: expected an int64 tensor, got {_describe(multipliers)}")
    if multipliers.dim() != 1 or multipliers.shape[0] < 2:
        raise ValueError(
            f"{op}: multipliers: expected (N,) with N = max_ngram_size >= 2, got shape {tuple(multipliers.shape)}"
        )
    if not isinstance(primes, torch.Tensor) or primes.dtype != torch.int64:
        raise TypeError(f"{op}: primes: expected an int64 tensor, got {_describe(primes)}")
    orders = multipliers.shape[0] - 1
    if primes.dim() != 2 or primes.shape[0] != orders:
        raise ValueError(f"{op}: primes: expected ({orders}, n_head_per_ngram), got shape {tuple(primes.shape)}")
    if offsets is not None:
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
            raise TypeError(f"{op}: offsets: expected an int64 tensor, got {_describe(offsets)}")
        if offsets.shape != (primes.numel(),):
            raise ValueError(
                f"{op}: offsets: expected ({primes.numel()},), one per hash head, got {tuple(offsets.shape)}"
            )
    for name, t in (("multipliers", multipliers), ("primes", primes), ("offsets", offsets)):
        if t is not None and t.device != ids.device:
            raise ValueError(f"{op}: {name}: expected a tensor on {ids.device} (ids' device), got {t.device}")
    check_int(pad_id, "pad_id", op, low=-(2**63), high=2**63)  # an int64, as the ids
    if can_read_values(primes) and primes.numel() and int(primes.min()) < 1:
        raise ValueError(f"{op}: primes: expected table sizes >= 1, got a minimum of {int(primes.min())}")


def _describe(t) -> str:
    return f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__


def _ngram_hash_fwd(ids, multipliers, primes, pad_id):
    from memops.kernels import engram as engram_kernels

    return engram_kernels.ngram_hash(ids, multipliers.contiguous(), primes.contiguous(), pad_id)


_ngram_hash_op = custom_op(
    "ngram_hash",
    _ngram_hash_fwd,
    "(Tensor ids, Tensor multipliers, Tensor primes, int pad_id) -> Tensor hashes",
    fake=lambda ids, multipliers, primes, pad_id: ids.new_empty((*ids.shape, primes.numel()), dtype=torch.int64),
)


def ngram_hash(ids: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """Engram's multi-head n-gram hash, computed on the ids' device (no host round trip).

    ``mix_n[t] = XOR_{k<n} x[t-k] * multipliers[k]`` (x left-padded with ``pad_id`` per row, int64 products
    that wrap as NumPy's do) and ``out[b, t, (n-2)*h + j] = mix_n[t] mod primes[n-2, j]`` (floor mod), for
    n = 2..N. Bit-identical to deepseek-ai/Engram's ``NgramHashMapping._get_ngram_hashes`` given its
    parameters (:func:`memops.reference.engram.engram_hash_params`).

    Args:
        ids: (B, L) int32 or int64 token ids, already through the tokenizer compression lookup.
        multipliers: (N,) int64, N = max_ngram_size.
        primes: (N - 1, h) int64 table sizes, one per order and head.
        pad_id: the id the sequence is left-padded with (the compressed pad token).

    Returns:
        (B, L, (N - 1) * h) int64, each column c in [0, primes.flatten()[c]).
    """
    _check_hash_inputs(ids, multipliers, primes, pad_id, "ngram_hash")
    if resolve_backend(ids) == "reference":
        return reference.engram.ngram_hash(ids, multipliers, primes, pad_id=pad_id)
    return _ngram_hash_op(ids, multipliers, primes, int(pad_id))


def _engram_lookup_fwd(ids, table, multipliers, primes, offsets, pad_id, context, deterministic):
    from memops.kernels import engram as engram_kernels

    table = table if table.stride(1) == 1 else table.contiguous()
    return engram_kernels.engram_lookup_fwd(
        ids, table, multipliers.contiguous(), primes.contiguous(), offsets.contiguous(), pad_id, context
    )


def _engram_lookup_bwd(grad_out, ids, table, multipliers, primes, offsets, pad_id, context, deterministic):
    from memops.kernels import engram as engram_kernels

    table = table if table.stride(1) == 1 else table.contiguous()
    return engram_kernels.engram_lookup_bwd(
        grad_out.contiguous(),
        ids,
        table,
        multipliers.contiguous(),
        primes.contiguous(),
        offsets.contiguous(),
        pad_id,
        context,
        deterministic=deterministic,
    )


def _lookup_fake(ids, table, multipliers, primes, offsets, pad_id, context, deterministic):
    return table.new_empty((ids.shape[0], ids.shape[1] - context, primes.numel() * table.shape[1]))


_engram_lookup_op = custom_op(
    "engram_lookup",
    _engram_lookup_fwd,
    "(Tensor ids, Tensor table, Tensor multipliers, Tensor primes, Tensor offsets, int pad_id, int context, "
    "bool deterministic) -> Tensor out",
    fake=_lookup_fake,
    backward=backward_op(
        "engram_lookup_backward",
        _engram_lookup_bwd,
        "(Tensor grad_out, Tensor ids, Tensor table, Tensor multipliers, Tensor primes, Tensor offsets, int pad_id, "
        "int context, bool deterministic) -> Tensor grad_table",
        grads=("table",),
    ),
)


def engram_lookup(
    ids: torch.Tensor, table: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, offsets: torch.Tensor,
    *, pad_id: int, context: int = 0, deterministic: bool = False, sparse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """Engram's multi-head embedding read, hash and gather fused: ``out[b, t, c*d:(c+1)*d] =
    table[offsets[c] + hash_c(ids)[b, t]]`` for every hash head c (see :func:`ngram_hash`), with no id
    tensor materialised.

    Args:
        ids: (B, L) int32 or int64 compressed token ids.
        table: (rows, d) fp32, fp16, bf16 or fp64: every head's rows (the demo's
            ``multi_head_embedding.embedding.weight``). Any row stride. Or a :class:`memops.QuantizedTable`
            (8-bit rows dequantized in registers; for inference, no gradient).
        multipliers: (N,) int64.
        primes: (N - 1, h) int64 per-head table sizes.
        offsets: ((N - 1) * h,) int64 first row of each head (:func:`memops.reference.engram.table_offsets`).
        pad_id: the left-padding id.
        context: the first ``context`` columns of ids are earlier tokens that only feed the hashes of the
            later ones (decode: the last N - 1 ids, then the new token); no rows are read for them.
        deterministic: table grad by a sorted segment reduction (no atomics, bit-identical across runs);
            also on under ``torch.use_deterministic_algorithms(True)``. With ``sparse=True`` the grad is the
            rows read and their output grads as they are (no reduction): bit-identical either way.
        sparse: give ``table`` a ``torch.sparse_coo`` grad (one (d,) row per token and head, uncoalesced, as
            ``nn.Embedding(sparse=True)``'s) for optimizers that take one (torch.optim.SparseAdam, SGD);
            eager mode (an autograd.Function around the op). A table given to
            :func:`memops.optim.apply_optimizer_in_backward` gets no grad at all: the backward hands its
            optimizer the rows read and the output grad's (d,) slices.

        out_dtype: the output's dtype for a QuantizedTable (default: the dtype it was quantized from).

    Returns:
        (B, L - context, (N - 1) * h * d) in table.dtype. Backward gives ``table`` a dense (rows, d) grad that is
        non-zero only on the rows read.

    Raises IndexError when a head's rows, offsets[c] + [0, primes[c]), run past the table.
    """
    op = "engram_lookup"
    _check_hash_inputs(ids, multipliers, primes, pad_id, op, offsets)
    quantized = isinstance(table, QuantizedTable)
    if isinstance(table, torch.Tensor):
        check_float_table(table, "table", op)
    if not quantized and (not isinstance(table, torch.Tensor) or not table.is_floating_point()):
        raise TypeError(f"{op}: table: expected a floating-point tensor or a memops.QuantizedTable, got "
                        f"{_describe(table)}")  # fmt: skip
    if out_dtype is not None and not (quantized and isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype is for a QuantizedTable's output: a floating-point torch.dtype, got "
                        f"{out_dtype!r} for a {'quantized' if quantized else 'float'} table")  # fmt: skip
    if not quantized and table.dim() != 2:
        raise ValueError(f"{op}: table: expected (rows, d), got shape {tuple(table.shape)}")
    if table.device != ids.device:
        raise ValueError(f"{op}: table: expected a tensor on {ids.device} (ids' device), got {table.device}")
    if can_read_values(offsets) and offsets.numel():
        ends = offsets + primes.reshape(-1)
        if int(offsets.min()) < 0 or int(ends.max()) > table.shape[0]:
            raise IndexError(
                f"{op}: offsets + primes: head rows span [{int(offsets.min())}, {int(ends.max())}), "
                f"past the table's {table.shape[0]} rows"
            )
    check_int(context, "context", op, low=0, high=ids.shape[1] + 1)
    if quantized:
        if sparse:
            raise TypeError(QUANTIZED_NO_GRAD.format(op=op, what="sparse=True asks for its gradient"))
        out_dtype = out_dtype or table.dtype
        if resolve_backend(table.data) == "reference":
            rows = reference.engram.ngram_hash(ids, multipliers, primes, pad_id=pad_id)[:, context:] + offsets
            return reference.quantized.gather_rows(table.data, table.scales, table.block_size, rows, out_dtype)
        return _quantized_lookup_op(ids, table.data, table.scales, multipliers, primes, offsets, int(pad_id),
                                    int(context), table.block_size, out_dtype)  # fmt: skip
    fused = in_backward_optimizer(table) is not None
    if sparse or fused:
        return _row_sparse_lookup(table, ids, multipliers, primes, offsets, int(pad_id), int(context), fused)
    if resolve_backend(table) == "reference":
        return reference.engram.engram_lookup(ids, table, multipliers, primes, offsets, pad_id=pad_id, context=context)
    return _engram_lookup_op(ids, table, multipliers, primes, offsets, int(pad_id), int(context), bool(deterministic))


@torch.compiler.disable(reason=ROW_SPARSE_EAGER)
def _row_sparse_lookup(table, ids, multipliers, primes, offsets, pad_id, context, fused):
    return _SparseTableGrad.apply(table, ids, multipliers, primes, offsets, pad_id, context, fused)


def _quantized_lookup_fwd(ids, data, scales, multipliers, primes, offsets, pad_id, context, block_size, out_dtype):
    from memops.kernels import engram as engram_kernels

    data, scales = (t if t.stride(1) == 1 else t.contiguous() for t in (data, scales))
    return engram_kernels.engram_lookup_fwd(
        ids, data, multipliers.contiguous(), primes.contiguous(), offsets.contiguous(), pad_id, context,
        scales=scales, block_size=block_size, out_dtype=out_dtype,
    )  # fmt: skip


# An 8-bit table's lookup: for inference (no autograd: nothing here takes a gradient).
_quantized_lookup_op = custom_op(
    "engram_lookup_quantized",
    _quantized_lookup_fwd,
    "(Tensor ids, Tensor data, Tensor scales, Tensor multipliers, Tensor primes, Tensor offsets, int pad_id, "
    "int context, int block_size, ScalarType out_dtype) -> Tensor out",
    fake=lambda ids, data, scales, multipliers, primes, offsets, pad_id, context, block_size, out_dtype: data.new_empty(
        (ids.shape[0], ids.shape[1] - context, primes.numel() * data.shape[1]), dtype=out_dtype
    ),
)


class _SparseTableGrad(torch.autograd.Function):
    """engram_lookup with a sparse_coo table grad: the rows read (hashed again in backward) and the output
    grad's (d,) slices, uncoalesced; or (``fused``) no table grad, the same rows and slices handed to the
    table's in-backward optimizer."""

    @staticmethod
    def forward(ctx, table, ids, multipliers, primes, offsets, pad_id, context, fused):
        ctx.save_for_backward(ids, multipliers, primes, offsets)
        ctx.lookup = (pad_id, context, table.shape, resolve_backend(table))
        ctx.table = table if fused else None  # (the leaf parameter itself: the optimizer's key)
        args = (ids, table.detach(), multipliers, primes, offsets)
        if ctx.lookup[3] == "reference":
            return reference.engram.engram_lookup(*args, pad_id=pad_id, context=context)
        return _engram_lookup_op(*args, pad_id, context, False)

    @staticmethod
    def backward(ctx, grad_out):
        ids, multipliers, primes, offsets = ctx.saved_tensors
        pad_id, context, shape, backend = ctx.lookup
        if backend == "reference":
            rows = reference.engram.ngram_hash(ids, multipliers, primes, pad_id=pad_id)[:, context:] + offsets
        else:
            from memops.kernels import engram as engram_kernels

            rows = engram_kernels.ngram_hash(ids, multipliers.contiguous(), primes.contiguous(), pad_id,
                                             offsets.contiguous(), context)  # fmt: skip
        values = grad_out.reshape(-1, shape[1])
        if ctx.table is not None:
            update_in_backward(ctx.table, rows.reshape(-1), values.contiguous())
            return None, None, None, None, None, None, None, None
        # rows are in range by construction (offsets + primes were checked against the table): no invariant pass
        grad = torch.sparse_coo_tensor(rows.reshape(1, -1), values, shape, dtype=values.dtype, check_invariants=False)
        return grad, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Context gate


def _engram_gate_fwd(key, query, w_k, w_q, value, eps):
    from memops.kernels import engram as engram_kernels

    return engram_kernels.engram_gate_fwd(*_gate_operands(key, query, w_k, w_q, value), eps)


def _engram_gate_bwd(grad_out, key, query, w_k, w_q, value, eps):
    from memops.kernels import engram as engram_kernels

    G, C = key.shape[-2:]
    R = key.shape[:-2].numel()
    grads = engram_kernels.engram_gate_bwd(
        grad_out.reshape(R, G, C).contiguous(), *_gate_operands(key, query, w_k, w_q, value), eps
    )
    grad_key, grad_query, grad_w_k, grad_w_q, grad_value = grads
    return grad_key.view(key.shape), grad_query.view(query.shape), grad_w_k, grad_w_q, grad_value.view(value.shape)


def _gate_operands(key, query, w_k, w_q, value):
    G, C = key.shape[-2:]
    R = key.shape[:-2].numel()  # (not -1: a reshape cannot infer it when G or C is 0)
    return (
        key.reshape(R, G, C).contiguous(),
        query.reshape(R, G, C).contiguous(),
        w_k.contiguous(),
        w_q.contiguous(),
        value.reshape(R, C).contiguous(),
    )


_engram_gate_op = custom_op(
    "engram_gate",
    lambda key, query, w_k, w_q, value, eps: _engram_gate_fwd(key, query, w_k, w_q, value, eps).view(key.shape),
    "(Tensor key, Tensor query, Tensor w_k, Tensor w_q, Tensor value, float eps) -> Tensor out",
    fake=lambda key, query, w_k, w_q, value, eps: value.new_empty(key.shape),
    backward=backward_op(
        "engram_gate_backward",
        _engram_gate_bwd,
        "(Tensor grad_out, Tensor key, Tensor query, Tensor w_k, Tensor w_q, Tensor value, float eps) -> "
        "(Tensor grad_key, Tensor grad_query, Tensor grad_w_k, Tensor grad_w_q, Tensor grad_value)",
        grads=("key", "query", "w_k", "w_q", "value"),
    ),
)


def _check_float_operands(op: str, named: tuple) -> None:
    """Floating-point tensors of one dtype on one device, the first's (TypeError / ValueError naming the one
    that differs): the kernels read them all in one dtype, and torch's reference ops refuse a mix."""
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name}: expected a floating-point tensor, got {_describe(t)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name}: expected {first_name}'s dtype {first.dtype}, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name}: expected a tensor on {first.device} ({first_name}'s device), got {t.device}"
            )


def _check_eps(eps, op: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"{op}: eps: expected a finite float >= 0, got {eps!r}")
    return float(eps)


def _check_gate_inputs(key, query, w_k, w_q, value, eps, op: str = "engram_gate") -> float:
    if isinstance(key, torch.Tensor) and key.is_floating_point():
        _check_float_operands(op, (("key", key), ("query", query), ("w_k", w_k), ("w_q", w_q), ("value", value)))
    else:
        raise TypeError(f"{op}: key: expected a floating-point tensor, got {_describe(key)}")
    if key.dim() < 2:
        raise ValueError(f"{op}: key: expected (..., G, C), got shape {tuple(key.shape)}")
    G, C = key.shape[-2:]
    if query.shape != key.shape:
        raise ValueError(f"{op}: query: expected key's shape {tuple(key.shape)}, got {tuple(query.shape)}")
    for name, w in (("w_k", w_k), ("w_q", w_q)):
        if w.shape != (G, C):
            raise ValueError(f"{op}: {name}: expected (G, C) = ({G}, {C}), got {tuple(w.shape)}")
    if value.shape != (*key.shape[:-2], C):
        raise ValueError(f"{op}: value: expected {(*key.shape[:-2], C)} (key without G), got {tuple(value.shape)}")
    if eps is None:
        return float(torch.finfo(key.dtype).eps)
    return _check_eps(eps, op)


def engram_gate(
    key: torch.Tensor, query: torch.Tensor, w_k: torch.Tensor, w_q: torch.Tensor, value: torch.Tensor, *,
    eps: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Engram's context gate, fused per token row: the two RMSNorms, their dot, the signed square root, the
    sigmoid and the scaling of the value, forward and backward in one kernel each.

    ``out[..., g, :] = sigmoid(sign(s) sqrt(max(|s|, 1e-6))) * value`` with
    ``s = <RMSNorm(key[..., g, :]) * w_k[g], RMSNorm(query[..., g, :]) * w_q[g]> / sqrt(C)``: the demo's
    loop over ``key_projs``, ``norm1``, ``norm2`` and ``value_proj`` (whose matmuls stay cuBLAS's: pass their
    outputs here).

    Args:
        key: (..., G, C) float, the G key projections of the Engram embedding (one matmul, viewed (..., G, C)).
        query: (..., G, C) float, the hidden state's G hyper-connection streams.
        w_k, w_q: (G, C) the RMSNorm weights (the demo's ``norm1.{g}.weight``, ``norm2.{g}.weight``).
        value: (..., C) float, the value projection.
        eps: the RMSNorm epsilon; None (nn.RMSNorm's default) is torch.finfo(key.dtype).eps.

    Returns:
        (..., G, C) in value.dtype; fp32 math (fp64 for fp64 inputs). Grads for every input.
    """
    eps = _check_gate_inputs(key, query, w_k, w_q, value, eps)
    if resolve_backend(key) == "reference":
        return reference.engram.engram_gate(key, query, w_k, w_q, value, eps=eps)
    return _engram_gate_op(key, query, w_k, w_q, value, eps)


# ---------------------------------------------------------------------------------------------------------
# Short convolution


def _conv_weight(weight, x):
    return weight.reshape(x.shape[2] * x.shape[3], weight.shape[-1]).contiguous()


def _short_conv_fwd(x, weight, norm_weight, dilation, eps, activation, residual):
    from memops.kernels import engram as engram_kernels

    return engram_kernels.short_conv_fwd(
        x.contiguous(), _conv_weight(weight, x), norm_weight.contiguous(),
        dilation=dilation, eps=eps, activation=activation, residual=residual,
    )  # fmt: skip


def _short_conv_bwd(grad_out, x, weight, norm_weight, dilation, eps, activation, residual):
    from memops.kernels import engram as engram_kernels

    grad_x, grad_weight, grad_norm_weight = engram_kernels.short_conv_bwd(
        grad_out.contiguous(), x.contiguous(), _conv_weight(weight, x), norm_weight.contiguous(),
        dilation=dilation, eps=eps, activation=activation, residual=residual,
    )  # fmt: skip
    return grad_x, grad_weight.view(weight.shape), grad_norm_weight


_short_conv_op = custom_op(
    "short_conv",
    _short_conv_fwd,
    "(Tensor x, Tensor weight, Tensor norm_weight, int dilation, float eps, bool activation, bool residual) "
    "-> Tensor out",
    fake=lambda x, weight, norm_weight, dilation, eps, activation, residual: torch.empty_like(x),
    backward=backward_op(
        "short_conv_backward",
        _short_conv_bwd,
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor norm_weight, int dilation, float eps, bool activation, "
        "bool residual) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_norm_weight)",
        grads=("x", "weight", "norm_weight"),
    ),
)


def _check_conv_inputs(x, weight, norm_weight, dilation, eps, op: str, state=None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x: expected a floating-point tensor, got {_describe(x)}")
    named = (("x", x), ("weight", weight), ("norm_weight", norm_weight))
    if op == "short_conv_step":
        if not isinstance(state, torch.Tensor):
            raise TypeError(
                f"{op}: state: expected a (B, (K-1)*dilation, G, C) tensor (a new one: x.new_zeros(B, (K-1)*dilation, "
                f"G, C)), got {_describe(state)}"
            )
        named += (("state", state),)
    _check_float_operands(op, named)
    layout = "(B, G, C)" if op == "short_conv_step" else "(B, L, G, C)"
    if x.dim() != len(layout.split(",")):
        raise ValueError(f"{op}: x: expected {layout}, got shape {tuple(x.shape)}")
    G, C = x.shape[-2:]
    if weight.dim() not in (2, 3) or weight.shape[0] != G * C or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(
            f"{op}: weight: expected (G*C, 1, K) or (G*C, K) with G*C = {G * C}, got {tuple(weight.shape)}"
        )
    if weight.shape[-1] < 1:
        raise ValueError(f"{op}: weight: expected K >= 1 taps, got {tuple(weight.shape)}")
    if norm_weight.shape != (G, C):
        raise ValueError(f"{op}: norm_weight: expected (G, C) = ({G}, {C}), got {tuple(norm_weight.shape)}")
    check_int(dilation, "dilation", op, low=1)
    _check_eps(eps, op)
    if op == "short_conv_step":
        expected = (x.shape[0], (weight.shape[-1] - 1) * dilation, G, C)
        if state.shape != expected:
            raise ValueError(f"{op}: state: expected (B, (K-1)*dilation, G, C) = {expected}, got {tuple(state.shape)}")


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, *, dilation: int, eps: float = 1e-5,
    activation: bool = True, residual: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Engram's short convolution in one pass: per-stream RMSNorm, depthwise causal dilated conv over time,
    SiLU and the residual add: ``out = x + silu(conv(RMSNorm(x)))``.

    ``y[t] = sum_j weight[:, K-1-j] * xn[t - j*dilation]`` on each of the G*C channels, with xn zero before
    the sequence starts (the demo's Conv1d with padding (K-1)*dilation, cropped to L).

    Args:
        x: (B, L, G, C) float: the gated value, G hyper-connection streams of C channels.
        weight: (G*C, 1, K) (nn.Conv1d's depthwise weight, the demo's ``short_conv.conv.weight``) or (G*C, K).
        norm_weight: (G, C): the per-stream RMSNorm weights (``short_conv.norms.{g}.weight``).
        dilation: the conv dilation (the demo uses max_ngram_size).
        eps: RMSNorm epsilon (the demo's ShortConv: 1e-5).
        activation: apply SiLU. residual: add x.

    Returns:
        (B, L, G, C) in x.dtype (fp32 math). Grads for x, weight and norm_weight. For decoding one token at a
        time see :func:`short_conv_step`.
    """
    _check_conv_inputs(x, weight, norm_weight, dilation, eps, "short_conv")
    if resolve_backend(x) == "reference":
        return reference.engram.short_conv(
            x, weight, norm_weight, dilation=dilation, eps=eps, activation=activation, residual=residual
        )
    return _short_conv_op(x, weight, norm_weight, int(dilation), float(eps), bool(activation), bool(residual))


def short_conv_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, *, dilation: int,
    eps: float = 1e-5, activation: bool = True, residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One decode step of :func:`short_conv`: x (B, G, C) the new token's rows; state (B, (K-1)*dilation,
    G, C) the normed rows of the previous (K-1)*dilation tokens, oldest first (zeros at the start; a new
    one: ``x.new_zeros(B, (K-1)*dilation, G, C)``). Returns (out (B, G, C), the next state), equal to the
    last row of :func:`short_conv` over the whole sequence. A handful of elementwise ops on one row: plain
    PyTorch on every backend."""
    _check_conv_inputs(x, weight, norm_weight, dilation, eps, "short_conv_step", state=state)
    return reference.engram.short_conv_step(
        x, state, weight, norm_weight, dilation=dilation, eps=eps, activation=activation, residual=residual
    )
