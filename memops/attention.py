"""Memory-token attention: the public function and its torch.library registration.

``memory_attention`` -> ``memops::memory_attention`` (custom op, backend "triton") ->
``memops.kernels.attention``; backend "reference" calls ``memops.reference.attention`` directly (SDPA,
differentiable by autograd).
"""
from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_attention_backend
from memops.reference.attention import bias_3d

TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _kernels():
    from memops.kernels import attention

    return attention


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_attention_inputs(q, k, v, mem_k, mem_v, mem_bias, scale, op="memory_attention"):
    named = [("q", q), ("k", k), ("v", v), ("mem_k", mem_k), ("mem_v", mem_v), ("mem_bias", mem_bias)]
    for name, t in named:
        if (t is not None or name in ("q", "k", "v")) and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, heads, length, D), got shape {_shape(t)}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{op}: k must be (B={B}, Hkv, Nk, D={D}), got {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have k's shape {_shape(k)}, got {_shape(v)}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{op}: q's {H} heads must be a multiple of k's {Hkv} heads (GQA/MQA)")
    if (mem_k is None) != (mem_v is None):
        raise ValueError(f"{op}: mem_k and mem_v must be given together")
    if mem_k is not None:
        if mem_k.dim() not in (3, 4):
            raise ValueError(
                f"{op}: mem_k must be (B={B}, Hkv={Hkv}, M, D={D}) or shared (Hkv={Hkv}, M, D={D}), "
                f"got {_shape(mem_k)}"
            )
        expected = (B, Hkv) if mem_k.dim() == 4 else (Hkv,)
        if tuple(mem_k.shape[:-2]) != expected or mem_k.shape[-1] != D:
            raise ValueError(
                f"{op}: mem_k must be (B={B}, Hkv={Hkv}, M, D={D}) or shared (Hkv={Hkv}, M, D={D}), "
                f"got {_shape(mem_k)}"
            )
        if mem_v.shape != mem_k.shape:
            raise ValueError(f"{op}: mem_v must have mem_k's shape {_shape(mem_k)}, got {_shape(mem_v)}")
    if mem_bias is not None:
        if mem_k is None:
            raise ValueError(f"{op}: mem_bias needs mem_k and mem_v")
        M = mem_k.shape[-2]
        if _shape(mem_bias) not in ((M,), (Hkv, M), (B, Hkv, M)):
            raise ValueError(
                f"{op}: mem_bias must be (M,), (Hkv, M) or (B, Hkv, M) = ({M},), ({Hkv}, {M}) or "
                f"({B}, {Hkv}, {M}), got {_shape(mem_bias)}"
            )
        if not mem_bias.is_floating_point():
            raise TypeError(f"{op}: mem_bias must be floating point, got {mem_bias.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"{op}: q must be floating point, got {q.dtype}")
    for name, t in named[1:5]:
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in named[1:]:
        if t is not None and t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")


def check_triton_head_dim(q: torch.Tensor, op: str) -> None:
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"{op}: head dim D={q.shape[-1]} is not supported by the Triton kernels; "
            f"expected one of {TRITON_HEAD_DIMS} (backend 'reference' takes any)"
        )


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("memops::memory_attention", mutates_args=())
def _memory_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor | None, mem_v: torch.Tensor | None,
    mem_bias: torch.Tensor | None, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    prepared = [unit_last_stride(t) for t in (q, k, v, mem_k, mem_v, mem_bias)]
    return _kernels().memory_attention_fwd(*prepared, causal=causal, scale=scale)


@_memory_attention_op.register_fake
def _(q, k, v, mem_k, mem_v, mem_bias, causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("memops::memory_attention_backward", mutates_args=())
def _memory_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: torch.Tensor | None, mem_v: torch.Tensor | None, mem_bias: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prepared = [unit_last_stride(t) for t in (grad_out, q, k, v, mem_k, mem_v, mem_bias)]
    dq, dk, dv, dmem_k, dmem_v, dbias, _ = _kernels().memory_attention_bwd(
        *prepared, out, lse, causal=causal, scale=scale, deterministic=deterministic, grad_lse=grad_lse,
    )
    if dbias is not None:  # (B, Hkv, M) -> mem_bias' broadcast shape
        dims = [d for d in (0, 1) if mem_bias.shape[d] == 1 and dbias.shape[d] != 1]
        dbias = (dbias.sum(dim=dims, keepdim=True) if dims else dbias).to(mem_bias.dtype)
    # A custom op returns tensors only (and no two may alias): absent grads travel as fresh empty tensors.
    return tuple(q.new_empty(0) if t is None else t for t in (dq, dk, dv, dmem_k, dmem_v, dbias))


@_memory_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_bias, out, lse, causal, scale, deterministic):
    def like(t):
        return q.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(q), like(k), like(v), like(mem_k), like(mem_v), like(mem_bias)


def _setup_context(ctx, inputs, output):
    q, k, v, mem_k, mem_v, mem_bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mem_k, mem_v, mem_bias, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mem_k, mem_v, mem_bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dmem_k, dmem_v, dbias = _memory_attention_backward_op(
        grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_bias, out, lse, ctx.causal, ctx.scale,
        torch.are_deterministic_algorithms_enabled(),
    )
    has_memory = mem_k is not None
    return (dq, dk, dv, dmem_k if has_memory else None, dmem_v if has_memory else None,
            dbias if mem_bias is not None else None, None, None)


_memory_attention_op.register_autograd(_backward, setup_context=_setup_context)


def memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None, *,
    causal: bool = False, scale: float | None = None, mem_bias: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention over [memory ; sequence] keys without materialising the concatenation.

    ``out = softmax(scale * q @ [mem_k ; k]^T + mask + [mem_bias ; 0]) @ [mem_v ; v]``

    Args:
        q: (B, H, N, D) fp16, bf16 or fp32 (fp32 dots run as tf32 on the Triton path).
        k, v: (B, Hkv, Nk, D), H a multiple of Hkv (GQA / MQA). SDPA's layout and meaning.
        mem_k, mem_v: (B, Hkv, M, D) per-sample memory, or (Hkv, M, D) shared by the batch (its grads are
            then summed over the batch). Both None, or M = 0: plain attention.
        causal: mask sequence keys j > i + Nk - N (bottom-right aligned, as FlashAttention >= 2.1); memory
            keys stay visible to every query. A query with no visible key gets zeros (and lse -inf).
        scale: logit scale, default D ** -0.5.
        mem_bias: additive logit bias per memory row, (M,), (Hkv, M) or (B, Hkv, M); differentiable.
            k identical memory rows equal one row with bias ln k.
        return_lse: also return the log-sum-exp of the logits, (B, H, N) fp32.

    Returns:
        out (B, H, N, D) in q.dtype, or (out, lse).

    The Triton path needs head dim 16, 32, 64, 128 or 256; the reference takes any.
    """
    check_attention_inputs(q, k, v, mem_k, mem_v, mem_bias, scale)
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = mem_bias = None
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    backend = resolve_attention_backend(q, "memory", k, v, mem_k, mem_v, mem_bias)
    if backend == "reference":
        return reference.memory_attention(
            q, k, v, mem_k, mem_v, causal=causal, scale=scale, mem_bias=mem_bias, return_lse=return_lse
        )
    check_triton_head_dim(q, "memory_attention")
    mem_bias = bias_3d(mem_bias) if mem_bias is not None else None
    out, lse = _memory_attention_op(q, k, v, mem_k, mem_v, mem_bias, causal, scale)
    return (out, lse) if return_lse else out
