"""TRIM-KV retention ops: public functions and their torch.library registration.

``retention_attention`` -> ``memops::retention_attention`` (custom op) -> the memory-attention kernels of
``memops.kernels.attention`` with their retention-decay path (no memory, causal). ``retention_capacity`` ->
``memops::retention_capacity`` -> ``memops.kernels.retention``. Backend "reference" calls
``memops.reference.retention`` directly (differentiable by autograd).
"""

from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import (
    backward_op,
    custom_op,
    unit_last_stride,
)
from memops._validation import (
    can_read_values,
    check_attention_inputs,
    check_bool,
    check_triton_head_dim,
    check_varlen_inputs,
)
from memops.attention import attention_backend, attention_outputs_like, varlen_outputs_like
from memops.kernels._launch import record_launch


def validate_log_beta(
    log_beta, shape: tuple, device: torch.device, op: str, *, check_values: bool, layout: str = "(B, Hkv, Nk)"
) -> None:
    """log_beta must be a float tensor of ``shape`` on ``device``; with check_values, no entry > 0 (beta > 1
    would make old tokens weigh more, and the capacity sum overflow). One reduction and a host sync."""
    if not isinstance(log_beta, torch.Tensor):
        raise TypeError(f"{op}: log_beta must be a torch.Tensor, got {type(log_beta).__name__}")
    if not log_beta.is_floating_point():
        raise TypeError(f"{op}: log_beta must be floating point, got {log_beta.dtype}")
    if tuple(log_beta.shape) != tuple(shape):
        raise ValueError(f"{op}: log_beta must be {layout} = {tuple(shape)}, got {tuple(log_beta.shape)}")
    if log_beta.device != device:
        raise ValueError(f"{op}: log_beta is on {log_beta.device} but q is on {device}")
    if check_values and log_beta.numel() and can_read_values(log_beta):
        # (max() would return NaN when a NaN is present, hiding a positive entry beside it)
        largest = torch.where(log_beta > 0, log_beta, 0).max().item()
        if largest > 0:
            raise ValueError(f"{op}: log_beta must be <= 0 (beta = exp(log_beta) <= 1), found {largest:g}")


# ---------------------------------------------------------------------------------------------------------
# retention_attention


def _retention_attention_fwd(q, k, v, log_beta, mem_k, mem_v, doc_start, doc_end, scale, deterministic):
    from memops.kernels import attention as attention_kernels

    q, k, v, log_beta, mem_k, mem_v = (unit_last_stride(t) for t in (q, k, v, log_beta, mem_k, mem_v))
    return attention_kernels.retention_attention_fwd(q, k, v, log_beta, mem_k, mem_v, scale=scale, doc_start=doc_start)


def _retention_attention_bwd(
    grad_out, grad_lse, q, k, v, log_beta, mem_k, mem_v, doc_start, doc_end, out, lse, scale, deterministic
):
    from memops.kernels import attention as attention_kernels

    grad_out, q, k, v, log_beta, mem_k, mem_v = (
        unit_last_stride(t) for t in (grad_out, q, k, v, log_beta, mem_k, mem_v)
    )
    # Sequence keys use no atomics; a batch-shared memory sums its grads with atomics unless deterministic.
    decay = dict(log_beta=log_beta, doc_start=doc_start, doc_end=doc_end)
    options = dict(causal=True, scale=scale, deterministic=deterministic, grad_lse=grad_lse, **decay)
    dq, dk, dv, dmem_k, dmem_v, _, dlog_beta = attention_kernels.memory_attention_bwd(
        grad_out, q, k, v, mem_k, mem_v, None, out, lse, **options
    )
    return dq, dk, dv, dlog_beta.to(log_beta.dtype), dmem_k, dmem_v


_RETENTION_INPUTS = (
    "Tensor q, Tensor k, Tensor v, Tensor log_beta, Tensor? mem_k, Tensor? mem_v, Tensor? doc_start, Tensor? doc_end"
)
# the differentiable inputs of both retention-attention ops (padded, packed) and their backward ops' grads
_RETENTION_DIFFERENTIABLE = ("q", "k", "v", "log_beta", "mem_k", "mem_v")
_RETENTION_GRADS = "Tensor dq, Tensor dk, Tensor dv, Tensor dlog_beta, Tensor dmem_k, Tensor dmem_v"
_retention_attention_op = custom_op(
    "retention_attention",
    _retention_attention_fwd,
    f"({_RETENTION_INPUTS}, float scale, bool deterministic) -> (Tensor out, Tensor lse)",
    fake=attention_outputs_like,
    backward=backward_op(
        "retention_attention_backward",
        _retention_attention_bwd,
        f"(Tensor grad_out, Tensor? grad_lse, {_RETENTION_INPUTS}, Tensor out, Tensor lse, float scale, "
        f"bool deterministic) -> ({_RETENTION_GRADS})",
        grads=_RETENTION_DIFFERENTIABLE,
    ),
)


def retention_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor, *,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False, check_log_beta: bool = True,
    position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, deterministic: bool = False,
):  # fmt: skip
    """Causal attention with TRIM-KV's learned retention decay (training-time attention).

    ``logit[i, j] = scale * q_i . k_j + (pos_i - j) * log_beta[j]`` for sequence keys j <= pos_i, where
    pos_i = i + Nk - N (bottom-right aligned, as FlashAttention >= 2.1); softmax; @ v. The decay bias is
    computed on the fly from log_beta and the positions: no (N, Nk) bias tensor exists.

    Args:
        q: (B, H, N, D) fp16, bf16, fp32 (fp64 for gradcheck).
        k, v: (B, Hkv, Nk, D), H a multiple of Hkv (GQA): SDPA's layout.
        log_beta: (B, Hkv, Nk) float, each <= 0: the key's retention, shared by the query heads of its group.
        mem_k, mem_v: optional memory rows, (B, Hkv, M, D) or batch-shared (Hkv, M, D) as in
            :func:`memops.memory_attention`: visible to every query, with no decay and never evicted.
        scale: logit scale, default D ** -0.5.
        return_lse: also return the log-sum-exp (B, H, N), fp32.
        check_log_beta: raise ValueError for a log_beta > 0 (one reduction and a host sync; skipped
            under torch.compile). NaN in log_beta propagates to the output.
        position_ids: (B, Nk) or (Nk,) integer, packed documents along the keys (the official convention:
            a document starts wherever the position does not advance by 1). cu_seqlens: (S + 1,) int32/int64,
            FlashAttention's boundaries, shared by every batch row. A query (at key index pos_i) sees only
            its own document's keys; the kernels skip the key and query blocks outside it.
        deterministic: a batch-shared memory's grads summed in a fixed order instead of with atomics
            (bit-identical across runs); also on under ``torch.use_deterministic_algorithms(True)``.

    Returns:
        out (B, H, N, D) in q.dtype, or (out, lse). A query with no visible key (N > Nk) gets zeros.
        Gradients flow to q, k, v and log_beta (``dlog_beta[j] = sum_i (pos_i - j) dS[i, j]`` over the group).

    With log_beta = 0 this is plain causal attention. The Triton path needs head dim 16, 32, 64, 128 or 256.
    """
    op = "retention_attention"
    check_attention_inputs(q, k, v, mem_k, mem_v, None, scale, op=op)
    check_bool(deterministic, "deterministic", op)
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = None
    validate_log_beta(log_beta, (k.shape[0], k.shape[1], k.shape[2]), q.device, op, check_values=check_log_beta)
    bounds = documents(op, k.shape[2], k.shape[0], position_ids, cu_seqlens, q.device)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if attention_backend(q, "decay", k, v, log_beta, mem_k, mem_v) == "reference":
        packed = dict(position_ids=position_ids, cu_seqlens=cu_seqlens)
        memory = dict(mem_k=mem_k, mem_v=mem_v)
        return reference.retention_attention(q, k, v, log_beta, **memory, scale=scale, return_lse=return_lse, **packed)
    check_triton_head_dim(q, op)
    # with no sequence key there is nothing for a document to hide
    doc_start, doc_end = bounds[:2] if bounds is not None and k.shape[2] else (None, None)
    out, lse = _retention_attention_op(q, k, v, log_beta, mem_k, mem_v, doc_start, doc_end, scale, deterministic)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# retention_attention_varlen: packed sequences in FlashAttention's layout


def _retention_attention_varlen_fwd(q, k, v, log_beta, mem_k, mem_v, cu_seqlens_q, cu_seqlens_k, scale, deterministic):
    from memops.kernels import attention as attention_kernels

    q, k, v, mem_k, mem_v = (unit_last_stride(t) for t in (q, k, v, mem_k, mem_v))
    # the kernels read each kv head's decay as one row over the packed keys: (Hkv, total_k)
    decay = log_beta.t().contiguous()
    packed = dict(cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous())
    return attention_kernels.retention_attention_fwd(q, k, v, decay, mem_k, mem_v, scale=scale, **packed)


def _retention_attention_varlen_bwd(
    grad_out, grad_lse, q, k, v, log_beta, mem_k, mem_v, cu_seqlens_q, cu_seqlens_k, out, lse, scale, deterministic
):
    from memops.kernels import attention as attention_kernels

    grad_out, q, k, v, mem_k, mem_v = (unit_last_stride(t) for t in (grad_out, q, k, v, mem_k, mem_v))
    packed = dict(cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous())
    options = dict(causal=True, scale=scale, deterministic=deterministic, grad_lse=grad_lse, **packed)
    dq, dk, dv, dmem_k, dmem_v, _, dlog_beta = attention_kernels.memory_attention_bwd(
        grad_out, q, k, v, mem_k, mem_v, None, out, lse, log_beta=log_beta.t().contiguous(), **options
    )
    return dq, dk, dv, dlog_beta.t().to(log_beta.dtype), dmem_k, dmem_v


_RETENTION_VARLEN_INPUTS = (
    "Tensor q, Tensor k, Tensor v, Tensor log_beta, Tensor? mem_k, Tensor? mem_v, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k"
)


_retention_attention_varlen_op = custom_op(
    "retention_attention_varlen",
    _retention_attention_varlen_fwd,
    f"({_RETENTION_VARLEN_INPUTS}, float scale, bool deterministic) -> (Tensor out, Tensor lse)",
    fake=varlen_outputs_like,
    backward=backward_op(
        "retention_attention_varlen_backward",
        _retention_attention_varlen_bwd,
        f"(Tensor grad_out, Tensor? grad_lse, {_RETENTION_VARLEN_INPUTS}, Tensor out, Tensor lse, float scale, "
        f"bool deterministic) -> ({_RETENTION_GRADS})",
        grads=_RETENTION_DIFFERENTIABLE,
    ),
)


def retention_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False, check_log_beta: bool = True, deterministic: bool = False,
):  # fmt: skip
    """:func:`retention_attention` over a packed batch of S sequences, in FlashAttention's varlen layout.

    Within sequence s (n queries, nk keys): ``logit[i, j] = scale * q_i . k_j + (pos_i - j) * log_beta[j]``
    for its keys j <= pos_i = i + nk - n, so decay distances count within the sequence; softmax; @ v.

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D), H a multiple of Hkv.
        log_beta: (total_k, Hkv) float, each <= 0: each packed key's retention.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: as in :func:`memory_attention_varlen`.
        mem_k, mem_v: optional memory rows, per sequence (S, Hkv, M, D) or shared (Hkv, M, D): visible to
            every query of the sequence, with no decay.
        scale: logit scale, default D ** -0.5. return_lse: also return the (H, total_q) fp32 log-sum-exp.
        check_log_beta: raise ValueError for a log_beta > 0 (one host sync; skipped under torch.compile).
        deterministic: a batch-shared memory's grads summed in a fixed order instead of with atomics
            (bit-identical across runs); also on under ``torch.use_deterministic_algorithms(True)``.

    Returns:
        out (total_q, H, D) in q.dtype, or (out, lse); gradients flow to q, k, v, log_beta and the memory.
    """
    op = "retention_attention_varlen"
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mem_k, mem_v, None, scale, op)
    check_bool(deterministic, "deterministic", op)
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = None
    shape = (k.shape[0], k.shape[1])
    validate_log_beta(log_beta, shape, q.device, op, check_values=check_log_beta, layout="(total_k, Hkv)")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if attention_backend(q, "varlen-decay", k, v, log_beta, mem_k, mem_v) == "reference":
        return reference.retention_attention_varlen(
            q, k, v, log_beta, cu_seqlens_q, cu_seqlens_k, mem_k=mem_k, mem_v=mem_v, scale=scale,
            return_lse=return_lse,
        )  # fmt: skip
    check_triton_head_dim(q, op)
    record_launch("retention_attention.varlen")
    out, lse = _retention_attention_varlen_op(
        q, k, v, log_beta, mem_k, mem_v, cu_seqlens_q, cu_seqlens_k, scale, deterministic
    )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# retention_capacity and capacity_loss


def documents(op: str, num_positions: int, batch: int | None, position_ids, cu_seqlens, device):
    """Validated packed-document bounds: None, or (starts, ends, positions) (B|1, N), starts and ends int32
    contiguous for the kernels. position_ids (batch, N) or (N,), any integer dtype; cu_seqlens (S + 1,)
    int32/int64 from 0, non-decreasing, ending at N (values checked with one host sync, not under compile)."""
    if position_ids is None and cu_seqlens is None:
        return None
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError(f"{op}: give position_ids or cu_seqlens, not both")
    name, ids = ("position_ids", position_ids) if position_ids is not None else ("cu_seqlens", cu_seqlens)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {ids.dtype}")
    if ids.device != torch.device(device):
        raise ValueError(f"{op}: {name} is on {ids.device} but log_beta is on {device}")
    if num_positions >= 2**31:
        raise ValueError(f"{op}: packed documents need fewer than 2**31 positions, got {num_positions}")
    if position_ids is not None:
        shapes = [(num_positions,), (1, num_positions)] + ([(batch, num_positions)] if batch is not None else [])
        if tuple(ids.shape) not in shapes:
            expected = "(N,)" if batch is None else f"(B, N) = {(batch, num_positions)}"
            raise ValueError(f"{op}: position_ids must be {expected} or (N,), got {tuple(ids.shape)}")
    else:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {ids.dtype}")
        if ids.dim() != 1 or ids.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must be (S + 1,) with S >= 1, got {tuple(ids.shape)}")
        if can_read_values(ids):
            first, last = ids[0].item(), ids[-1].item()
            if first != 0 or last != num_positions or bool((ids[1:] < ids[:-1]).any()):
                raise ValueError(
                    f"{op}: cu_seqlens must start at 0, not decrease and end at N = {num_positions}, "
                    f"got {ids.tolist() if ids.numel() <= 16 else f'[{first}, ..., {last}]'}"
                )
    starts, ends, positions = reference.document_bounds(
        num_positions, position_ids=position_ids, cu_seqlens=cu_seqlens, device=device
    )
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous(), positions


def _retention_capacity_fwd(log_beta, starts, ends):
    from memops.kernels import retention as retention_kernels

    return retention_kernels.retention_capacity_fwd(log_beta.contiguous(), starts)


def _retention_capacity_bwd(grad_capacity, log_beta, ends):
    from memops.kernels import retention as retention_kernels

    return retention_kernels.retention_capacity_bwd(grad_capacity.contiguous(), log_beta.contiguous(), ends)


def _retention_capacity_fake(log_beta, starts, ends):
    return log_beta.new_empty(log_beta.shape, dtype=torch.float64 if log_beta.dtype == torch.float64 else torch.float32)


_retention_capacity_op = custom_op(
    "retention_capacity",
    _retention_capacity_fwd,
    "(Tensor log_beta, Tensor? starts, Tensor? ends) -> Tensor capacity",
    fake=_retention_capacity_fake,
    backward=backward_op(
        "retention_capacity_backward",
        _retention_capacity_bwd,
        "(Tensor grad_capacity, Tensor log_beta, Tensor? ends) -> Tensor dlog_beta",
        grads=("log_beta",),
    ),
)


def _capacity_documents(op: str, log_beta: torch.Tensor, position_ids, cu_seqlens):
    """:func:`documents` along log_beta's last dim (its first dim the batch, when it has more than one)."""
    batch = log_beta.shape[0] if log_beta.dim() > 1 else None
    return documents(op, log_beta.shape[-1], batch, position_ids, cu_seqlens, log_beta.device)


def _capacity(log_beta, bounds, position_ids, cu_seqlens, check_log_beta: bool, op: str) -> torch.Tensor:
    validate_log_beta(log_beta, log_beta.shape, log_beta.device, op, check_values=check_log_beta)
    if resolve_backend(log_beta) == "reference":
        return reference.retention_capacity(log_beta, position_ids=position_ids, cu_seqlens=cu_seqlens)
    starts, ends = (None, None) if bounds is None else bounds[:2]
    return _retention_capacity_op(log_beta, starts, ends)


def retention_capacity(
    log_beta: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    check_log_beta: bool = True,
) -> torch.Tensor:
    """TRIM-KV's capacity: how many tokens' worth of retention the sequence holds at each position.

    ``R[..., t] = sum_{j <= t} exp((t - j) * log_beta[..., j])``, j in t's own document when packed.

    Args:
        log_beta: (B, Hkv, N) (any leading dims, batch first) float, each <= 0.
        position_ids: (B, N) or (N,) integer, the official convention for packed documents: a document
            starts at 0 and wherever the position does not advance by 1 (transformers' packed position_ids).
        cu_seqlens: (S + 1,) int32/int64, FlashAttention's: document s is positions
            [cu_seqlens[s], cu_seqlens[s + 1]) of every batch row; cu_seqlens[-1] == N.
        check_log_beta: raise ValueError for a log_beta > 0 (one reduction and a host sync).

    Returns:
        R with log_beta's shape, fp32 (fp64 for fp64), differentiable:
        ``dlog_beta[j] = sum_{t >= j} dR[t] (t - j) exp((t - j) log_beta[j])``. The Triton kernels never
        store the N x N terms (the reference does), and with documents they skip the tiles outside them.
    """
    op = "retention_capacity"
    if not isinstance(log_beta, torch.Tensor):
        raise TypeError(f"{op}: log_beta must be a torch.Tensor, got {type(log_beta).__name__}")
    if log_beta.dim() < 1:
        raise ValueError(f"{op}: log_beta must have shape (..., N), got a 0-d tensor")
    bounds = _capacity_documents(op, log_beta, position_ids, cu_seqlens)
    return _capacity(log_beta, bounds, position_ids, cu_seqlens, check_log_beta, op)


def capacity_loss(
    log_beta, budget: float, *, global_capacity: bool = False, num_layers: int | None = None,
    position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, check_log_beta: bool = True,
) -> torch.Tensor:  # fmt: skip
    """TRIM-KV's capacity loss for a KV budget M.

    ``loss = mean over the positive entries of max(0, (R_t - M) / max(pos_t - M, 1))`` (0 when none is
    positive), with R = :func:`retention_capacity` and pos_t the position (within its document when packed).

    Args:
        log_beta: (B, Hkv, N) one layer's, (B, L, Hkv, N) all layers' (the official training code's stacked
            retention weights), or a list of L per-layer (B, Hkv, N) tensors (stacked on dim 1).
        budget: M >= 0, the KV budget per head.
        global_capacity: the official training default: R_t is summed over all layers and KV heads (every
            dim between batch and N, f of them) and compared with M * f, pos_t scaled by f as well. False
            (memops' default, and the official per-head option) applies the hinge to every head on its own.
        num_layers: optional check that the input holds L layers: dim 1 of a 4-d input, the list's length,
            or a divisor of dim 1 of a 3-d (B, L * Hkv, N) input.
        position_ids, cu_seqlens: packed documents, as in :func:`retention_capacity`; pos_t is position_ids
            (the official convention), or the index within the document for cu_seqlens.
        check_log_beta: raise ValueError for a log_beta > 0.

    Returns a scalar fp32 tensor (fp64 for fp64), differentiable with respect to log_beta.
    """
    op = "capacity_loss"
    if isinstance(log_beta, (list, tuple)):
        if not log_beta or not all(isinstance(t, torch.Tensor) for t in log_beta):
            raise TypeError(f"{op}: log_beta must be a tensor or a non-empty list of per-layer tensors")
        if len({tuple(t.shape) for t in log_beta}) != 1:
            raise ValueError(
                f"{op}: the per-layer log_betas must share one shape, got {sorted({tuple(t.shape) for t in log_beta})}"
            )
        log_beta = torch.stack(list(log_beta), dim=1)
    if not isinstance(log_beta, torch.Tensor):
        raise TypeError(f"{op}: log_beta must be a torch.Tensor, got {type(log_beta).__name__}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise ValueError(f"{op}: budget must be a number >= 0, got {budget!r}")
    if not isinstance(global_capacity, bool):
        raise TypeError(f"{op}: global_capacity must be a bool, got {type(global_capacity).__name__}")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"{op}: num_layers must be an int >= 1, got {num_layers!r}")
        held = log_beta.shape[1] if log_beta.dim() >= 3 else 1
        if log_beta.dim() not in (3, 4) or (held != num_layers if log_beta.dim() == 4 else held % num_layers):
            raise ValueError(
                f"{op}: num_layers={num_layers} does not match log_beta {tuple(log_beta.shape)}: "
                "expected (B, L, Hkv, N) with L = num_layers or (B, L * Hkv, N)"
            )
    if log_beta.dim() < 1:
        raise ValueError(f"{op}: log_beta must have shape (B, Hkv, N), got a 0-d tensor")
    bounds = _capacity_documents(op, log_beta, position_ids, cu_seqlens)
    capacity = _capacity(log_beta, bounds, position_ids, cu_seqlens, check_log_beta, op)
    return reference.capacity_loss_from(
        capacity, float(budget), positions=None if bounds is None else bounds[2], global_capacity=global_capacity
    )
