"""An 8-bit table as a module: the (data, scales) buffers of a memops.QuantizedTable, so a quantized layer's
state_dict saves and loads it (``<name>.data``, ``<name>.scales`` and the block size and source dtype)."""

from __future__ import annotations

import torch
from torch import nn

from memops.quantized import QuantizedTable


class QuantizedEmbedding(nn.Module):
    """Holds a :class:`memops.QuantizedTable` as buffers (``data`` (R, D) e4m3 / int8, ``scales``); ``table``
    gives the QuantizedTable the ops read. Made by a layer's ``quantize_()`` (inference); a checkpoint of a
    quantized layer loads into a layer quantized with the same format (its buffers take the saved ones)."""

    def __init__(self, qt: QuantizedTable) -> None:
        super().__init__()
        self.register_buffer("data", qt.data)
        self.register_buffer("scales", qt.scales)
        self.block_size, self.source_dtype = qt.block_size, qt.dtype

    @property
    def table(self) -> QuantizedTable:
        return QuantizedTable(self.data, self.scales, self.block_size, self.source_dtype)

    @property
    def weight(self):
        raise TypeError(
            "QuantizedEmbedding: the table is quantized (for inference) and has no float weight; read .table, or "
            ".table.dequantize()"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # A buffer's load copies across dtypes: uint8 e8m0 scales into fp32 ones (or int8 data into e4m3) would
        # load as wrong numbers, so another format is refused, naming both.
        for name in ("data", "scales"):
            saved, ours = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(saved, torch.Tensor) and saved.dtype != ours.dtype:
                error_msgs.append(
                    f"QuantizedEmbedding {prefix}{name}: the checkpoint holds {saved.dtype}, this layer {ours.dtype}; "
                    "quantize the layer with the checkpoint's dtype and scale_format before loading"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def get_extra_state(self) -> dict:
        return {"block_size": self.block_size, "dtype": str(self.source_dtype).removeprefix("torch.")}

    def set_extra_state(self, state: dict) -> None:
        self.block_size, self.source_dtype = int(state["block_size"]), getattr(torch, state["dtype"])

    def extra_repr(self) -> str:
        return repr(self.table)
