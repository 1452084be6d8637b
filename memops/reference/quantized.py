"""8-bit memory tables: the definition of memops.quantize_table / dequantize_table, and their CPU path.

A float table t (R, D) is stored as 8-bit ``data`` (R, D), float8_e4m3fn or int8, and one scale per row per
block of ``block_size`` columns, ``scales`` (R, ceil(D / block_size)) (block_size None: the whole row, (R, 1)).
The value it stands for is

    t[r, c] ~= data[r, c] * scale[r, c // block_size]

Each block's scale is the smallest of its format at which the block's absolute maximum a does not exceed the
8-bit format's largest value F (448 for e4m3, 127 for int8), so nothing saturates and no range is wasted:

    "fp32":  scale = a / F                                   (a = 0: scale 1)
    "e8m0":  scale = 2^e, e = ceil(log2(a / F)), stored as the byte e + 127 (the OCP MX scale vLLM reads;
             a = 0: the byte 127, scale 1)

and data = round(t / scale): to nearest even in e4m3 (relative error at most 2^-4 of the value, for values in
e4m3's normal range) or to the nearest integer in int8 (absolute error at most scale / 2). A power-of-two scale
divides exactly, so an e8m0 table's data is t's rounding alone.
"""

from __future__ import annotations

import torch

from memops.reference.value_embedding import _accumulator, mix_slots

FORMATS = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}  # each 8-bit dtype's largest value


def block_scales(table: torch.Tensor, block_size: int, dtype: torch.dtype, scale_format: str) -> torch.Tensor:
    """(R, ceil(D / block_size)) scales of the table's blocks: fp32, or e8m0 bytes (uint8)."""
    R, D = table.shape
    blocks = -(-D // block_size) if D else 0
    padded = torch.nn.functional.pad(table.detach().float().abs(), (0, blocks * block_size - D))
    amax = padded.view(R, blocks, block_size).amax(dim=2)
    ratio = amax / FORMATS[dtype]
    if scale_format == "fp32":
        return torch.where(amax > 0, ratio, torch.ones_like(ratio))
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # ceil(log2(ratio)), exact
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return (e + 127).clamp(0, 254).to(torch.uint8)


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales from stored ones (e8m0 bytes b -> 2^(b - 127))."""
    if scales.dtype == torch.uint8:
        return torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.to(torch.int32) - 127)
    return scales.float()


def expand_scales(scales: torch.Tensor, block_size: int, D: int) -> torch.Tensor:
    """(R, D) fp32: each column's scale."""
    return scale_values(scales).repeat_interleave(block_size, dim=1)[:, :D]


def quantize_table(table: torch.Tensor, dtype: torch.dtype, block_size: int, scale_format: str):
    """(data (R, D) in ``dtype``, scales) of a float (R, D) table (inputs checked by memops.quantize_table)."""
    scales = block_scales(table, block_size, dtype, scale_format)
    scaled = table.detach().float() / expand_scales(scales, block_size, table.shape[1])
    bound = FORMATS[dtype]
    scaled = scaled.clamp(-bound, bound)  # (an fp32 scale's division can land a hair above the bound)
    data = scaled.round().to(torch.int8) if dtype == torch.int8 else scaled.to(dtype)
    return data, scales


def dequantize_table(data: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """The fp32 (R, D) table data * scale stands for (exact in fp32 for e8m0 scales)."""
    return data.float() * expand_scales(scales, block_size, data.shape[1])


def weighted_gather(data, scales, block_size: int, indices, weights, out_dtype: torch.dtype) -> torch.Tensor:
    """memops.weighted_gather on an 8-bit table: out[t] = sum_k weights[t, k] * (data * scale)[indices[t, k]],
    only the picked rows dequantized (fp32, fp64 with fp64 weights); differentiable in weights. indices, weights
    (T, K) -> (T, D) in ``out_dtype``."""
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    T, K = indices.shape
    flat = indices.reshape(-1).long()
    rows = dequantize_table(data[flat], scales[flat], block_size).to(acc).view(T, K, -1)
    return torch.einsum("tk,tkd->td", weights.to(acc), rows).to(out_dtype)


def gather_rows(data, scales, block_size: int, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The 8-bit table's rows ``rows`` (..., c) dequantized and laid side by side: (..., c * D) in ``out_dtype``
    (an engram_lookup of the table: one row per hash head)."""
    flat = rows.reshape(-1).long()
    picked = dequantize_table(data[flat], scales[flat], block_size)
    return picked.view(*rows.shape[:-1], rows.shape[-1] * data.shape[1]).to(out_dtype)


def value_embedding_mix(v, gates, ids, data, scales, block_size: int) -> torch.Tensor:
    """memops.value_embedding_mix on an 8-bit bank (data (V, M * H * Dh)): only the ids' rows dequantized;
    differentiable in v and gates. (B, N, H, Dh) in v.dtype."""
    B, N = ids.shape
    M = gates.shape[-1] - 1
    flat = ids.reshape(-1).long()
    slots = dequantize_table(data[flat], scales[flat], block_size).view(B, N, M, -1)
    return mix_slots(v, gates, slots, _accumulator(v, gates))
