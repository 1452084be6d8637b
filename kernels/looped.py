"""Triton kernels for MELT's shared looped KV cache: the gated update of the cache rows a loop recomputes.

For each updated row (batch b, kv head h, new row i, cache row c = rows[i]) and channel d, with a gate g per
row (GATE_PER_CHANNEL False, shape (B, Hkv, n, 1)) or per channel (shape (B, Hkv, n, D)):

    forward   K'[b, h, c] = g * K[b, h, c] + (1 - g) * k_new[b, h, i]          (the same for V)
    backward  dK[b, h, c] = g * dK'[b, h, c];   dk_new[b, h, i] = (1 - g) * dK'[b, h, c]
              dg          = sum over d (per row) of (K - k_new) * dK' + (V - v_new) * dV'

Blends run in fp32 (fp64 for fp64) and round once to the cache dtype. Rows not updated pass through (the launchers copy
them, or leave them in place). The fused blend-and-attend forward lives in memops.kernels.attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator
from memops.kernels._launch import record_launch


@triton.jit
def _updated_rows(rows_ptr, row_offset, num_updates, n, Nk, BLOCK_R: tl.constexpr):
    """Flattened update ids r = (b * Hkv + h) * n + i of this program, their mask, the cache row offsets
    (b * Hkv + h) * Nk + c and the new-row offsets r."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = r < num_updates
    head = r // n
    i = r % n
    if rows_ptr is not None:  # the rows given; else rows row_offset + i
        c = tl.load(rows_ptr + i, mask=mask, other=0).to(tl.int64)
    else:
        c = row_offset + i
    return r, mask, head * Nk + c


@triton.jit
def _update_tile(
    gate_ptr, rows_ptr, num_updates, n, Nk, row_offset,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    GATE_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
):
    """This program's block of updated rows: ids r, row and element masks, cache and new-row element offsets
    (contiguous (.., D) rows), and the gate, (BLOCK_R, BLOCK_D) per channel or (BLOCK_R, 1) per row."""
    r, mask_r, cache_row = _updated_rows(rows_ptr, row_offset, num_updates, n, Nk, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d[None, :] < D)
    cache_offsets = cache_row[:, None] * D + offs_d[None, :]
    new_offsets = r[:, None] * D + offs_d[None, :]
    if GATE_PER_CHANNEL:
        g = tl.load(gate_ptr + new_offsets, mask=mask, other=0.0).to(ACC)
    else:
        g = tl.load(gate_ptr + r, mask=mask_r, other=0.0).to(ACC)[:, None]
    return r, mask_r, mask, cache_offsets, new_offsets, g


@triton.jit(do_not_specialize=["num_updates", "n", "Nk", "row_offset"])
def looped_update_fwd_kernel(
    k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, gate_ptr, rows_ptr, k_out_ptr, v_out_ptr,
    num_updates, n, Nk, row_offset,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    GATE_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
):
    r, mask_r, mask, cache_offsets, new_offsets, g = _update_tile(
        gate_ptr, rows_ptr, num_updates, n, Nk, row_offset, D, BLOCK_R, BLOCK_D, GATE_PER_CHANNEL, ACC)
    _blend(k_cache_ptr, k_new_ptr, k_out_ptr, cache_offsets, new_offsets, g, mask, ACC)
    _blend(v_cache_ptr, v_new_ptr, v_out_ptr, cache_offsets, new_offsets, g, mask, ACC)


@triton.jit
def _blend(cache_ptr, new_ptr, out_ptr, cache_offsets, new_offsets, g, mask, ACC: tl.constexpr):
    old = tl.load(cache_ptr + cache_offsets, mask=mask, other=0.0).to(ACC)
    new = tl.load(new_ptr + new_offsets, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + cache_offsets, (g * old + (1.0 - g) * new).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_updates", "n", "Nk", "row_offset"])
def looped_update_bwd_kernel(
    k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, gate_ptr, rows_ptr, grad_k_ptr, grad_v_ptr,
    grad_k_cache_ptr, grad_v_cache_ptr, grad_k_new_ptr, grad_v_new_ptr, grad_gate_ptr,
    num_updates, n, Nk, row_offset,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    GATE_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
):
    # One program per block of updated rows with the whole head dim, so a per-row gate's grad sums over D here.
    r, mask_r, mask, cache_offsets, new_offsets, g = _update_tile(
        gate_ptr, rows_ptr, num_updates, n, Nk, row_offset, D, BLOCK_R, BLOCK_D, GATE_PER_CHANNEL, ACC)
    grad_g = _blend_grad(k_cache_ptr, k_new_ptr, grad_k_ptr, grad_k_cache_ptr, grad_k_new_ptr, cache_offsets,
                         new_offsets, g, mask, ACC)
    grad_g += _blend_grad(v_cache_ptr, v_new_ptr, grad_v_ptr, grad_v_cache_ptr, grad_v_new_ptr, cache_offsets,
                          new_offsets, g, mask, ACC)
    if GATE_PER_CHANNEL:
        tl.store(grad_gate_ptr + new_offsets, grad_g.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_gate_ptr + r, tl.sum(grad_g, axis=1).to(grad_gate_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _blend_grad(cache_ptr, new_ptr, grad_ptr, grad_cache_ptr, grad_new_ptr, cache_offsets, new_offsets, g, mask,
                ACC: tl.constexpr):
    """Writes the cache and new-row grads of one of K, V; returns its (BLOCK_R, BLOCK_D) gate-grad terms."""
    grad = tl.load(grad_ptr + cache_offsets, mask=mask, other=0.0).to(ACC)
    old = tl.load(cache_ptr + cache_offsets, mask=mask, other=0.0).to(ACC)
    new = tl.load(new_ptr + new_offsets, mask=mask, other=0.0).to(ACC)
    tl.store(grad_cache_ptr + cache_offsets, (g * grad).to(grad_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_new_ptr + new_offsets, ((1.0 - g) * grad).to(grad_new_ptr.dtype.element_ty), mask=mask)
    return (old - new) * grad


def _launch_shape(num_updates: int, D: int):
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 4096 // block_d))
    return (triton.cdiv(num_updates, block_r),), block_r, block_d


def looped_update_fwd(k_cache, v_cache, k_new, v_new, gate, rows, row_offset, k_out, v_out) -> None:
    """Write the blended rows into k_out, v_out (which may be k_cache, v_cache: each row is read and written
    by one program). Caches (B, Hkv, Nk, D), new rows (B, Hkv, n, D), gate (B, Hkv, n, 1 or D), all
    contiguous; rows an int64 (n,) tensor of distinct cache rows, or None for rows row_offset + i."""
    B, Hkv, Nk, D = k_cache.shape
    n = k_new.shape[2]
    num_updates = B * Hkv * n
    if num_updates == 0:
        return
    grid, block_r, block_d = _launch_shape(num_updates, D)
    record_launch("looped_update_fwd_kernel")
    looped_update_fwd_kernel[grid](
        k_cache, v_cache, k_new, v_new, gate, rows, k_out, v_out,
        num_updates, n, Nk, row_offset, D=D, BLOCK_R=block_r, BLOCK_D=block_d,
        GATE_PER_CHANNEL=gate.shape[-1] != 1 or D == 1, ACC=accumulator(k_cache),
        num_warps=4,
    )


def looped_update_bwd(grad_k, grad_v, k_cache, v_cache, k_new, v_new, gate, rows, row_offset):
    """(dk_cache, dv_cache, dk_new, dv_new, dgate) for :func:`looped_update_fwd`'s out-of-place form, from the
    grads of the (B, Hkv, Nk, D) output caches (contiguous)."""
    B, Hkv, Nk, D = k_cache.shape
    n = k_new.shape[2]
    # Rows not updated pass their grad straight through; the kernel overwrites the updated ones.
    grad_k_cache, grad_v_cache = grad_k.clone(), grad_v.clone()
    grad_k_new, grad_v_new = torch.empty_like(k_new), torch.empty_like(v_new)
    grad_gate = torch.empty_like(gate)
    num_updates = B * Hkv * n
    if num_updates:
        grid, block_r, block_d = _launch_shape(num_updates, D)
        record_launch("looped_update_bwd_kernel")
        looped_update_bwd_kernel[grid](
            k_cache, v_cache, k_new, v_new, gate, rows, grad_k, grad_v,
            grad_k_cache, grad_v_cache, grad_k_new, grad_v_new, grad_gate,
            num_updates, n, Nk, row_offset, D=D, BLOCK_R=block_r, BLOCK_D=block_d,
            # 8 warps: at 4 the ten (BLOCK_R, BLOCK_D) fp32 tiles of K and V sat at 255 registers and spilled
            GATE_PER_CHANNEL=gate.shape[-1] != 1 or D == 1, ACC=accumulator(k_cache),
            num_warps=8,
        )
    return grad_k_cache, grad_v_cache, grad_k_new, grad_v_new, grad_gate
