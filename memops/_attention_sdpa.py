"""The platform's fused attention for the sequence part of composed memory attention.

torch's scaled-dot-product attention runs one of several fused kernels; their aten ops return the
log-sum-exp (LSE) that the composed path merges with the memory part, and their backward ops take the
output and LSE, so the backward can be handed the *merged* ones (which makes it return that part's exact
gradients). This module picks one op per call and wraps its forward and backward behind one signature:

======================  =====================================================  ================================
backend                 aten ops                                               used for
======================  =====================================================  ================================
``"cudnn"``             ``_scaled_dot_product_cudnn_attention(_backward)``     sm_90, bf16/fp16, D <= 128, not
                                                                               causal or N == Nk (its causal
                                                                               mask is top-left aligned)
``"flash"``             ``_scaled_dot_product_flash_attention(_backward)``     sm_80+, bf16/fp16, D <= 256;
                                                                               is_causal is bottom-right
                                                                               aligned (FlashAttention 2)
``"efficient"``         ``_scaled_dot_product_efficient_attention(_backward)`` fp32 (and 16-bit where the two
                                                                               above are off); not causal or
                                                                               N == Nk
``"cpu_flash"``         ``_scaled_dot_product_flash_attention_for_cpu``        CPU tensors; a causal N != Nk
                        ``(_backward)``                                        gets an explicit bottom-right
                                                                               additive mask
======================  =====================================================  ================================

Every op gets equal query and kv heads: the caller folds or expands GQA first. All take and return
(B, H, L, D); the LSE comes back (B, H, N) fp32 (cuDNN's (B, H, N, 1) and the efficient op's
(B, H, 32 * ceil(N / 32)) are viewed or sliced). Rows that see no key hold a placeholder LSE (FlashAttention 2
writes +inf, the CPU op 0): the merge masks them by position instead.
"""

from __future__ import annotations

import torch

SEQUENCE_BACKENDS = ("cudnn", "flash", "efficient", "cpu_flash")
_aten = torch.ops.aten


def _enabled(backend: str) -> bool:
    """The user's torch.backends.cuda switches (``sdpa_kernel`` contexts set them too)."""
    cuda = torch.backends.cuda
    return {
        "cudnn": cuda.cudnn_sdp_enabled,
        "flash": cuda.flash_sdp_enabled,
        "efficient": cuda.mem_efficient_sdp_enabled,
    }[backend]()


def sequence_backend(q: torch.Tensor, num_keys: int, *, causal: bool, arch: int | None) -> str | None:
    """The fused attention op for the sequence part (table above), or None when none fits. ``arch`` is the
    CUDA architecture (90 for H100/H200), None for CPU tensors."""
    D = q.shape[-1]
    square_or_full = not causal or q.shape[2] == num_keys
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.device.type != "cuda" or arch is None or D % 8:
        return None
    half = q.dtype in (torch.bfloat16, torch.float16)
    if half and arch >= 90 and D <= 128 and square_or_full and _enabled("cudnn"):
        return "cudnn"
    if half and arch >= 80 and D <= 256 and _enabled("flash"):
        return "flash"
    if q.dtype in (torch.bfloat16, torch.float16, torch.float32) and square_or_full and _enabled("efficient"):
        return "efficient"
    return None


def _bottom_right_mask(q: torch.Tensor, num_keys: int) -> torch.Tensor:
    N = q.shape[2]
    rows = torch.arange(N, device=q.device).unsqueeze(1)
    cols = torch.arange(num_keys, device=q.device).unsqueeze(0)
    return torch.zeros((N, num_keys), dtype=q.dtype, device=q.device).masked_fill(
        cols > rows + (num_keys - N), float("-inf")
    )


def _cpu_mask(q, k, causal):
    """(is_causal, attn_mask) for the CPU op: its is_causal is top-left aligned."""
    if causal and q.shape[2] != k.shape[2]:
        return False, _bottom_right_mask(q, k.shape[2])
    return causal, None


def sequence_fwd(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(out (B, H, N, D), lse (B, H, N) fp32 view, state): ``state`` holds the op's random-number
    tensors, which its backward takes (dropout is 0, so they carry no randomness)."""
    N = q.shape[2]
    if backend == "cpu_flash":
        is_causal, mask = _cpu_mask(q, k, causal)
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
        )
        return out, lse, []
    if backend == "flash":
        out, lse, _, _, _, _, rng_state, unused, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, [rng_state, unused]
    if backend == "cudnn":
        out, lse, _, _, _, _, seed, offset, _ = _aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return out, lse.reshape(lse.shape[0], lse.shape[1], N), [seed, offset]
    if backend == "efficient":
        out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        return out, lse.narrow(-1, 0, N), [seed, offset]
    raise ValueError(f"unknown sequence backend {backend!r}; expected one of {SEQUENCE_BACKENDS}")


def sequence_bwd(backend: str, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, state: list[torch.Tensor], *, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) of the sequence part, given the merged ``out`` (B, H, N, D) and ``lse`` (B, H, N)."""
    N, Nk = q.shape[2], k.shape[2]
    if backend != "cpu_flash":
        lse = lse.float().clone(memory_format=torch.contiguous_format)  # contiguous(): not on fake CUDA
    if backend == "cpu_flash":
        is_causal, mask = _cpu_mask(q, k, causal)
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale
        )
    if backend == "flash":
        return _aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, N, Nk, 0.0, causal, state[0], state[1], scale=scale
        )
    if backend == "cudnn":
        return _aten._scaled_dot_product_cudnn_attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse.unsqueeze(-1),
            state[0],
            state[1],
            None,
            None,
            None,
            N,
            Nk,
            0.0,
            causal,
            scale=scale,
        )
    if backend == "efficient":
        padded = torch.nn.functional.pad(lse, (0, -N % 32))  # the op's LSE rows are padded to 32
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            grad_out,
            q,
            k,
            v,
            None,
            out,
            padded,
            state[0],
            state[1],
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return dq, dk, dv
    raise ValueError(f"unknown sequence backend {backend!r}; expected one of {SEQUENCE_BACKENDS}")
