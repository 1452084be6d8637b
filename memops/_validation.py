"""Argument checks shared by the public ops, modules and caches: strict scalar types, layer indices,
inference-mode-safe cache buffers and the attention family's tensor checks. Every message names the op, the
argument and what was expected, and every check runs before anything launches or mutates."""

from __future__ import annotations

import math

import torch

from memops._tensors import can_read_values  # noqa: F401 (the ops import it from here with the checks)


def check_float_tensor(t, name: str, op: str, *, dims: int, layout: str, device_of=None) -> None:
    """A floating-point torch.Tensor (TypeError otherwise) of ``dims`` dims (ValueError, naming ``layout``, e.g.
    "(B, N, E)"), on the device of ``device_of`` = (its name, tensor) when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if device_of is not None and t.device != device_of[1].device:
        raise ValueError(f"{op}: {name} is on {t.device} but {device_of[0]} is on {device_of[1].device}")


def check_int(value, name: str, op: str, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in [low, high): TypeError for another type, ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value >= high):
        bounds = f">= {low}" if high is None else f"in [{0 if low is None else low}, {high})"
        raise ValueError(f"{op}: {name} must be {bounds}, got {value}")
    return value


def check_number(value, name: str, op: str, *, low: float | None = None, strictly: bool = False) -> float:
    """A finite real number (int or float, not a bool or a string), >= low (> low with strictly)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    if low is not None and (value <= low if strictly else value < low):
        raise ValueError(f"{op}: {name} must be {'>' if strictly else '>='} {low}, got {value!r}")
    return float(value)


def check_bool(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_layer_idx(layer_idx, op: str, n_layers: int | None = None) -> int:
    """A layer index: an int >= 0 (below n_layers when the cache has a fixed count). Negative indices are
    rejected everywhere rather than counted from the end, so a typo never reads another layer."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        raise TypeError(f"{op}: layer_idx must be an int, got {type(layer_idx).__name__}")
    if layer_idx < 0 or (n_layers is not None and layer_idx >= n_layers):
        expected = ">= 0" if n_layers is None else f"in [0, {n_layers})"
        raise IndexError(f"{op}: layer_idx must be {expected}, got {layer_idx}")
    return layer_idx


def writable(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer`` itself, or a normal copy when it was created under torch.inference_mode and is about to be
    written in place outside it (torch forbids that)."""
    if buffer.is_inference() and not torch.is_inference_mode_enabled():
        return buffer.clone()
    return buffer


def check_module_input(
    x, name: str, op: str, *, width: int, dims: tuple[int, ...] | None = None, like: torch.Tensor | None = None
) -> None:
    """A module's float input: a tensor with ``width`` features in its last dim (and ``dims`` dimensions
    when given), of ``like``'s dtype (a parameter's) unless autocast is on, and on its device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{op}: {name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{op}: {name} must have {width} features in its last dim, got shape {tuple(x.shape)}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{op}: {name} is on {x.device} but the module's parameters are on {like.device}")
        if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{op}: {name} is {x.dtype} but the module's parameters are {like.dtype} (cast the "
                "module or the input, or use autocast)"
            )


# ---------------------------------------------------------------------------------------------------------
# The attention family (memory, retention and looped attention)

TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_attention_inputs(q, k, v, mem_k, mem_v, mem_bias, scale, op="memory_attention", *, batch=None):
    """The attention family's tensor checks on padded (B, H, N, D) inputs; ``batch``: (name, size) of the
    memory's batch dim when it is not q's (the packed ops' S, checked on views of their inputs)."""
    named = [("q", q), ("k", k), ("v", v), ("mem_k", mem_k), ("mem_v", mem_v), ("mem_bias", mem_bias)]
    for name, t in named:
        if (t is not None or name in ("q", "k", "v")) and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, heads, length, D), got shape {_shape(t)}")
    B, H, N, D = q.shape
    batch_name, mem_batch = batch if batch is not None else ("B", B)
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
                f"{op}: mem_k must be ({batch_name}={mem_batch}, Hkv={Hkv}, M, D={D}) or shared (Hkv={Hkv}, M, D={D}), "
                f"got {_shape(mem_k)}"
            )
        expected = (mem_batch, Hkv) if mem_k.dim() == 4 else (Hkv,)
        if tuple(mem_k.shape[:-2]) != expected or mem_k.shape[-1] != D:
            raise ValueError(
                f"{op}: mem_k must be ({batch_name}={mem_batch}, Hkv={Hkv}, M, D={D}) or shared (Hkv={Hkv}, M, D={D}), "
                f"got {_shape(mem_k)}"
            )
        if mem_v.shape != mem_k.shape:
            raise ValueError(f"{op}: mem_v must have mem_k's shape {_shape(mem_k)}, got {_shape(mem_v)}")
    if mem_bias is not None:
        if mem_k is None:
            raise ValueError(f"{op}: mem_bias needs mem_k and mem_v")
        M = mem_k.shape[-2]
        if _shape(mem_bias) not in ((M,), (Hkv, M), (mem_batch, Hkv, M)):
            raise ValueError(
                f"{op}: mem_bias must be (M,), (Hkv, M) or ({batch_name}, Hkv, M) = ({M},), ({Hkv}, {M}) or "
                f"({mem_batch}, {Hkv}, {M}), got {_shape(mem_bias)}"
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


# ---------------------------------------------------------------------------------------------------------
# Packed (varlen) attention: FlashAttention's layout


def check_cu_seqlens(cu, name: str, total: int, max_seqlen, op: str, device, *, values: bool = True) -> None:
    """cu_seqlens: int32 (S + 1,) on q's device; with ``values``, also its values (:func:`check_cu_seqlens_values`,
    one host sync)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32 (FlashAttention's layout), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{op}: {name} must be (S + 1,) with S >= 1 sequences, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: {name} is on {cu.device} but q is on {device}")
    if values:
        check_cu_seqlens_values(cu, name, total, max_seqlen, op)


def check_cu_seqlens_values(cu, name: str, total: int, max_seqlen, op: str) -> None:
    """cu_seqlens' values (one host sync, skipped under torch.compile): starting at 0, non-decreasing, ending
    at total, no length above max_seqlen."""
    if not can_read_values(cu):
        # Under torch.compile max_seqlen is not touched at all: reading a Python int there guards on its
        # value, which would recompile for every new longest length (the kernels never need it).
        return
    max_name = "max_seqlen" + name[len("cu_seqlens") :]
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{op}: {max_name} must be an int, got {type(max_seqlen).__name__}")
    lengths = cu[1:] - cu[:-1]
    first, last, smallest, largest = torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or last != total or smallest < 0:
        shown = cu.tolist() if cu.numel() <= 16 else f"[{first}, ..., {last}]"
        raise ValueError(f"{op}: {name} must start at 0, not decrease and end at total = {total}, got {shown}")
    if largest > max_seqlen:
        raise ValueError(f"{op}: {max_name}={max_seqlen} is smaller than a sequence of length {largest} in {name}")


def check_varlen_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mem_k, mem_v, mem_bias, scale, op: str,
    *, shared: bool = False,
) -> int:  # fmt: skip
    """The packed attention ops' checks: q (total_q, H, D), k, v (total_k, Hkv, D), the cu_seqlens and
    max_seqlens, then the memory and bias (S in place of B) as :func:`check_attention_inputs` checks them.
    ``shared``: the op takes one ``cu_seqlens`` and ``max_seqlen`` for both (errors name those). Returns S."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            rows = "total_q, H" if name == "q" else "total_k, Hkv"
            raise ValueError(f"{op}: {name} must be 3-D ({rows}, D) (FlashAttention's varlen layout), got {_shape(t)}")
    if k.shape[2] != q.shape[2] or v.shape != k.shape:
        raise ValueError(f"{op}: k and v must both be (total_k, Hkv, D={q.shape[2]}), got {_shape(k)} and {_shape(v)}")
    # (name, boundaries, total rows, max_seqlen): one set for queries and keys in the looped ops, named as
    # the op names it
    if shared:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: k and q must hold the same total rows, got {k.shape[0]} and {q.shape[0]}")
        bounds = [("cu_seqlens", cu_seqlens_q, q.shape[0], max_seqlen_q)]
    else:
        bounds = [("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                  ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)]  # fmt: skip
    for name, cu, total, max_seqlen in bounds:
        check_cu_seqlens(cu, name, total, max_seqlen, op, q.device, values=False)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(
            f"{op}: cu_seqlens_q and cu_seqlens_k must hold the same S + 1 = {num_seqs + 1} entries, "
            f"got {cu_seqlens_k.shape[0]} for cu_seqlens_k"
        )
    # (1, heads, total, D) views: the padded checks then cover heads, head dim, dtypes and devices.
    rows = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    check_attention_inputs(*rows, mem_k, mem_v, mem_bias, scale, op=op, batch=("S", num_seqs))
    for name, cu, total, max_seqlen in bounds:  # last: the one host sync
        check_cu_seqlens_values(cu, name, total, max_seqlen, op)
    return num_seqs
