"""8-bit memory tables for inference: ``quantize_table``, ``dequantize_table`` and ``QuantizedTable``.

The math (formats, scales, the error bound) is in memops/reference/quantized.py. The table-reading ops take a
``QuantizedTable`` where they take a float table and dequantize its rows in registers.
"""

from __future__ import annotations

import torch

from memops.reference import quantized as reference_quantized

SCALE_FORMATS = ("e8m0", "fp32")
QUANTIZED_NO_GRAD = (
    "{op}: the table is quantized (a memops.QuantizedTable) and {what}; quantized tables are for inference: "
    "train in bf16 / fp32 and quantize after (memops.quantize_table)"
)


class QuantizedTable:
    """An (R, D) table stored in 8 bits: ``data`` (R, D) float8_e4m3fn or int8 and ``scales``
    (R, ceil(D / block_size)), uint8 e8m0 exponents (scale 2^(byte - 127)) or fp32; it stands for
    ``data * scale`` per block of ``block_size`` columns. ``dtype`` is the float dtype the table was quantized
    from (the ops' default output dtype). For inference: the ops give no gradient with respect to it.

    ``state_dict()`` / ``QuantizedTable.from_state_dict(state)`` hold tensors and plain values only
    (``torch.load(weights_only=True)`` reads them).
    """

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, block_size: int, dtype: torch.dtype) -> None:
        if data.dtype not in reference_quantized.FORMATS or data.dim() != 2:
            raise TypeError(f"QuantizedTable: data must be (R, D) float8_e4m3fn or int8, got {data.dtype} "
                            f"{tuple(data.shape)}")  # fmt: skip
        blocks = -(-data.shape[1] // block_size) if data.shape[1] else 0
        if scales.dtype not in (torch.uint8, torch.float32) or scales.shape != (data.shape[0], blocks):
            raise ValueError(
                f"QuantizedTable: scales must be uint8 (e8m0) or float32 of shape {(data.shape[0], blocks)}, got "
                f"{scales.dtype} {tuple(scales.shape)}"
            )
        if scales.device != data.device:
            raise ValueError(f"QuantizedTable: scales are on {scales.device} but data is on {data.device}")
        self.data, self.scales, self.block_size, self.dtype = data, scales, int(block_size), dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def scale_format(self) -> str:
        return "e8m0" if self.scales.dtype == torch.uint8 else "fp32"

    def to(self, device) -> QuantizedTable:
        """The same table on ``device``."""
        return QuantizedTable(self.data.to(device), self.scales.to(device), self.block_size, self.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (R, D) table it stands for, in ``dtype`` (float32, the default, holds it exactly for e8m0)."""
        return reference_quantized.dequantize_table(self.data, self.scales, self.block_size).to(dtype)

    def requires_grad_(self, requires_grad: bool = True) -> QuantizedTable:
        if requires_grad:
            raise TypeError(QUANTIZED_NO_GRAD.format(op="QuantizedTable.requires_grad_", what="a gradient was asked"))
        return self

    def nbytes(self) -> int:
        """Bytes of data and scales."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def state_dict(self) -> dict:
        return {"data": self.data, "scales": self.scales, "block_size": self.block_size,
                "dtype": str(self.dtype).removeprefix("torch.")}  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict) -> QuantizedTable:
        return cls(state["data"], state["scales"], state["block_size"], getattr(torch, state["dtype"]))

    def __repr__(self) -> str:
        R, D = self.shape
        return (
            f"QuantizedTable(rows={R}, dim={D}, {str(self.data.dtype).removeprefix('torch.')}, "
            f"{self.scale_format} scales per {self.block_size} columns, from {str(self.dtype).removeprefix('torch.')}, "
            f"{self.nbytes() / 2**20:.2f} MiB on {self.device})"
        )


def check_float_table(table: torch.Tensor, name: str, op: str) -> None:
    """TypeError for a bare 8-bit tensor where an op reads a float table as it is: without its scales its
    values mean nothing (pass the QuantizedTable of memops.quantize_table)."""
    if table.dtype in reference_quantized.FORMATS:
        raise TypeError(
            f"{op}: {name} is a bare {table.dtype} tensor; an 8-bit table is read with its scales: pass the "
            "memops.QuantizedTable that memops.quantize_table returns"
        )


def quantize_table(
    table: torch.Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn, block_size: int | None = 128,
    scale_format: str = "e8m0",
) -> QuantizedTable:  # fmt: skip
    """An (R, D) float table in 8 bits with one scale per row per block of ``block_size`` columns.

    Args:
        table: (R, D) fp32, bf16, fp16 or fp64 (a module's weight; no gradient is kept).
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.int8``.
        block_size: columns per scale (the last block may be shorter); None: one scale per row.
        scale_format: ``"e8m0"`` (a power of two stored as a uint8 biased exponent, the OCP MX layout) or
            ``"fp32"``.

    Returns:
        A :class:`QuantizedTable` on the table's device. ``dequantize_table`` of it is within e4m3's relative
        rounding (2^-4) or int8's absolute scale / 2 of ``table`` per element.
    """
    op = "quantize_table"
    if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() != 2:
        got = f"{table.dtype} {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise TypeError(f"{op}: table must be a floating-point (R, D) tensor, got {got}")
    if dtype not in reference_quantized.FORMATS:
        raise TypeError(f"{op}: dtype must be torch.float8_e4m3fn or torch.int8, got {dtype}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"{op}: scale_format must be 'e8m0' or 'fp32', got {scale_format!r}")
    if block_size is None:
        block_size = max(table.shape[1], 1)
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be an int >= 1 or None (one scale per row), got {block_size!r}")
    if not torch.isfinite(table).all():
        raise ValueError(f"{op}: table has NaN or infinite values; they have no 8-bit form")
    data, scales = reference_quantized.quantize_table(table, dtype, block_size, scale_format)
    return QuantizedTable(data, scales, block_size, table.dtype)


def dequantize_table(qt: QuantizedTable, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (R, D) float table ``qt`` stands for (data * scale), in ``dtype`` (float32: exact for e8m0)."""
    if not isinstance(qt, QuantizedTable):
        raise TypeError(f"dequantize_table: qt must be a memops.QuantizedTable, got {type(qt).__name__}")
    return qt.dequantize(dtype)
