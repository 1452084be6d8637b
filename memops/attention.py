"""Memory-token attention: the public function and its torch.library registrations.

``memory_attention`` on backend "triton" runs one of two implementations (``attention_impl`` decides):
- fused: ``memops::memory_attention`` -> ``memops.kernels.attention``, one kernel over [memory ; sequence];
- composed: ``memops::memory_attention_composed`` -> torch's fused attention over the sequence
  (``memops._attention_sdpa``), memops' kernel over the memory rows, merged by log-sum-exp
  (``memops.kernels.attention_lse_merge``); its backward hands each part the merged out and lse.
Backend "reference" calls ``memops.reference.attention`` directly (SDPA, differentiable by autograd).
"""

from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import (
    backward_op,
    call_with,
    custom_op,
    dense,
    empty_like_dense,
    unit_last_stride,
)
from memops._validation import check_attention_inputs, check_bool, check_triton_head_dim, check_varlen_inputs
from memops.kernels._launch import record_launch
from memops.reference.attention import bias_3d


def attention_outputs_like(q: torch.Tensor, *_args) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake of every attention forward: out like q, and the (B, H, N) lse in fp32 (fp64 for fp64)."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return empty_like_dense(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


def varlen_outputs_like(q: torch.Tensor, *_args) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake of every packed (varlen) attention forward: out like q (total_q, H, D), lse (H, total_q) fp32
    (fp64 for fp64)."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return empty_like_dense(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


def attention_backend(q: torch.Tensor, path: str, *differentiable: torch.Tensor | None) -> str:
    """:func:`memops._backend.resolve_backend` with the attention family's policy (memory, retention and looped
    attention): under "auto" the reference runs where the kernels have no clean launch config for q's GPU,
    dtype, head dim and ``path`` (``memops.kernels.attention.reference_instead``: fp32 with ieee dots at
    D >= 128, for example). ``differentiable``: the inputs whose requires_grad says whether the backward
    kernels are needed too."""

    def reference_instead() -> bool:
        from memops.kernels import attention as attention_kernels

        backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, *differentiable))
        return attention_kernels.reference_instead(q, path, backward=backward)

    return resolve_backend(q, reference_instead=reference_instead)


def _bias_grad_to_shape(dbias: torch.Tensor | None, mem_bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' (B, Hkv, M) fp32 bias grad summed to mem_bias' (B|1, Hkv|1, M) broadcast shape and dtype."""
    if dbias is None:
        return None
    dims = [d for d in (0, 1) if mem_bias.shape[d] == 1 and dbias.shape[d] != 1]
    return (dbias.sum(dim=dims, keepdim=True) if dims else dbias).to(mem_bias.dtype)


def _two_states(state: list, q: torch.Tensor) -> list:
    """A vendor op's random-number state padded to two tensors (distinct ones: custom-op outputs may not alias)."""
    return state + [q.new_zeros(1) for _ in range(2 - len(state))]


def _memory_attention_fwd(q, k, v, mem_k, mem_v, mem_bias, causal, scale, deterministic):
    from memops.kernels import attention as attention_kernels

    prepared = [unit_last_stride(t) for t in (q, k, v, mem_k, mem_v, mem_bias)]
    return attention_kernels.memory_attention_fwd(*prepared, causal=causal, scale=scale)


def _memory_attention_bwd(grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_bias, out, lse, causal, scale, deterministic):
    from memops.kernels import attention as attention_kernels

    prepared = [unit_last_stride(t) for t in (grad_out, q, k, v, mem_k, mem_v, mem_bias)]
    dq, dk, dv, dmem_k, dmem_v, dbias, _ = attention_kernels.memory_attention_bwd(
        *prepared, out, lse, causal=causal, scale=scale, deterministic=deterministic, grad_lse=grad_lse
    )
    return dq, dk, dv, dmem_k, dmem_v, _bias_grad_to_shape(dbias, mem_bias)


# The differentiable inputs of both memory-attention ops (fused and composed), and their backward ops' grads.
DIFFERENTIABLE = ("q", "k", "v", "mem_k", "mem_v", "mem_bias")
ATTENTION_INPUTS = "Tensor q, Tensor k, Tensor v, Tensor? mem_k, Tensor? mem_v, Tensor? mem_bias"
ATTENTION_GRADS = "Tensor dq, Tensor dk, Tensor dv, Tensor dmem_k, Tensor dmem_v, Tensor dmem_bias"
_FUSED_BACKWARD = (
    f"(Tensor grad_out, Tensor? grad_lse, {ATTENTION_INPUTS}, Tensor out, Tensor lse, bool causal, float scale, "
    f"bool deterministic) -> ({ATTENTION_GRADS})"
)
_memory_attention_backward_op = backward_op(
    "memory_attention_backward", _memory_attention_bwd, _FUSED_BACKWARD, grads=DIFFERENTIABLE
)
_memory_attention_op = custom_op(
    "memory_attention",
    _memory_attention_fwd,
    f"({ATTENTION_INPUTS}, bool causal, float scale, bool deterministic) -> (Tensor out, Tensor lse)",
    fake=attention_outputs_like,
    backward=_memory_attention_backward_op,
)


# ---------------------------------------------------------------------------------------------------------
# The composed path: the sequence part on torch's fused attention (memops._attention_sdpa), the memory part on memops'
# kernel over the memory rows alone, merged by their log-sum-exps (memops.kernels.attention_lse_merge).


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
    from memops import _attention_sdpa
    from memops.kernels import attention as attention_kernels
    from memops.kernels import attention_lse_merge as lse_merge_kernels

    B, H, N, D = q.shape
    Nk = k.shape[2]
    M = 0 if mem_k is None else mem_k.shape[-2]
    qs, ks, vs, _ = _gqa_for_vendor(q, k, v, causal)
    out_s, lse_s, state = _attention_sdpa.sequence_fwd(sequence, qs, ks, vs, causal=causal, scale=scale)
    out_s, lse_s = _as_query_heads(out_s, B, H, N), _as_query_heads(lse_s, B, H, N)
    state = _two_states(state, q)
    empty_rows = min(max(N - Nk, 0), N) if causal else 0
    if M:
        none = k.narrow(2, 0, 0)  # no sequence keys: the memory rows alone
        out_m, lse_m = attention_kernels.memory_attention_fwd(
            q, none, none, mem_k, mem_v, mem_bias, causal=False, scale=scale
        )
        out, lse = lse_merge_kernels.lse_merge(out_s, lse_s, out_m, lse_m, empty_a_rows=empty_rows)
    else:  # the vendor op alone; its rows without a key get out 0 and lse -inf, as the fused kernel gives
        never = q.new_full(lse_s.shape, float("-inf"), dtype=lse_s.dtype)
        out, lse = lse_merge_kernels.lse_merge(out_s, lse_s, out_s, never, empty_a_rows=empty_rows)
    if sequence == "cpu_flash":
        # torch's CPU flash op returns 0 (and a finite lse) for a query row holding a NaN; the math, the fused
        # kernel and the reference give NaN. Rows before empty_rows see no sequence key: their NaN comes from
        # the memory part (or, without memory, they see no key at all: out 0, lse -inf).
        nan_rows = torch.isnan(q).any(-1)
        nan_rows[..., :empty_rows] = False
        out = out.masked_fill(nan_rows.unsqueeze(-1), float("nan"))
        lse = lse.masked_fill(nan_rows, float("nan"))
    return out, lse, state[0], state[1]


def _memory_attention_composed_fwd(q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence, deterministic):
    prepared = [unit_last_stride(t) for t in (q, k, v, mem_k, mem_v, mem_bias)]
    return _composed_fwd(*prepared, causal, scale, sequence)


def _memory_attention_composed_fake(q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence, deterministic):
    from memops import _attention_sdpa

    # The vendor op's own fake (meta) kernel gives its state tensors' shapes on this torch version.
    qs, ks, vs, _ = _gqa_for_vendor(q, k, v, causal)
    state = _two_states(_attention_sdpa.sequence_fwd(sequence, qs, ks, vs, causal=causal, scale=scale)[2], q)
    return (*attention_outputs_like(q), torch.empty_like(state[0]), torch.empty_like(state[1]))


def _composed_bwd(
    grad_out, q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b, causal, scale, sequence, deterministic
):
    from memops import _attention_sdpa
    from memops.kernels import attention as attention_kernels

    B, H, N, D = q.shape
    Hkv = k.shape[1]
    M = 0 if mem_k is None else mem_k.shape[-2]
    grad_out = dense(grad_out)
    dq = dmem_k = dmem_v = dbias = None
    if M:  # the memory part: memops' kernels over the memory rows alone, given the merged out and lse
        none = k.narrow(2, 0, 0)  # no sequence keys: the memory rows alone
        dq, _, _, dmem_k, dmem_v, dbias, _ = attention_kernels.memory_attention_bwd(
            grad_out,
            q,
            none,
            none,
            mem_k,
            mem_v,
            mem_bias,
            out,
            lse,
            causal=False,
            scale=scale,
            deterministic=deterministic,
        )
        dbias = _bias_grad_to_shape(dbias, mem_bias)
    # The sequence part: the vendor backward given the merged out and lse. A row with no key at all (lse
    # -inf) gets +inf, which makes its probabilities exp(s - lse) 0 instead of NaN.
    lse_seq = torch.where(torch.isneginf(lse), float("inf"), lse)
    qs, ks, vs, expanded = _gqa_for_vendor(q, k, v, causal)
    fold = (lambda t: t.reshape(qs.shape[0], qs.shape[1], qs.shape[2], *t.shape[3:])) if qs is not q else None
    go, o, l_seq = (grad_out, out, lse_seq) if fold is None else (fold(grad_out), fold(out), fold(lse_seq))
    dq_s, dk, dv = _attention_sdpa.sequence_bwd(
        sequence, go, qs, ks, vs, o, l_seq, [state_a, state_b], causal=causal, scale=scale
    )
    dq_s = _as_query_heads(dq_s, B, H, N)
    if expanded:  # sum the expanded heads' grads back onto their kv head
        dk = dk.reshape(B, Hkv, H // Hkv, *dk.shape[2:]).sum(2)
        dv = dv.reshape(B, Hkv, H // Hkv, *dv.shape[2:]).sum(2)
    dq = dq_s if dq is None else dq + dq_s
    # placeholders for absent grads here already: tests trace this body on its own under FakeTensorMode
    return tuple(q.new_empty(0) if t is None else dense(t) for t in (dq, dk, dv, dmem_k, dmem_v, dbias))


def _memory_attention_composed_bwd(*args):
    grad_out, q, k, v, mem_k, mem_v, mem_bias = (unit_last_stride(t) for t in args[:7])
    return _composed_bwd(grad_out, q, k, v, mem_k, mem_v, mem_bias, *args[7:])


_COMPOSED_BACKWARD = (
    f"(Tensor grad_out, {ATTENTION_INPUTS}, Tensor out, Tensor lse, Tensor state_a, Tensor state_b, bool causal, "
    f"float scale, str sequence, bool deterministic) -> ({ATTENTION_GRADS})"
)
_memory_attention_composed_backward_op = backward_op(
    "memory_attention_composed_backward", _memory_attention_composed_bwd, _COMPOSED_BACKWARD, grads=DIFFERENTIABLE
)


def _composed_backward(saved, grad_out, grad_lse, *_):
    grad_out = torch.zeros_like(saved.out) if grad_out is None else grad_out
    if grad_lse is not None:
        # The vendor backward ops take no lse grad: the fused backward over [memory ; sequence] is exact
        # here too, given the merged out and lse.
        return call_with(_memory_attention_backward_op, vars(saved), grad_out=grad_out, grad_lse=grad_lse)
    return call_with(_memory_attention_composed_backward_op, vars(saved), grad_out=grad_out)


# An unused lse gets no grad (None, not zeros), so the backward knows when it may use the vendor op.
_memory_attention_composed_op = custom_op(
    "memory_attention_composed",
    _memory_attention_composed_fwd,
    f"({ATTENTION_INPUTS}, bool causal, float scale, str sequence, bool deterministic) -> "
    "(Tensor out, Tensor lse, Tensor state_a, Tensor state_b)",
    fake=_memory_attention_composed_fake,
    backward=_composed_backward,
    grads=DIFFERENTIABLE,
    materialize_grads=False,
)


IMPLS = ("auto", "composed", "fused")
# "auto" keeps the single fused kernel below these sizes: at a few queries (decode) or a short sequence, one
# launch beats three (the vendor op, the memory part, the merge).
COMPOSED_MIN_QUERIES = 64
COMPOSED_MIN_KEYS = 256


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"memory_attention: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


def attention_impl(
    q: torch.Tensor, num_keys: int, *, causal: bool, impl: str = "auto", scale: float = 1.0
) -> tuple[str, str | None]:
    """Which implementation runs memory attention on the Triton backend: ``("composed", sequence op)`` or
    ``("fused", None)``.

    ``impl="auto"`` picks composed when all of these hold, fused otherwise:

    ========================================  =====================================================
    condition                                 why
    ========================================  =====================================================
    q is a CUDA tensor                        the interpreter (CPU tensors) is for testing kernels
    N >= 64 and Nk >= 256, and q not empty    below that one fused launch beats three
    a vendor op fits (``memops._attention_sdpa``)       cuDNN on sm_90, else flash, else efficient attention
    ========================================  =====================================================

    ``impl="composed"`` forces it (ValueError when no vendor op fits), ``impl="fused"`` the single kernel. A
    scale that is not a positive finite number runs the fused kernel whatever ``impl`` says: the vendor ops
    assume one (torch's causal flash paths give NaN at scale <= 0), the fused kernel takes any.
    """
    from memops import _attention_sdpa
    from memops._backend import launch_arch

    _check_impl(impl)
    if impl == "fused" or not 0 < scale < float("inf"):
        return "fused", None
    sequence = _attention_sdpa.sequence_backend(q, num_keys, causal=causal, arch=launch_arch(q.device))
    if impl == "composed":
        if sequence is None or num_keys == 0 or q.numel() == 0:
            raise ValueError(
                f"memory_attention: impl='composed' needs sequence keys (Nk={num_keys}), queries, and a fused "
                f"attention op for {q.device.type} {q.dtype} head dim {q.shape[-1]} (causal={causal}); "
                "use impl='fused' or 'auto'"
            )
        return "composed", sequence
    if (
        q.device.type != "cuda"
        or sequence is None
        or q.numel() == 0
        or q.shape[2] < COMPOSED_MIN_QUERIES
        or num_keys < COMPOSED_MIN_KEYS
    ):
        return "fused", None
    return "composed", sequence


def memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None, *,
    causal: bool = False, scale: float | None = None, mem_bias: torch.Tensor | None = None,
    return_lse: bool = False, impl: str = "auto", deterministic: bool = False,
):  # fmt: skip
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
        deterministic: a batch-shared memory's grads summed over the batch in a fixed order instead of with
            atomics, so they are bit-identical across runs; also on under
            ``torch.use_deterministic_algorithms(True)`` (FlashAttention's flag). Every other grad is
            computed without atomics either way.

    Returns:
        out (B, H, N, D) in q.dtype, or (out, lse).

    The Triton path needs head dim 16, 32, 64, 128 or 256; the reference takes any.
    """
    check_attention_inputs(q, k, v, mem_k, mem_v, mem_bias, scale)
    _check_impl(impl)
    check_bool(deterministic, "deterministic", "memory_attention")
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = mem_bias = None
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    backend = attention_backend(q, "memory", k, v, mem_k, mem_v, mem_bias)
    if backend == "reference":
        return reference.memory_attention(
            q, k, v, mem_k, mem_v, causal=causal, scale=scale, mem_bias=mem_bias, return_lse=return_lse
        )
    chosen, sequence = attention_impl(q, k.shape[2], causal=causal, impl=impl, scale=scale)
    check_triton_head_dim(q, "memory_attention")
    mem_bias = bias_3d(mem_bias) if mem_bias is not None else None
    if chosen == "composed":
        record_launch(f"memory_attention.composed.{sequence}")
        out, lse, _, _ = _memory_attention_composed_op(
            q, k, v, mem_k, mem_v, mem_bias, causal, scale, sequence, deterministic
        )
    else:
        record_launch("memory_attention.fused")
        out, lse = _memory_attention_op(q, k, v, mem_k, mem_v, mem_bias, causal, scale, deterministic)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------
# Packed (varlen) batches: FlashAttention's layout, one fused kernel over every sequence's blocks.


def _packed_boundaries(cu_seqlens_q, cu_seqlens_k) -> dict:
    return dict(cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous())


def _memory_attention_varlen_fwd(
    q, k, v, mem_k, mem_v, mem_bias, cu_seqlens_q, cu_seqlens_k, causal, scale, deterministic
):
    from memops.kernels import attention as attention_kernels

    prepared = [unit_last_stride(t) for t in (q, k, v, mem_k, mem_v, mem_bias)]
    packed = _packed_boundaries(cu_seqlens_q, cu_seqlens_k)
    return attention_kernels.memory_attention_fwd(*prepared, causal=causal, scale=scale, **packed)


def _memory_attention_varlen_bwd(
    grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_bias, cu_seqlens_q, cu_seqlens_k, out, lse, causal, scale,
    deterministic,
):  # fmt: skip
    from memops.kernels import attention as attention_kernels

    prepared = [unit_last_stride(t) for t in (grad_out, q, k, v, mem_k, mem_v, mem_bias)]
    dq, dk, dv, dmem_k, dmem_v, dbias, _ = attention_kernels.memory_attention_bwd(
        *prepared, out, lse, causal=causal, scale=scale, deterministic=deterministic, grad_lse=grad_lse,
        **_packed_boundaries(cu_seqlens_q, cu_seqlens_k),
    )  # fmt: skip
    return dq, dk, dv, dmem_k, dmem_v, _bias_grad_to_shape(dbias, mem_bias)


_VARLEN_INPUTS = f"{ATTENTION_INPUTS}, Tensor cu_seqlens_q, Tensor cu_seqlens_k"
_memory_attention_varlen_op = custom_op(
    "memory_attention_varlen",
    _memory_attention_varlen_fwd,
    f"({_VARLEN_INPUTS}, bool causal, float scale, bool deterministic) -> (Tensor out, Tensor lse)",
    fake=varlen_outputs_like,
    backward=backward_op(
        "memory_attention_varlen_backward",
        _memory_attention_varlen_bwd,
        f"(Tensor grad_out, Tensor? grad_lse, {_VARLEN_INPUTS}, Tensor out, Tensor lse, bool causal, float scale, "
        f"bool deterministic) -> ({ATTENTION_GRADS})",
        grads=DIFFERENTIABLE,
    ),
)


def memory_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None, *,
    causal: bool = False, scale: float | None = None, mem_bias: torch.Tensor | None = None,
    return_lse: bool = False, deterministic: bool = False,
):  # fmt: skip
    """:func:`memory_attention` over a packed batch of S sequences, in FlashAttention's varlen layout.

    Sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of q and ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]``
    of k and v; it attends over [its memory ; its own keys] only. The call matches
    ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=...,
    softmax_scale=...)`` plus the memory arguments.

    Args:
        q: (total_q, H, D) fp16, bf16 or fp32; k, v: (total_k, Hkv, D), H a multiple of Hkv.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32, from 0, non-decreasing, ending at total_q / total_k.
            A sequence may be empty (length 0).
        max_seqlen_q, max_seqlen_k: Python ints >= every length (checked, with the boundaries, by one host
            sync outside torch.compile). The kernels do not need them: their grid comes from the shapes.
        mem_k, mem_v: per sequence (S, Hkv, M, D), or shared by every sequence (Hkv, M, D) (its grads are
            summed over the sequences). Memory is visible to every query of its own sequence.
        causal: bottom-right aligned within each sequence (query i of a sequence with n queries and nk keys
            sees its keys j <= i + nk - n); memory rows stay visible.
        scale: logit scale, default D ** -0.5.
        mem_bias: additive logit bias per memory row, (M,), (Hkv, M) or (S, Hkv, M); differentiable.
        return_lse: also return the log-sum-exp, (H, total_q) fp32, as FlashAttention lays it out.
        deterministic: a batch-shared memory's grads summed over the batch in a fixed order instead of with
            atomics, so they are bit-identical across runs; also on under
            ``torch.use_deterministic_algorithms(True)`` (FlashAttention's flag). Every other grad is
            computed without atomics either way.

    Returns:
        out (total_q, H, D) in q.dtype, or (out, lse). A query with no visible key gets zeros (lse -inf).

    The Triton kernels map programs to (sequence, block) pairs: a program never computes rows of another
    sequence, and the grid covers the blocks the sequences need (plus at most S), not S x the longest.
    """
    op = "memory_attention_varlen"
    check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mem_k, mem_v, mem_bias, scale, op
    )
    check_bool(deterministic, "deterministic", op)
    if mem_k is not None and mem_k.shape[-2] == 0:
        mem_k = mem_v = mem_bias = None
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if attention_backend(q, "varlen-memory", k, v, mem_k, mem_v, mem_bias) == "reference":
        return reference.memory_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, mem_k, mem_v,
            causal=causal, scale=scale, mem_bias=mem_bias, return_lse=return_lse,
        )  # fmt: skip
    check_triton_head_dim(q, op)
    mem_bias = bias_3d(mem_bias) if mem_bias is not None else None
    record_launch("memory_attention.varlen")
    out, lse = _memory_attention_varlen_op(
        q, k, v, mem_k, mem_v, mem_bias, cu_seqlens_q, cu_seqlens_k, causal, scale, deterministic
    )
    return (out, lse) if return_lse else out
