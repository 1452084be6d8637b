"""Triton kernels for token-indexed value memory (MoVE's global bank, layer-wise value embeddings).

Bank E (V, M, H * Dh), head-major in its last dim; per token t (id x_t) and head h, gates g (H, M + 1):

value_embedding_mix_fwd_kernel, one program per (token, head), the M slots BLOCK_M at a time:

    v'[t, h, :] = g[t, h, 0] * v[t, h, :] + sum_{i=1..M} g[t, h, i] * E[x_t, i - 1, h * Dh : (h + 1) * Dh]

Each slot row is read once and mixed in registers (fp32, fp64 for fp64 inputs); no (tokens, M, ...) tensor is
written. The Dh columns of one head are contiguous, so a program's loads are BLOCK_M rows of Dh elements.
An 8-bit bank (memops.QuantizedTable of (V, M * H * Dh): e4m3 / int8 data and a scale per block of columns) is
read through ``table_rows``: E = data * scale in registers. Slot i of head h starts at column (i * H + h) * Dh,
so with a block size that divides Dh its scales start at column (i * H + h) * Dh / block and step (H * Dh) /
block per slot; with one scale per row (block >= M * H * Dh) every slot's scale is the row's.

value_embedding_mix_bwd_kernel, one program per (token, head): the v-side gradients,

    dv[t, h, :] = g[t, h, 0] * dv'[t, h, :],      dg[t, h, 0] = <v[t, h, :], dv'[t, h, :]>

The bank side is a weighted gather's backward: viewed as (V * M * H, Dh) rows, slot i of head h of token t is
row (x_t * M + i) * H + h, read with weight g[t, h, i + 1] into output row (t, h). So
``memops.kernels.product_key.weighted_gather_bwd`` gives dE (atomic adds, or the deterministic sorted segment
reduction) and dg[t, h, 1:] = <E row, dv'[t, h]> in one pass over dv'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memops.kernels._common import accumulator
from memops.kernels._launch import launch_arch, record_launch
from memops.kernels.product_key import table_args, table_rows, weighted_gather_bwd


@triton.jit
def value_embedding_mix_fwd_kernel(
    v_ptr, gates_ptr, ids_ptr, bank_ptr, out_ptr, H, M, Dh, stride_bank, scales_ptr, stride_scales, block_size,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, E8M0: tl.constexpr, FP8_BYTES: tl.constexpr,
):  # fmt: skip
    # v, gates and out contiguous: v / out (T, H, Dh), gates (T, H, M + 1); bank rows of stride_bank elements
    # (M * H * Dh when contiguous), slot i of head h at column i * H * Dh + h * Dh. scales_ptr None: a float
    # bank; else an 8-bit one with scale rows of stride_scales (block_size divides Dh, or one scale per row).
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    row = token * H + head  # (token, head) row of v, out and gates
    gate_row = gates_ptr + row * (M + 1)
    acc = tl.load(v_ptr + row * Dh + offs_d, mask=d_ok, other=0.0).to(ACC) * tl.load(gate_row).to(ACC)
    bank_id = tl.load(ids_ptr + token).to(tl.int64)
    # this head's slots as rows of H * Dh elements (and their scales, rows of H * Dh / block_size)
    slots = bank_ptr + bank_id * stride_bank + head * Dh
    if scales_ptr is not None:
        slot_scales = scales_ptr + bank_id * stride_scales + (head * Dh) // block_size
    else:
        slot_scales = scales_ptr
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        g = tl.load(gate_row + 1 + offs_m, mask=m_ok, other=0.0).to(ACC)
        tile = table_rows(slots, slot_scales, offs_m, offs_d, m_ok[:, None] & d_ok[None, :], H * Dh,
                          (H * Dh) // block_size, block_size, E8M0, FP8_BYTES, ACC)  # fmt: skip
        acc += tl.sum(g[:, None] * tile, axis=0)
    tl.store(out_ptr + row * Dh + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def value_embedding_mix_bwd_kernel(
    grad_out_ptr, v_ptr, gates_ptr, grad_v_ptr, grad_gates_ptr, M, Dh, BLOCK_D: tl.constexpr, ACC: tl.constexpr
):
    # All (T * H, ...) contiguous; grad_gates (T * H, M + 1): column 0 here, the others from the gather's grad.
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    dout = tl.load(grad_out_ptr + row * Dh + offs_d, mask=d_ok, other=0.0).to(ACC)
    if grad_v_ptr is not None:
        g0 = tl.load(gates_ptr + row * (M + 1)).to(ACC)
        tl.store(grad_v_ptr + row * Dh + offs_d, (g0 * dout).to(grad_v_ptr.dtype.element_ty), mask=d_ok)
    if grad_gates_ptr is not None:
        v = tl.load(v_ptr + row * Dh + offs_d, mask=d_ok, other=0.0).to(ACC)
        tl.store(grad_gates_ptr + row * (M + 1), tl.sum(v * dout, axis=0).to(grad_gates_ptr.dtype.element_ty))


def _fwd_config(M: int, Dh: int, device: torch.device) -> dict:
    block_d = triton.next_power_of_2(Dh)
    if launch_arch(device) is None:  # the interpreter: all slots in one step where they fit
        return dict(BLOCK_M=min(triton.next_power_of_2(M), 32), BLOCK_D=block_d, num_warps=4)
    # about 1,024 bank elements in flight per step: 8 slots of Dh = 128, 16 of 64
    return dict(BLOCK_M=max(1, min(triton.next_power_of_2(M), 1024 // block_d)), BLOCK_D=block_d, num_warps=4)


def value_embedding_mix_fwd(
    v: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, bank: torch.Tensor, *, scales: torch.Tensor | None = None,
    block_size: int = 1,
):  # fmt: skip
    """v' (B, N, H, Dh) in v.dtype. v, gates and ids contiguous; bank (V, M, H * Dh) with contiguous rows (any
    row stride). An 8-bit bank: bank its data (V, M * H * Dh) (e4m3 or int8, contiguous rows) and ``scales``
    (V, ceil(M * H * Dh / block_size)) with unit column stride, ``block_size`` dividing Dh or one scale per row."""
    B, N, H, Dh = v.shape
    M = gates.shape[-1] - 1
    out = torch.empty_like(v)
    if out.numel() == 0:
        return out
    cfg = _fwd_config(M, Dh, v.device)
    # (one scale per row: its block covers the row, so every slot's scale offsets are 0)
    table = table_args(bank, scales, block_size)
    acc = accumulator(v, gates, bank)
    record_launch("value_embedding_mix_fwd_kernel")
    value_embedding_mix_fwd_kernel[(B * N, H)](
        v, gates, ids, table["values_ptr"], out, H, M, Dh, table["stride_values"], table["scales_ptr"],
        table["stride_scales"], table["block_size"], E8M0=table["E8M0"], FP8_BYTES=table["FP8_BYTES"], ACC=acc,
        **cfg,
    )  # fmt: skip
    return out


def slot_rows(ids: torch.Tensor, M: int, H: int) -> torch.Tensor:
    """(T * H, M) int64: the bank row, in its (V * M * H, Dh) view, of slot i of head h of token t."""
    slots = torch.arange(M, device=ids.device).view(1, 1, M) * H + torch.arange(H, device=ids.device).view(1, H, 1)
    return (ids.reshape(-1, 1, 1).to(torch.int64) * (M * H) + slots).reshape(-1, M)


def value_embedding_mix_bwd(
    grad_out: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, bank: torch.Tensor, *,
    deterministic: bool, v_grad: bool = True, gates_grad: bool = True, bank_grad: bool = True,
    scales: torch.Tensor | None = None, block_size: int = 1,
):  # fmt: skip
    """(dv in v.dtype, dgates in gates.dtype, dbank (V, M, H * Dh) in bank.dtype); None where not asked.
    grad_out, v, gates, ids contiguous; bank contiguous. ``deterministic``: the bank grad by the sorted segment
    reduction (no atomics, the same bits every run). An 8-bit bank (``scales``, as for the forward; contiguous)
    gets no grad: dv and dgates only."""
    B, N, H, Dh = v.shape
    M = gates.shape[-1] - 1
    V = bank.shape[0]
    T = B * N
    if scales is not None and bank_grad:
        raise ValueError("value_embedding_mix_bwd: an 8-bit bank has no gradient")
    grad_v = torch.empty_like(v) if v_grad else None
    grad_gates = torch.empty_like(gates) if gates_grad else None
    if T * H == 0:
        grad_bank = torch.zeros_like(bank) if bank_grad else None
        return grad_v, grad_gates, grad_bank
    acc = accumulator(grad_out, v, gates, bank)
    if v_grad or gates_grad:
        record_launch("value_embedding_mix_bwd_kernel")
        value_embedding_mix_bwd_kernel[(T * H,)](
            grad_out, v, gates, grad_v, grad_gates, M, Dh, BLOCK_D=triton.next_power_of_2(Dh), ACC=acc, num_warps=4
        )
    grad_bank = None
    if bank_grad or gates_grad:
        rows = slot_rows(ids, M, H)
        slot_gates = gates.reshape(T * H, M + 1)[:, 1:].contiguous()
        if scales is not None and scales.shape[1] == 1 and M * H > 1:
            # one scale per bank row: each of its M * H (slot, head) rows of the (V * M * H, Dh) view takes it
            # (V * M * H scale entries, beside the V * M * H * Dh bytes of data)
            scales, block_size = scales.repeat_interleave(M * H, dim=0), Dh
        elif scales is not None:
            scales = scales.view(V * M * H, -1)
        grad_rows, grad_slot_gates = weighted_gather_bwd(
            grad_out.reshape(T * H, Dh), bank.view(V * M * H, Dh), rows, slot_gates,
            values_grad_algorithm="segment" if deterministic else "auto", values_grad=bank_grad,
            weights_grad=gates_grad, scales=scales, block_size=block_size,
        )  # fmt: skip
        if bank_grad:
            grad_bank = grad_rows.view(V, M, H * Dh)
        if gates_grad:
            grad_gates.view(T * H, M + 1)[:, 1:] = grad_slot_gates
    return grad_v, grad_gates, grad_bank
