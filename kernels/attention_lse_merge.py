"""Triton kernel that merges two partial attentions by their log-sum-exps.

Attention over the union of two key sets A and B (memory rows and sequence keys) is two attentions, each
with its own softmax, merged exactly (FlashAttention's split-KV, torch's context-parallel attention, vLLM's
cascade attention and FlashInfer's merge_state do the same). Per query row, with natural-log LSEs of the
scaled logits:

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

A part that saw no key has weight 0 whatever its out and lse hold: its lse may be -inf, +inf (FlashAttention
2 marks empty rows so) or a placeholder (torch's CPU flash op writes 0), so the launcher names the rows where
part a saw no key (the first ``empty_a_rows`` rows: causal attention with more queries than keys). A row where
neither part saw a key gets out 0 and lse -inf, as the fused kernel gives. A part that did see keys passes on
what the fused kernel would give: an lse of NaN (a NaN logit) makes the row's out and lse NaN, an lse of +inf
(an inf logit) makes its out NaN and its lse +inf. Computed in fp32 (fp64 for fp64 inputs); out is written
in out_a's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._launch import launch_arch, record_launch


@triton.jit
def _part_weight_log(lse, empty):
    # the log-weight the merge uses: -inf for a part with no key (its weight exp(lse - m) is exactly 0) and for
    # a NaN or +inf lse, which the row's flags below carry instead
    return tl.where(empty | (lse != lse) | (lse == float("inf")), float("-inf"), lse)


@triton.jit
def lse_merge_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr,
    stride_ab, stride_ah, stride_an, stride_lab, stride_lah, stride_lan,
    stride_bb, stride_bh, stride_bn, stride_lbb, stride_lbh, stride_lbn,
    stride_ob, stride_oh, stride_on,
    H, N, empty_a_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_a = tl.load(lse_a_ptr + b * stride_lab + h * stride_lah + offs_n * stride_lan, mask=row_ok,
                    other=float("-inf")).to(ACC)
    lse_b = tl.load(lse_b_ptr + b * stride_lbb + h * stride_lbh + offs_n * stride_lbn, mask=row_ok,
                    other=float("-inf")).to(ACC)
    empty_a = offs_n < empty_a_rows
    nan_row = ((lse_a != lse_a) & ~empty_a) | (lse_b != lse_b)
    inf_row = ((lse_a == float("inf")) & ~empty_a) | (lse_b == float("inf"))
    lse_a = _part_weight_log(lse_a, empty_a)
    lse_b = _part_weight_log(lse_b, offs_n < 0)
    m = tl.maximum(lse_a, lse_b)
    m = tl.where(m == float("-inf"), 0.0, m)  # both parts empty: keep exp() away from -inf - -inf
    w_a = tl.exp(lse_a - m)
    w_b = tl.exp(lse_b - m)
    total = w_a + w_b
    has_key = total > 0
    inv = tl.where(has_key, 1.0 / tl.where(has_key, total, 1.0), 0.0)
    out_a = tl.load(out_a_ptr + b * stride_ab + h * stride_ah + offs_n[:, None] * stride_an + offs_d[None, :],
                    mask=tile_ok, other=0.0).to(ACC)
    out_b = tl.load(out_b_ptr + b * stride_bb + h * stride_bh + offs_n[:, None] * stride_bn + offs_d[None, :],
                    mask=tile_ok, other=0.0).to(ACC)
    # where() rather than a product: an empty part's out may be NaN, and 0 * NaN is NaN. A NaN or +inf row
    # gets NaN through its per-row factor (a 1-D select; a select over the tile cost ~20 registers).
    bad = nan_row | inf_row
    merged = tl.where((bad | (w_a > 0))[:, None], out_a * tl.where(bad, float("nan"), w_a * inv)[:, None], 0.0)
    merged += tl.where((w_b > 0)[:, None], out_b * (w_b * inv)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :],
             merged.to(out_ptr.dtype.element_ty), mask=tile_ok)
    lse = tl.where(has_key, m + tl.log(tl.where(has_key, total, 1.0)), float("-inf"))
    lse = tl.where(nan_row, float("nan"), tl.where(inf_row, float("inf"), lse))
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_n, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)


def _rows3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def lse_merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
              empty_a_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, H, N, D) contiguous in out_a's dtype, lse (B, H, N) fp32 (fp64 for fp64).

    out_a, out_b (B, H, N, D) with unit last stride and lse_a, lse_b (B, H, N), any other strides (a vendor
    op's (B, N, H) layouts read in place); rows n < empty_a_rows saw no key of part a.
    """
    B, H, N, D = out_a.shape
    fp64 = out_a.dtype == torch.float64
    out = torch.empty((B, H, N, D), dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty((B, H, N), dtype=torch.float64 if fp64 else torch.float32, device=out_a.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    block_n = 64 if launch_arch(out_a.device) is not None else 32
    record_launch("lse_merge_kernel")
    lse_merge_kernel[(triton.cdiv(N, block_n), B * H)](
        out_a, lse_a, out_b, lse_b, out, lse,
        *_rows3(out_a), *lse_a.stride(), *_rows3(out_b), *lse_b.stride(),
        *_rows3(out), H, N, empty_a_rows,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(max(D, 1)), BLOCK_N=block_n,
        ACC=tl.float64 if fp64 else tl.float32, num_warps=4,
    )
    return out, lse
