"""TRIM-KV retention ops: public functions and their torch.library registration.

``retention_attention`` -> ``memops::retention_attention`` (custom op) -> the memory-attention kernels of
``memops.kernels.attention`` with their retention-decay path (no memory, causal). ``retention_capacity`` ->
``memops::retention_capacity`` -> ``memops.kernels.retention``. Backend "reference" calls
``memops.reference.retention`` directly (differentiable by autograd).
"""
from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_attention_backend, resolve_backend
from memops.attention import check_attention_inputs, check_triton_head_dim, unit_last_stride


def _attention_kernels():
    from memops.kernels import attention

    return attention


def _retention_kernels():
    from memops.kernels import retention

    return retention


def validate_log_beta(log_beta, shape: tuple, device: torch.device, op: str, *, check_values: bool) -> None:
    """log_beta must be a float tensor of ``shape`` on ``device``; with check_values, no entry > 0 (beta > 1
    would make old tokens weigh more, and the capacity sum overflow). One reduction and a host sync."""
    if not isinstance(log_beta, torch.Tensor):
        raise TypeError(f"{op}: log_beta must be a torch.Tensor, got {type(log_beta).__name__}")
    if not log_beta.is_floating_point():
        raise TypeError(f"{op}: log_beta must be floating point, got {log_beta.dtype}")
    if tuple(log_beta.shape) != tuple(shape):
        raise ValueError(f"{op}: log_beta must be (B, Hkv, Nk) = {tuple(shape)}, got {tuple(log_beta.shape)}")
    if log_beta.device != device:
        raise ValueError(f"{op}: log_beta is on {log_beta.device} but q is on {device}")
    if check_values and log_beta.numel() and not torch.compiler.is_compiling():
        largest = log_beta.max().item()
        if largest > 0:
            raise ValueError(f"{op}: log_beta must be <= 0 (beta = exp(log_beta) <= 1), found {largest:g}")


# ---------------------------------------------------------------------------------------------------------
# retention_attention


@torch.library.custom_op("memops::retention_attention", mutates_args=())
def _retention_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor, mem_k: torch.Tensor | None,
    mem_v: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, log_beta, mem_k, mem_v = (unit_last_stride(t) for t in (q, k, v, log_beta, mem_k, mem_v))
    return _attention_kernels().memory_attention_fwd(q, k, v, mem_k, mem_v, None, causal=True, scale=scale,
                                                     log_beta=log_beta)


@_retention_attention_op.register_fake
def _(q, k, v, log_beta, mem_k, mem_v, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("memops::retention_attention_backward", mutates_args=())
def _retention_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    log_beta: torch.Tensor, mem_k: torch.Tensor | None, mem_v: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor, scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = (grad_out, q, k, v, log_beta, mem_k, mem_v)
    grad_out, q, k, v, log_beta, mem_k, mem_v = (unit_last_stride(t) for t in tensors)
    # Sequence keys use no atomics; a batch-shared memory sums its grads with atomics unless deterministic.
    dq, dk, dv, dmem_k, dmem_v, _, dlog_beta = _attention_kernels().memory_attention_bwd(
        grad_out, q, k, v, mem_k, mem_v, None, out, lse, causal=True, scale=scale, deterministic=deterministic,
        grad_lse=grad_lse, log_beta=log_beta,
    )
    # A custom op returns tensors only (and no two may alias): absent grads travel as fresh empty tensors.
    return (dq, dk, dv, dlog_beta.to(log_beta.dtype), q.new_empty(0) if dmem_k is None else dmem_k,
            q.new_empty(0) if dmem_v is None else dmem_v)


@_retention_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, log_beta, mem_k, mem_v, out, lse, scale, deterministic):
    def like(t):
        return q.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(q), like(k), like(v), like(log_beta), like(mem_k), like(mem_v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, log_beta, mem_k, mem_v, scale = inputs
    ctx.save_for_backward(q, k, v, log_beta, mem_k, mem_v, *output)
    ctx.scale = scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, log_beta, mem_k, mem_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dlog_beta, dmem_k, dmem_v = _retention_attention_backward_op(
        grad_out, grad_lse, q, k, v, log_beta, mem_k, mem_v, out, lse, ctx.scale,
        torch.are_deterministic_algorithms_enabled())
    has_memory = mem_k is not None
    return dq, dk, dv, dlog_beta, dmem_k if has_memory else None, dmem_v if has_memory else None, None


_retention_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def retention_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_beta: torch.Tensor, *,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False, check_log_beta: bool = True,
):
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

    Returns:
        out (B, H, N, D) in q.dtype, or (out, lse). A query with no visible key (N > Nk) gets zeros.
        Gradients flow to q, k, v and log_beta (``dlog_beta[j] = sum_i (pos_i - j) dS[i, j]`` over the group).

    With log_beta = 0 this is plain causal attention. The Triton path needs head dim 16, 32, 64, 128 or 256.
    """
    op = "retention_attention"
    check_attention_inputs(q, k, v, mem_k, mem_v, None, scale, op=op)
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = None
    validate_log_beta(log_beta, (k.shape[0], k.shape[1], k.shape[2]), q.device, op, check_values=check_log_beta)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if resolve_attention_backend(q, "decay", k, v, log_beta, mem_k, mem_v) == "reference":
        return reference.retention_attention(q, k, v, log_beta, mem_k=mem_k, mem_v=mem_v, scale=scale,
                                             return_lse=return_lse)
    check_triton_head_dim(q, op)
    out, lse = _retention_attention_op(q, k, v, log_beta, mem_k, mem_v, scale)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# retention_capacity and capacity_loss


@torch.library.custom_op("memops::retention_capacity", mutates_args=())
def _retention_capacity_op(log_beta: torch.Tensor) -> torch.Tensor:
    return _retention_kernels().retention_capacity_fwd(log_beta.contiguous())


@_retention_capacity_op.register_fake
def _(log_beta):
    return log_beta.new_empty(log_beta.shape, dtype=torch.float64 if log_beta.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("memops::retention_capacity_backward", mutates_args=())
def _retention_capacity_backward_op(grad_capacity: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    return _retention_kernels().retention_capacity_bwd(grad_capacity.contiguous(), log_beta.contiguous())


@_retention_capacity_backward_op.register_fake
def _(grad_capacity, log_beta):
    return torch.empty_like(log_beta, memory_format=torch.contiguous_format)


def _capacity_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _capacity_backward(ctx, grad_capacity):
    (log_beta,) = ctx.saved_tensors
    return _retention_capacity_backward_op(grad_capacity, log_beta)


_retention_capacity_op.register_autograd(_capacity_backward, setup_context=_capacity_setup_context)


def retention_capacity(log_beta: torch.Tensor, *, check_log_beta: bool = True) -> torch.Tensor:
    """TRIM-KV's capacity: how many tokens' worth of retention the sequence holds at each position.

    ``R[..., t] = sum_{j <= t} exp((t - j) * log_beta[..., j])``

    Args:
        log_beta: (B, Hkv, N) (any leading dims) float, each <= 0.
        check_log_beta: raise ValueError for a log_beta > 0 (one reduction and a host sync).

    Returns:
        R with log_beta's shape, fp32 (fp64 for fp64), differentiable:
        ``dlog_beta[j] = sum_{t >= j} dR[t] (t - j) exp((t - j) log_beta[j])``. The Triton kernels never
        store the N x N terms (the reference does).
    """
    if not isinstance(log_beta, torch.Tensor):
        raise TypeError(f"retention_capacity: log_beta must be a torch.Tensor, got {type(log_beta).__name__}")
    if log_beta.dim() < 1:
        raise ValueError("retention_capacity: log_beta must have shape (..., N), got a 0-d tensor")
    validate_log_beta(log_beta, log_beta.shape, log_beta.device, "retention_capacity", check_values=check_log_beta)
    if resolve_backend(log_beta) == "reference":
        return reference.retention_capacity(log_beta)
    return _retention_capacity_op(log_beta)


def capacity_loss(log_beta: torch.Tensor, budget: float, *, check_log_beta: bool = True) -> torch.Tensor:
    """TRIM-KV's capacity loss for a KV budget M: the mean over the positive entries of
    ``max(0, (R_t - M) / max(t - M, 1))`` with R = :func:`retention_capacity` (0 when none is positive).
    log_beta (B, Hkv, N); returns a scalar fp32 tensor (fp64 for fp64), differentiable."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise ValueError(f"capacity_loss: budget must be a number >= 0, got {budget!r}")
    return reference.capacity_loss_from(retention_capacity(log_beta, check_log_beta=check_log_beta), float(budget))
