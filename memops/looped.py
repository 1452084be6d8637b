"""MELT's shared looped KV cache: public functions and their torch.library registration.

``looped_kv_update`` -> ``memops::looped_kv_update`` (custom op) -> ``memops.kernels.looped``;
``looped_attention`` -> ``memops::looped_attention`` -> the attention kernels' blend path
(``memops.kernels.attention``) and, for the backward, the attention backward kernels plus
``memops.kernels.looped``. Backend "reference" calls ``memops.reference.looped`` directly.
"""

from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import (
    backward_op,
    contiguous,
    custom_op,
    dense,
    empty_like_dense,
)
from memops._validation import (
    can_read_values,
    check_attention_inputs,
    check_float_tensor,
    check_triton_head_dim,
    check_varlen_inputs,
)
from memops.attention import attention_backend, attention_outputs_like, varlen_outputs_like
from memops.attention import memory_attention as memops_attention
from memops.attention import memory_attention_varlen as memops_attention_varlen
from memops.kernels._launch import record_launch


def _rows_spec(rows, num_cache_rows: int, num_new: int, device) -> tuple[torch.Tensor | None, int]:
    """(index tensor or None, row offset): a contiguous run of rows becomes an offset (no index reads)."""
    if rows is None:
        if num_new != num_cache_rows:
            raise ValueError(
                f"looped_kv_update: with rows=None, k_new must have the cache's {num_cache_rows} rows, got {num_new}"
            )
        return None, 0
    if isinstance(rows, slice):
        start, stop, step = rows.indices(num_cache_rows)
        count = len(range(start, stop, step))
        if count != num_new:
            raise ValueError(f"looped_kv_update: rows {rows} names {count} cache rows but k_new has {num_new}")
        if step == 1:
            return None, start
        return torch.arange(start, stop, step, device=device), 0
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise TypeError("looped_kv_update: rows must be None, a slice or a 1-D int32/int64 tensor")
    if rows.numel() != num_new:
        raise ValueError(f"looped_kv_update: rows names {rows.numel()} cache rows but k_new has {num_new}")
    if rows.numel() and can_read_values(rows):
        low, high = torch.stack(torch.aminmax(rows)).tolist()
        if low < 0 or high >= num_cache_rows:
            raise IndexError(f"looped_kv_update: rows must lie in [0, {num_cache_rows}), found [{low}, {high}]")
        if torch.unique(rows).numel() != rows.numel():  # two blends of one row would race (last write wins)
            raise ValueError("looped_kv_update: rows must be distinct, got a repeated row index")
    return rows.to(device=device, dtype=torch.int64), 0


def check_update_inputs(k_cache, v_cache, k_new, v_new, gate, op: str) -> None:
    named = (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new), ("gate", gate))
    for name, t in named:
        check_float_tensor(t, name, op, dims=4, layout="4-D (B, Hkv, rows, D)", device_of=("k_new", k_new))
    B, Hkv, n, D = k_new.shape
    if v_new.shape != k_new.shape:
        raise ValueError(f"{op}: v_new must have k_new's shape {tuple(k_new.shape)}, got {tuple(v_new.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if k_cache.shape[0] != B or k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(f"{op}: k_cache must be (B={B}, Hkv={Hkv}, Nk, D={D}), got {tuple(k_cache.shape)}")
    if tuple(gate.shape) not in ((B, Hkv, n, 1), (B, Hkv, n, D)):
        raise ValueError(
            f"{op}: gate must be (B, Hkv, n, 1) = {(B, Hkv, n, 1)} or (B, Hkv, n, D) = {(B, Hkv, n, D)}, "
            f"got {tuple(gate.shape)}"
        )
    for name, t in named[:4]:
        if t.dtype != k_new.dtype:
            raise TypeError(f"{op}: {name} must have k_new's dtype {k_new.dtype}, got {t.dtype}")


def _rows_for_reference(rows_index: torch.Tensor | None, row_offset: int, n: int):
    return rows_index if rows_index is not None else slice(row_offset, row_offset + n)


def _looped_kv_update_fwd(k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset):
    from memops.kernels import looped as looped_kernels

    k_cache, v_cache, k_new, v_new, gate = contiguous(k_cache, v_cache, k_new, v_new, gate)
    # Rows not updated are copied by the clone; the kernel then overwrites the updated ones.
    k_out, v_out = k_cache.clone(), v_cache.clone()
    looped_kernels.looped_update_fwd(k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset, k_out, v_out)
    return k_out, v_out


def _looped_kv_update_bwd(grad_k, grad_v, k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset):
    from memops.kernels import looped as looped_kernels

    tensors = contiguous(grad_k, grad_v, k_cache, v_cache, k_new, v_new, gate)
    return looped_kernels.looped_update_bwd(*tensors, rows_index, row_offset)


_UPDATE_INPUTS = "Tensor k_cache, Tensor v_cache, Tensor k_new, Tensor v_new, Tensor gate, Tensor? rows_index"
_looped_kv_update_op = custom_op(
    "looped_kv_update",
    _looped_kv_update_fwd,
    f"({_UPDATE_INPUTS}, int row_offset) -> (Tensor k, Tensor v)",
    fake=lambda k_cache, v_cache, *_: (empty_like_dense(k_cache), empty_like_dense(v_cache)),
    backward=backward_op(
        "looped_kv_update_backward",
        _looped_kv_update_bwd,
        f"(Tensor grad_k, Tensor grad_v, {_UPDATE_INPUTS}, int row_offset) -> "
        "(Tensor grad_k_cache, Tensor grad_v_cache, Tensor grad_k_new, Tensor grad_v_new, Tensor grad_gate)",
        grads=("k_cache", "v_cache", "k_new", "v_new", "gate"),
    ),
)


def update_in_place(k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset, backend) -> None:
    """The gated update written into the caches themselves (inference)."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(stride == 0 and size > 1 for stride, size in zip(cache.stride(), cache.shape)):
            raise ValueError(
                f"looped_kv_update: inplace=True writes into {name}, but it is an expanded view (several elements "
                "share one memory location); pass a materialised cache (.contiguous()) or inplace=False"
            )
    if backend == "triton" and k_cache.is_contiguous() and v_cache.is_contiguous():
        from memops.kernels import looped as looped_kernels

        k_new, v_new, gate = contiguous(k_new, v_new, gate)
        looped_kernels.looped_update_fwd(k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset, k_cache, v_cache)
        return
    if backend == "triton":
        raise ValueError("looped_kv_update: inplace=True on the Triton path needs contiguous k_cache and v_cache")
    rows = _rows_for_reference(rows_index, row_offset, k_new.shape[2])
    k_cache[:, :, rows] = reference.looped_blend(k_cache[:, :, rows], k_new, gate)
    v_cache[:, :, rows] = reference.looped_blend(v_cache[:, :, rows], v_new, gate)


def looped_kv_update(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gate: torch.Tensor, *,
    rows: slice | torch.Tensor | None = None, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """MELT's gated update of a shared looped KV cache: ``K[rows] = g * K[rows] + (1 - g) * k_new`` (and V).

    Args:
        k_cache, v_cache: (B, Hkv, Nk, D) the layer's shared cache.
        k_new, v_new: (B, Hkv, n, D) this loop's keys/values for the rows it recomputes; the caches' dtype.
        gate: (B, Hkv, n, 1) per token and head, or (B, Hkv, n, D) per channel; any float dtype, values in
            [0, 1] (the caller's responsibility; NaN propagates).
        rows: which cache rows k_new's rows update, in order: None (all, n = Nk), a slice, or a 1-D int
            tensor of distinct rows (one min/max check and host sync). At decode, ``slice(-1, None)``.
        inplace: write into k_cache/v_cache (inference; ValueError if any input requires grad).

    Returns:
        (k, v): new (B, Hkv, Nk, D) caches (differentiable w.r.t. caches, new rows and gate), or the caches
        themselves with inplace=True.
    """
    check_update_inputs(k_cache, v_cache, k_new, v_new, gate, "looped_kv_update")
    rows_index, row_offset = _rows_spec(rows, k_cache.shape[2], k_new.shape[2], k_cache.device)
    backend = resolve_backend(k_new)
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (k_cache, v_cache, k_new, v_new, gate)):
            raise ValueError("looped_kv_update: inplace=True is for inference; an input requires grad")
        update_in_place(k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset, backend)
        return k_cache, v_cache
    if backend == "reference":
        return reference.looped_kv_update(
            k_cache, v_cache, k_new, v_new, gate, _rows_for_reference(rows_index, row_offset, k_new.shape[2])
        )
    return _looped_kv_update_op(k_cache, v_cache, k_new, v_new, gate, rows_index, row_offset)


# ---------------------------------------------------------------------------------------------------------
# looped_attention


def _looped_attention_fwd(q, k_new, v_new, gate, k_cache, v_cache, causal, scale):
    from memops.kernels import attention as attention_kernels

    q, k_new, v_new, gate, k_cache, v_cache = contiguous(q, k_new, v_new, gate, k_cache, v_cache)
    Nk, n = k_cache.shape[2], k_new.shape[2]
    # The kernel writes the n blended rows; rows before them are copied here (none in training, where n = Nk).
    k_out, v_out = torch.empty_like(k_cache), torch.empty_like(v_cache)
    if n < Nk:
        k_out[:, :, : Nk - n] = k_cache[:, :, : Nk - n]
        v_out[:, :, : Nk - n] = v_cache[:, :, : Nk - n]
    out, lse = attention_kernels.looped_attention_fwd(
        q, k_cache, v_cache, k_new, v_new, gate, k_out, v_out, causal=causal, scale=scale
    )
    return out, lse, k_out, v_out


def _looped_attention_fake(q, k_new, v_new, gate, k_cache, v_cache, causal, scale):
    return (*attention_outputs_like(q), empty_like_dense(k_cache), empty_like_dense(v_cache))


def _looped_attention_bwd(*args):
    from memops.kernels import attention as attention_kernels
    from memops.kernels import looped as looped_kernels

    grad_out, grad_lse, grad_k_out, grad_v_out, causal, scale = args[:4] + args[-2:]
    q, k_new, v_new, gate, k_cache, v_cache, out, lse, k_out, v_out = contiguous(*args[4:-2])
    grad_out = dense(grad_out)
    # Attention's grads w.r.t. the updated cache, plus whatever reached the returned caches, then back
    # through the blend.
    options = dict(causal=causal, scale=scale, deterministic=True, grad_lse=grad_lse)
    dq, d_k_out, d_v_out, *_ = attention_kernels.memory_attention_bwd(
        grad_out, q, k_out, v_out, None, None, None, out, lse, **options
    )
    if grad_k_out is not None:
        d_k_out = d_k_out + grad_k_out
    if grad_v_out is not None:
        d_v_out = d_v_out + grad_v_out
    Nk, n = k_cache.shape[2], k_new.shape[2]
    dk_cache, dv_cache, dk_new, dv_new, dgate = looped_kernels.looped_update_bwd(
        *contiguous(d_k_out, d_v_out), k_cache, v_cache, k_new, v_new, gate, None, Nk - n
    )
    return dq, dk_new, dv_new, dgate, dk_cache, dv_cache


_LOOPED_INPUTS = "Tensor q, Tensor k_new, Tensor v_new, Tensor gate, Tensor k_cache, Tensor v_cache"
_looped_attention_op = custom_op(
    "looped_attention",
    _looped_attention_fwd,
    f"({_LOOPED_INPUTS}, bool causal, float scale) -> (Tensor out, Tensor lse, Tensor k_out, Tensor v_out)",
    fake=_looped_attention_fake,
    backward=backward_op(
        "looped_attention_backward",
        _looped_attention_bwd,
        f"(Tensor grad_out, Tensor? grad_lse, Tensor? grad_k_out, Tensor? grad_v_out, {_LOOPED_INPUTS}, Tensor out, "
        "Tensor lse, Tensor k_out, Tensor v_out, bool causal, float scale) -> "
        "(Tensor dq, Tensor dk_new, Tensor dv_new, Tensor dgate, Tensor dk_cache, Tensor dv_cache)",
        grads=("q", "k_new", "v_new", "gate", "k_cache", "v_cache"),
    ),
)


def _check_query_rows(q, k_new, op: str) -> None:
    """The loop's n new tokens give both its queries and its new key/value rows."""
    if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[2] != k_new.shape[2]:
        raise ValueError(
            f"{op}: q must have k_new's n={k_new.shape[2]} rows (one query per new token), got {q.shape[2]}"
        )


def looped_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gate: torch.Tensor,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, *,
    causal: bool = True, scale: float | None = None, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One loop of a MELT layer: update the shared cache's last n rows with the gate, then attend over it.

    ``K[Nk-n:] = g * K[Nk-n:] + (1 - g) * k_new`` (and V), then ``softmax(scale * q K^T + mask) V``.

    Args:
        q: (B, H, n, D) this loop's queries; H a multiple of Hkv (GQA).
        k_new, v_new: (B, Hkv, n, D) this loop's keys/values for the last n cache rows.
        gate: (B, Hkv, n, 1) per token and head, or (B, Hkv, n, D) per channel; values in [0, 1].
        k_cache, v_cache: (B, Hkv, Nk, D), Nk >= n, the layer's shared cache; None on the first loop (then
            K = k_new, V = v_new and the gate is not used).
        causal: causal mask, bottom-right aligned (query i at position Nk - n + i).
        scale: logit scale, default D ** -0.5.
        inplace: update k_cache/v_cache in place (inference; ValueError if an input requires grad). It runs
            the update kernel, then attention: a blend fused into the attention pass cannot write the rows
            other programs are still reading.

    Returns:
        (out (B, H, n, D), k, v): the updated caches are new tensors (the inputs themselves with inplace,
        or k_new/v_new on the first loop). Out of place, the blend is fused into the attention pass: the
        blended rows are computed while streamed and written once. Differentiable w.r.t. q, k_new, v_new,
        gate and both caches, also through the returned caches (the chain across loops).
    """
    op = "looped_attention"
    if k_cache is None or v_cache is None:
        if k_cache is not None or v_cache is not None:
            raise ValueError(f"{op}: k_cache and v_cache must be given together")
        check_update_inputs(k_new, v_new, k_new, v_new, gate, op)
        _check_query_rows(q, k_new, op)
        return memops_attention(q, k_new, v_new, causal=causal, scale=scale), k_new, v_new
    check_update_inputs(k_cache, v_cache, k_new, v_new, gate, op)
    _check_query_rows(q, k_new, op)
    check_attention_inputs(q, k_cache, v_cache, None, None, None, scale, op=op)
    n, Nk = k_new.shape[2], k_cache.shape[2]
    if n > Nk:
        raise ValueError(f"{op}: k_new has {n} rows but the cache only {Nk}; the new rows update the cache's last rows")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    backend = resolve_backend(q)
    if backend == "triton" and not inplace:  # the in-place path runs plain memory attention on the cache
        backend = attention_backend(
            q, "blend-channel" if gate.shape[-1] != 1 else "blend-row", k_new, v_new, gate, k_cache, v_cache
        )
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_new, v_new, gate, k_cache, v_cache)):
            raise ValueError(f"{op}: inplace=True is for inference; an input requires grad")
        update_in_place(k_cache, v_cache, k_new, v_new, gate, None, Nk - n, backend)
        return memops_attention(q, k_cache, v_cache, causal=causal, scale=scale), k_cache, v_cache
    if backend == "reference":
        return reference.looped_attention(q, k_new, v_new, gate, k_cache, v_cache, causal=causal, scale=scale)
    check_triton_head_dim(q, op)
    out, _, k, v = _looped_attention_op(q, k_new, v_new, gate, k_cache, v_cache, causal, scale)
    return out, k, v


# ---------------------------------------------------------------------------------------------------------
# looped_attention_varlen: the training path over packed sequences (every loop recomputes every token)


def _packed_rows(t: torch.Tensor) -> torch.Tensor:
    """Packed (total, Hkv, D | 1) rows as the update kernels' contiguous (1, total, Hkv, D | 1): the blend is
    per element, so any split of the rows into 'heads' and 'rows' gives the same result."""
    return dense(t).unsqueeze(0)


def _looped_attention_varlen_fwd(q, k_new, v_new, gate, k_cache, v_cache, cu_seqlens, causal, scale):
    from memops.kernels import attention as attention_kernels

    q, k_new, v_new, gate, k_cache, v_cache = contiguous(q, k_new, v_new, gate, k_cache, v_cache)
    k_out, v_out = torch.empty_like(k_cache), torch.empty_like(v_cache)  # the kernel writes every row
    packed = dict(cu_seqlens_q=cu_seqlens.contiguous(), cu_seqlens_k=cu_seqlens.contiguous())
    out, lse = attention_kernels.looped_attention_fwd(
        q, k_cache, v_cache, k_new, v_new, gate, k_out, v_out, causal=causal, scale=scale, **packed
    )
    return out, lse, k_out, v_out


def _looped_attention_varlen_fake(q, k_new, v_new, gate, k_cache, v_cache, cu_seqlens, causal, scale):
    return (*varlen_outputs_like(q), empty_like_dense(k_cache), empty_like_dense(v_cache))


def _looped_attention_varlen_bwd(*args):
    from memops.kernels import attention as attention_kernels
    from memops.kernels import looped as looped_kernels

    grad_out, grad_lse, grad_k_out, grad_v_out = args[:4]
    q, k_new, v_new, gate, k_cache, v_cache = contiguous(*args[4:10])
    cu_seqlens, out, lse, k_out, v_out, causal, scale = args[10:]
    packed = dict(cu_seqlens_q=cu_seqlens.contiguous(), cu_seqlens_k=cu_seqlens.contiguous())
    options = dict(causal=causal, scale=scale, deterministic=True, grad_lse=grad_lse, **packed)
    dq, d_k_out, d_v_out, *_ = attention_kernels.memory_attention_bwd(
        dense(grad_out), q, dense(k_out), dense(v_out), None, None, None, out, lse, **options
    )
    if grad_k_out is not None:
        d_k_out = d_k_out + grad_k_out
    if grad_v_out is not None:
        d_v_out = d_v_out + grad_v_out
    rows = [_packed_rows(t) for t in (d_k_out, d_v_out, k_cache, v_cache, k_new, v_new, gate)]
    grads = looped_kernels.looped_update_bwd(*rows, None, 0)
    dk_cache, dv_cache, dk_new, dv_new, dgate = (g.squeeze(0) for g in grads)
    return dq, dk_new, dv_new, dgate, dk_cache, dv_cache


_looped_attention_varlen_op = custom_op(
    "looped_attention_varlen",
    _looped_attention_varlen_fwd,
    f"({_LOOPED_INPUTS}, Tensor cu_seqlens, bool causal, float scale) -> "
    "(Tensor out, Tensor lse, Tensor k_out, Tensor v_out)",
    fake=_looped_attention_varlen_fake,
    backward=backward_op(
        "looped_attention_varlen_backward",
        _looped_attention_varlen_bwd,
        f"(Tensor grad_out, Tensor? grad_lse, Tensor? grad_k_out, Tensor? grad_v_out, {_LOOPED_INPUTS}, "
        "Tensor cu_seqlens, Tensor out, Tensor lse, Tensor k_out, Tensor v_out, bool causal, float scale) -> "
        "(Tensor dq, Tensor dk_new, Tensor dv_new, Tensor dgate, Tensor dk_cache, Tensor dv_cache)",
        grads=("q", "k_new", "v_new", "gate", "k_cache", "v_cache"),
    ),
)


def _check_packed_rows(k_new, v_new, gate, k_cache, v_cache, op: str) -> None:
    named = [("k_new", k_new), ("v_new", v_new), ("gate", gate), ("k_cache", k_cache), ("v_cache", v_cache)]
    for name, t in named:
        if t is not None:
            check_float_tensor(t, name, op, dims=3, layout="3-D (total, Hkv, D)", device_of=("k_new", k_new))
    total, Hkv, D = k_new.shape
    for name, t in (("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t is not None and t.shape != k_new.shape:
            raise ValueError(f"{op}: {name} must have k_new's shape {tuple(k_new.shape)}, got {tuple(t.shape)}")
        if t is not None and t.dtype != k_new.dtype:
            raise TypeError(f"{op}: {name} must have k_new's dtype {k_new.dtype}, got {t.dtype}")
    if tuple(gate.shape) not in ((total, Hkv, 1), (total, Hkv, D)):
        raise ValueError(
            f"{op}: gate must be (total, Hkv, 1) = {(total, Hkv, 1)} or (total, Hkv, D) = {(total, Hkv, D)}, "
            f"got {tuple(gate.shape)}"
        )


def looped_attention_varlen(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gate: torch.Tensor,
    cu_seqlens: torch.Tensor, max_seqlen: int,
    k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, *,
    causal: bool = True, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`looped_attention`'s training path over a packed batch: each loop recomputes every token, so
    every cache row is blended, ``K = g * K + (1 - g) * k_new`` (and V), then each sequence attends over its
    own rows of the updated cache (FlashAttention's varlen layout; queries and keys share the boundaries).

    Args:
        q: (total, H, D) this loop's queries, one per packed token; H a multiple of Hkv.
        k_new, v_new: (total, Hkv, D) this loop's keys/values; gate (total, Hkv, 1) or (total, Hkv, D).
        cu_seqlens: (S + 1,) int32; max_seqlen: int >= every length (see :func:`memory_attention_varlen`).
        k_cache, v_cache: (total, Hkv, D), the previous loop's, or None on the first loop (then the gate is
            not used and k, v = k_new, v_new).
        causal: within each sequence (default). scale: default D ** -0.5.

    Returns:
        (out (total, H, D), k, v), the caches new tensors; differentiable w.r.t. every tensor input, also
        through the returned caches. The blend is fused into the attention pass, as in the padded op.
    """
    op = "looped_attention_varlen"
    if (k_cache is None) != (v_cache is None):
        raise ValueError(f"{op}: k_cache and v_cache must be given together")
    check_varlen_inputs(
        q, k_new, v_new, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None, None, None, scale, op, shared=True
    )
    _check_packed_rows(k_new, v_new, gate, k_cache, v_cache, op)
    if k_cache is None:
        out = memops_attention_varlen(
            q, k_new, v_new, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal, scale=scale
        )
        return out, k_new, v_new
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    path = "blend-channel" if gate.shape[-1] != 1 else "blend-row"
    if attention_backend(q, f"varlen-{path}", k_new, v_new, gate, k_cache, v_cache) == "reference":
        return reference.looped_attention_varlen(
            q, k_new, v_new, gate, cu_seqlens, k_cache, v_cache, causal=causal, scale=scale
        )
    check_triton_head_dim(q, op)
    record_launch("looped_attention.varlen")
    out, _, k, v = _looped_attention_varlen_op(q, k_new, v_new, gate, k_cache, v_cache, cu_seqlens, causal, scale)
    return out, k, v
