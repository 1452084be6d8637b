"""Memory-token attention: the public function and its torch.library registrations.

``memory_attention`` on backend "triton" runs one of two implementations (``attention_impl`` decides):
- fused: ``memops::memory_attention`` -> ``memops.kernels.attention``, one kernel over [memory ; sequence];
- composed: ``memops::memory_attention_composed`` -> torch's fused attention over the sequence
  (``memops._sdpa``), memops' kernel over the memory rows, merged by log-sum-exp
  (``memops.kernels.lse_merge``); its backward hands each part the merged out and lse.
Backend "reference" calls ``memops.reference.attention`` directly (SDPA, differentiable by autograd).
"""
from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_attention_backend
from memops.kernels._launch import record_launch
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


def dense(t: torch.Tensor) -> torch.Tensor:
    """t in the contiguous layout; clone(), unlike contiguous(), also traces on fake CUDA tensors."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _bias_grad_to_shape(dbias: torch.Tensor | None, mem_bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' (B, Hkv, M) fp32 bias grad summed to mem_bias' (B|1, Hkv|1, M) broadcast shape and dtype."""
    if dbias is None:
        return None
    dims = [d for d in (0, 1) if mem_bias.shape[d] == 1 and dbias.shape[d] != 1]
    return (dbias.sum(dim=dims, keepdim=True) if dims else dbias).to(mem_bias.dtype)


def _two_states(state: list, q: torch.Tensor) -> list:
    """A vendor op's random-number state padded to two tensors (distinct ones: custom-op outputs may not alias)."""
    return state + [q.new_zeros(1) for _ in range(2 - len(state))]


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
    dbias = _bias_grad_to_shape(dbias, mem_bias)
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


# ---------------------------------------------------------------------------------------------------------
# The composed path: the sequence part on torch's fused attention (memops._sdpa), the memory part on memops'
# kernel over the memory rows alone, merged by their log-sum-exps (memops.kernels.lse_merge).


def _gqa_for_vendor(q, k, v, causal):
    """(q, k, v) with equal heads for the vendor op, and whether K/V were expanded. Not causal: the H / Hkv
    query heads of a group become one head of group * N rows (a free view of a contiguous q; exact, since
    every row sees the same keys). Causal: the mask depends on the row, so K/V are expanded instead."""
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    if H == Hkv:
        return q, k, v, False
    if not causal:
        return q.reshape(B, Hkv, (H // Hkv) * N, D), k, v, False
    group = H // Hkv
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), True


def _as_query_heads(t, B, H, N):
    """A vendor result over folded heads, (B, Hkv, group * N, ...) -> (B, H, N, ...)."""
    return t.reshape(B, H, N, *t.shape[3:])


def _composed_fwd(q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence):
    from memops import _sdpa
    from memops.kernels.lse_merge import lse_merge

    B, H, N, D = q.shape
    Nk = k.shape[2]
    M = 0 if mem_k is None else mem_k.shape[-2]
    qs, ks, vs, _ = _gqa_for_vendor(q, k, v, causal)
    out_s, lse_s, state = _sdpa.sequence_fwd(sequence, qs, ks, vs, causal=causal, scale=scale)
    out_s, lse_s = _as_query_heads(out_s, B, H, N), _as_query_heads(lse_s, B, H, N)
    state = _two_states(state, q)
    empty_rows = min(max(N - Nk, 0), N) if causal else 0
    if M:
        none = k.narrow(2, 0, 0)  # no sequence keys: the memory rows alone
        out_m, lse_m = _kernels().memory_attention_fwd(q, none, none, mem_k, mem_v, mem_bias, causal=False,
                                                       scale=scale)
        out, lse = lse_merge(out_s, lse_s, out_m, lse_m, empty_a_rows=empty_rows)
    else:  # the vendor op alone; its rows without a key get out 0 and lse -inf, as the fused kernel gives
        never = q.new_full(lse_s.shape, float("-inf"), dtype=lse_s.dtype)
        out, lse = lse_merge(out_s, lse_s, out_s, never, empty_a_rows=empty_rows)
    return out, lse, state[0], state[1]


@torch.library.custom_op("memops::memory_attention_composed", mutates_args=())
def _memory_attention_composed_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor | None, mem_v: torch.Tensor | None,
    mem_bias: torch.Tensor | None, causal: bool, scale: float, sequence: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prepared = [unit_last_stride(t) for t in (q, k, v, mem_k, mem_v, mem_bias)]
    return _composed_fwd(*prepared, causal, scale, sequence)


@_memory_attention_composed_op.register_fake
def _(q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence):
    from memops import _sdpa

    # The vendor op's own fake (meta) kernel gives its state tensors' shapes on this torch version.
    qs, ks, vs, _ = _gqa_for_vendor(q, k, v, causal)
    state = _sdpa.sequence_fwd(sequence, qs, ks, vs, causal=causal, scale=scale)[2]
    state = _two_states(state, q)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype),
            torch.empty_like(state[0]), torch.empty_like(state[1]))


def _composed_bwd(grad_out, q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b, causal, scale, sequence,
                  deterministic):
    from memops import _sdpa

    B, H, N, D = q.shape
    Hkv = k.shape[1]
    M = 0 if mem_k is None else mem_k.shape[-2]
    grad_out = dense(grad_out)
    dq = dmem_k = dmem_v = dbias = None
    if M:  # the memory part: memops' kernels over the memory rows alone, given the merged out and lse
        none = k.narrow(2, 0, 0)  # no sequence keys: the memory rows alone
        dq, _, _, dmem_k, dmem_v, dbias, _ = _kernels().memory_attention_bwd(
            grad_out, q, none, none, mem_k, mem_v, mem_bias, out, lse, causal=False, scale=scale,
            deterministic=deterministic)
        dbias = _bias_grad_to_shape(dbias, mem_bias)
    # The sequence part: the vendor backward given the merged out and lse. A row with no key at all (lse
    # -inf) gets +inf, which makes its probabilities exp(s - lse) 0 instead of NaN.
    lse_seq = torch.where(torch.isneginf(lse), float("inf"), lse)
    qs, ks, vs, expanded = _gqa_for_vendor(q, k, v, causal)
    fold = (lambda t: t.reshape(qs.shape[0], qs.shape[1], qs.shape[2], *t.shape[3:])) if qs is not q else None
    go, o, l_seq = (grad_out, out, lse_seq) if fold is None else (fold(grad_out), fold(out), fold(lse_seq))
    dq_s, dk, dv = _sdpa.sequence_bwd(sequence, go, qs, ks, vs, o, l_seq, [state_a, state_b], causal=causal,
                                      scale=scale)
    dq_s = _as_query_heads(dq_s, B, H, N)
    if expanded:  # sum the expanded heads' grads back onto their kv head
        dk = dk.reshape(B, Hkv, H // Hkv, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, Hkv, H // Hkv, *dv.shape[2:]).sum(2)
    dq = dq_s if dq is None else dq + dq_s
    return tuple(q.new_empty(0) if t is None else dense(t) for t in (dq, dk, dv, dmem_k, dmem_v, dbias))


@torch.library.custom_op("memops::memory_attention_composed_backward", mutates_args=())
def _memory_attention_composed_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: torch.Tensor | None, mem_v: torch.Tensor | None, mem_bias: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, state_a: torch.Tensor, state_b: torch.Tensor,
    causal: bool, scale: float, sequence: str, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prepared = [unit_last_stride(t) for t in (grad_out, q, k, v, mem_k, mem_v, mem_bias)]
    return _composed_bwd(*prepared, out, lse, state_a, state_b, causal, scale, sequence, deterministic)


@_memory_attention_composed_backward_op.register_fake
def _(grad_out, q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b, causal, scale, sequence,
      deterministic):
    def like(t):
        return q.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(q), like(k), like(v), like(mem_k), like(mem_v), like(mem_bias)


def _composed_setup_context(ctx, inputs, output):
    q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence = inputs
    out, lse, state_a, state_b = output
    ctx.save_for_backward(q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b)
    ctx.causal, ctx.scale, ctx.sequence = causal, scale, sequence
    # An unused lse gets no grad (None, not zeros), so the backward knows when it may use the vendor op.
    ctx.set_materialize_grads(False)


def _composed_backward(ctx, grad_out, grad_lse, *_):
    q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is not None:
        # The vendor backward ops take no lse grad: the fused backward over [memory ; sequence] is exact
        # here too, given the merged out and lse.
        dq, dk, dv, dmem_k, dmem_v, dbias = _memory_attention_backward_op(
            grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_bias, out, lse, ctx.causal, ctx.scale, deterministic)
    else:
        dq, dk, dv, dmem_k, dmem_v, dbias = _memory_attention_composed_backward_op(
            grad_out, q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b, ctx.causal, ctx.scale,
            ctx.sequence, deterministic)
    has_memory = mem_k is not None
    return (dq, dk, dv, dmem_k if has_memory else None, dmem_v if has_memory else None,
            dbias if mem_bias is not None else None, None, None, None)


_memory_attention_composed_op.register_autograd(_composed_backward, setup_context=_composed_setup_context)


IMPLS = ("auto", "composed", "fused")
# "auto" keeps the single fused kernel below these sizes: at a few queries (decode) or a short sequence, one
# launch beats three (the vendor op, the memory part, the merge).
COMPOSED_MIN_QUERIES = 64
COMPOSED_MIN_KEYS = 256


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"memory_attention: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


def attention_impl(q: torch.Tensor, num_keys: int, *, causal: bool, impl: str = "auto") -> tuple[str, str | None]:
    """Which implementation runs memory attention on the Triton backend: ``("composed", sequence op)`` or
    ``("fused", None)``.

    ``impl="auto"`` picks composed when all of these hold, fused otherwise:

    ========================================  =====================================================
    condition                                 why
    ========================================  =====================================================
    q is a CUDA tensor                        the interpreter (CPU tensors) is for testing kernels
    N >= 64 and Nk >= 256, and q not empty    below that one fused launch beats three
    a vendor op fits (``memops._sdpa``)       cuDNN on sm_90, else flash, else efficient attention
    ========================================  =====================================================

    ``impl="composed"`` forces it (ValueError when no vendor op fits), ``impl="fused"`` the single kernel.
    """
    from memops import _sdpa
    from memops._backend import launch_arch

    _check_impl(impl)
    if impl == "fused":
        return "fused", None
    sequence = _sdpa.sequence_backend(q, num_keys, causal=causal, arch=launch_arch(q.device))
    if impl == "composed":
        if sequence is None or num_keys == 0 or q.numel() == 0:
            raise ValueError(
                f"memory_attention: impl='composed' needs sequence keys (Nk={num_keys}), queries, and a fused "
                f"attention op for {q.device.type} {q.dtype} head dim {q.shape[-1]} (causal={causal}); "
                "use impl='fused' or 'auto'")
        return "composed", sequence
    if (q.device.type != "cuda" or sequence is None or q.numel() == 0 or q.shape[2] < COMPOSED_MIN_QUERIES
            or num_keys < COMPOSED_MIN_KEYS):
        return "fused", None
    return "composed", sequence


def memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None, *,
    causal: bool = False, scale: float | None = None, mem_bias: torch.Tensor | None = None,
    return_lse: bool = False, impl: str = "auto",
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
        impl: on the Triton backend, ``"composed"`` (torch's fused attention over the sequence, memops' kernel
            over the memory, merged by log-sum-exp), ``"fused"`` (one memops kernel over both) or ``"auto"``
            (see :func:`attention_impl`). ``memops.testing.count_launches`` records the choice as
            ``"memory_attention.composed.<op>"`` or ``"memory_attention.fused"``.

    Returns:
        out (B, H, N, D) in q.dtype, or (out, lse).

    The Triton path needs head dim 16, 32, 64, 128 or 256; the reference takes any.
    """
    check_attention_inputs(q, k, v, mem_k, mem_v, mem_bias, scale)
    _check_impl(impl)
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = mem_bias = None
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    backend = resolve_attention_backend(q, "memory", k, v, mem_k, mem_v, mem_bias)
    if backend == "reference":
        return reference.memory_attention(
            q, k, v, mem_k, mem_v, causal=causal, scale=scale, mem_bias=mem_bias, return_lse=return_lse
        )
    check_triton_head_dim(q, "memory_attention")
    chosen, sequence = attention_impl(q, k.shape[2], causal=causal, impl=impl)
    mem_bias = bias_3d(mem_bias) if mem_bias is not None else None
    if chosen == "composed":
        record_launch(f"memory_attention.composed.{sequence}")
        out, lse, _, _ = _memory_attention_composed_op(q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence)
    else:
        record_launch("memory_attention.fused")
        out, lse = _memory_attention_op(q, k, v, mem_k, mem_v, mem_bias, causal, scale)
    return (out, lse) if return_lse else out
