"""Token-indexed value memory: ``value_embedding_mix`` and its torch.library registration.

``value_embedding_mix`` -> ``memops::value_embedding_mix`` (custom op) -> ``memops.kernels.value_embedding`` on
backend "triton"; backend "reference" calls ``memops.reference.value_embedding`` directly (differentiable by
autograd). The math is in those files' headers.
"""

from __future__ import annotations

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._registration import backward_op, contiguous, custom_op
from memops._validation import can_read_values, check_bool
from memops.optim import ROW_SPARSE_EAGER, in_backward_optimizer, update_in_backward
from memops.quantized import QUANTIZED_NO_GRAD, QuantizedTable, check_float_table

_OP = "value_embedding_mix"


def _describe(t) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_value_embedding_inputs(v, gates, ids, bank) -> None:
    """The checks of value_embedding_mix's inputs (types, shapes, devices; an 8-bit bank's layout), raised in
    its name."""
    quantized = isinstance(bank, QuantizedTable)
    for name, t in (("v", v), ("gates", gates), ("ids", ids)) + ((("bank", bank),) if not quantized else ()):
        if not isinstance(t, torch.Tensor):
            extra = " (or a memops.QuantizedTable)" if name == "bank" else ""
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor{extra}, got {type(t).__name__}")
    if not quantized:
        check_float_table(bank, "bank", _OP)
    for name, t in (("v", v), ("gates", gates)) + ((("bank", bank),) if not quantized else ()):
        if not t.is_floating_point():
            raise TypeError(f"{_OP}: {name} must be floating point, got {_describe(t)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_OP}: ids must be int32 or int64, got {_describe(ids)}")
    if v.dim() != 4:
        raise ValueError(f"{_OP}: v must be (B, N, H, Dh), got shape {tuple(v.shape)}")
    B, N, H, Dh = v.shape
    if quantized:
        M = gates.shape[-1] - 1 if gates.dim() == 4 else -1
        if bank.shape[1] != M * H * Dh or M < 1:
            raise ValueError(
                f"{_OP}: a quantized bank must be (V, M * H * Dh) for gates (B, N, H, M + 1) and v of {H} heads of "
                f"{Dh} (quantize the bank's (V, M * H * Dh) view), got shape {tuple(bank.shape)} and gates of shape "
                f"{tuple(gates.shape)}"
            )
        if bank.scales.shape[1] > 1 and Dh % bank.block_size:
            raise ValueError(
                f"{_OP}: the quantized bank's block_size ({bank.block_size}) must divide the head dim Dh = {Dh} "
                "(each head's slice takes whole blocks), or the bank must have one scale per row (block_size=None)"
            )
    elif bank.dim() != 3 or bank.shape[2] != H * Dh:
        raise ValueError(
            f"{_OP}: bank must be (V, M, H * Dh) = (V, M, {H * Dh}) for v of {H} heads of {Dh}, got shape "
            f"{tuple(bank.shape)}"
        )
    M = gates.shape[-1] - 1 if quantized else bank.shape[1]
    if gates.shape != (B, N, H, M + 1):
        raise ValueError(
            f"{_OP}: gates must be (B, N, H, M + 1) = {(B, N, H, M + 1)} (one gate for v and one per bank slot), "
            f"got shape {tuple(gates.shape)}"
        )
    if ids.shape != (B, N):
        raise ValueError(f"{_OP}: ids must be (B, N) = {(B, N)}, got shape {tuple(ids.shape)}")
    for name, t in (("gates", gates), ("ids", ids), ("bank", bank)):
        if t.device != v.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but v is on {v.device}")


def check_id_range(ids: torch.Tensor, vocab: int) -> None:
    """IndexError unless every id lies in [0, vocab) (one reduction and a host sync)."""
    if ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one reduction and one host sync
    if low < 0 or high >= vocab:
        raise IndexError(f"{_OP}: ids must lie in [0, {vocab}) (the rows of bank), found values in [{low}, {high}]")


def _mix_fwd(v, gates, ids, bank, deterministic):
    from memops.kernels import value_embedding as value_embedding_kernels

    v, gates, ids, bank = contiguous(v, gates, ids, bank)
    return value_embedding_kernels.value_embedding_mix_fwd(v, gates, ids, bank)


def _mix_bwd(grad_out, v, gates, ids, bank, deterministic, v_grad, gates_grad, bank_grad):
    from memops.kernels import value_embedding as value_embedding_kernels

    grad_out, v, gates, ids, bank = contiguous(grad_out, v, gates, ids, bank)
    return value_embedding_kernels.value_embedding_mix_bwd(
        grad_out, v, gates, ids, bank, deterministic=deterministic, v_grad=v_grad, gates_grad=gates_grad,
        bank_grad=bank_grad,
    )  # fmt: skip


_mix_op = custom_op(
    "value_embedding_mix",
    _mix_fwd,
    "(Tensor v, Tensor gates, Tensor ids, Tensor bank, bool deterministic) -> Tensor out",
    fake=lambda v, gates, ids, bank, deterministic: torch.empty_like(v, memory_format=torch.contiguous_format),
    backward=backward_op(
        "value_embedding_mix_backward",
        _mix_bwd,
        "(Tensor grad_out, Tensor v, Tensor gates, Tensor ids, Tensor bank, bool deterministic, bool v_grad, "
        "bool gates_grad, bool bank_grad) -> (Tensor grad_v, Tensor grad_gates, Tensor grad_bank)",
        grads=("v", "gates", "bank"),
    ),
)


def _quantized_mix_fwd(v, gates, ids, data, scales, block_size):
    from memops.kernels import value_embedding as value_embedding_kernels

    v, gates, ids, data, scales = contiguous(v, gates, ids, data, scales)
    return value_embedding_kernels.value_embedding_mix_fwd(v, gates, ids, data, scales=scales, block_size=block_size)


def _quantized_mix_bwd(grad_out, v, gates, ids, data, scales, block_size, v_grad, gates_grad):
    from memops.kernels import value_embedding as value_embedding_kernels

    grad_out, v, gates, ids, data, scales = contiguous(grad_out, v, gates, ids, data, scales)
    grad_v, grad_gates, _ = value_embedding_kernels.value_embedding_mix_bwd(
        grad_out, v, gates, ids, data, deterministic=False, v_grad=v_grad, gates_grad=gates_grad, bank_grad=False,
        scales=scales, block_size=block_size,
    )  # fmt: skip
    return grad_v, grad_gates


# An 8-bit bank's mix: for inference, so the bank gets no gradient (v and the gates still do).
_quantized_mix_op = custom_op(
    "value_embedding_mix_quantized",
    _quantized_mix_fwd,
    "(Tensor v, Tensor gates, Tensor ids, Tensor data, Tensor scales, int block_size) -> Tensor out",
    fake=lambda v, gates, ids, data, scales, block_size: torch.empty_like(v, memory_format=torch.contiguous_format),
    backward=backward_op(
        "value_embedding_mix_quantized_backward",
        _quantized_mix_bwd,
        "(Tensor grad_out, Tensor v, Tensor gates, Tensor ids, Tensor data, Tensor scales, int block_size, "
        "bool v_grad, bool gates_grad) -> (Tensor grad_v, Tensor grad_gates)",
        grads=("v", "gates"),
    ),
)


def value_embedding_mix(
    v: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, bank: torch.Tensor | QuantizedTable, *,
    check_ids: bool = True, deterministic: bool = False, sparse: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Mix a token-indexed bank of value embeddings into attention values (MoVE; layer-wise value embeddings):
    ``v'[b, n, h] = gates[b, n, h, 0] * v[b, n, h] + sum_i gates[b, n, h, i] * bank[ids[b, n], i - 1, h]``.

    Args:
        v: (B, N, H, Dh) the layer's values, fp32, bf16, fp16 or fp64 (the (B, N, H, Dh) view of the value
            projection; transpose to SDPA's (B, H, N, Dh) afterwards).
        gates: (B, N, H, M + 1) already activated (MoVE's ``2 * sigmoid(W_G h)``), any float dtype; gate 0
            scales v, gate i slot i - 1.
        ids: (B, N) int32 or int64 token ids in [0, V).
        bank: (V, M, H * Dh) the bank, head-major in its last dim (column h * Dh + j is head h's channel j).
            Shared by every layer that calls this: autograd sums their bank grads. Or, for inference, a
            :class:`memops.QuantizedTable` of the bank's (V, M * H * Dh) view (``quantize_table(bank.flatten(1))``)
            whose block size divides Dh, or with one scale per row: its 8-bit rows are dequantized in registers
            and it gets no gradient (v and gates still do).
        check_ids: raise IndexError for an id outside [0, V) (one min/max reduction and a host sync per call).
            With False, an out-of-range id reads out of bounds on the Triton path.
        deterministic: the bank grad by a sorted segment reduction with no atomics, bit-identical across runs;
            also on under ``torch.use_deterministic_algorithms(True)``.
        sparse: give ``bank`` a ``torch.sparse_coo`` grad instead (one (M, H * Dh) row per token, uncoalesced,
            as ``nn.Embedding(sparse=True)``'s) for the row-sparse optimizers of ``memops.optim``; eager mode. A
            bank given to :func:`memops.optim.apply_optimizer_in_backward` gets no grad at all: the backward hands
            its optimizer the ids and those rows.

    Returns:
        (B, N, H, Dh) in v.dtype, accumulated in fp32 (fp64 when an input is fp64). One kernel reads each
        token's M slot rows once and mixes them in registers.

    Backward gives grads to ``v``, ``gates`` and ``bank`` (dense (V, M, H * Dh), non-zero only on the rows of
    the ids read).
    """
    check_value_embedding_inputs(v, gates, ids, bank)
    check_bool(check_ids, "check_ids", _OP)
    check_bool(deterministic, "deterministic", _OP)
    check_bool(sparse, "sparse", _OP)
    if check_ids and can_read_values(ids):
        check_id_range(ids, bank.shape[0])
    if isinstance(bank, QuantizedTable):
        if sparse:
            raise TypeError(QUANTIZED_NO_GRAD.format(op=_OP, what="sparse=True asks for its gradient"))
        if resolve_backend(v) == "reference":
            return reference.quantized.value_embedding_mix(v, gates, ids, bank.data, bank.scales, bank.block_size)
        return _quantized_mix_op(v, gates, ids, bank.data, bank.scales, bank.block_size)
    fused = in_backward_optimizer(bank) is not None
    if sparse or fused:
        return row_sparse_mix(v, gates, ids, bank, fused)
    if resolve_backend(v) == "reference":
        return reference.value_embedding_mix(v, gates, ids, bank)
    return _mix_op(v, gates, ids, bank, bool(deterministic))


@torch.compiler.disable(reason=ROW_SPARSE_EAGER)
def row_sparse_mix(v, gates, ids, bank, fused: bool, row_ids: torch.Tensor | None = None):
    """value_embedding_mix (inputs checked) with a sparse_coo bank grad, or (``fused``) the bank's rows handed
    to its in-backward optimizer. ``row_ids`` (B, N): the bank row each token's grad belongs to, -1 for none
    (a sharded bank's other ranks' ids); default ``ids``."""
    return _SparseBankGrad.apply(v, gates, ids, bank, fused, ids if row_ids is None else row_ids)


class _SparseBankGrad(torch.autograd.Function):
    """value_embedding_mix with a sparse_coo bank grad: per token its (M, H * Dh) row of g[t, h, i] * dv'[t, h]
    (uncoalesced), or (``fused``) those rows handed to the bank's in-backward optimizer. The v and gate grads
    from the backward kernels (bank grad off) or the reference formulas."""

    @staticmethod
    def forward(ctx, v, gates, ids, bank, fused, row_ids):
        ctx.save_for_backward(v, gates, ids, bank, row_ids)
        ctx.backend = resolve_backend(v)
        ctx.table = bank if fused else None  # (the leaf parameter itself: the optimizer's key)
        if ctx.backend == "reference":
            return reference.value_embedding_mix(v, gates, ids, bank.detach())
        return _mix_op(v, gates, ids, bank.detach(), False)

    @staticmethod
    def backward(ctx, grad_out):
        v, gates, ids, bank, row_ids = ctx.saved_tensors
        B, N, H, Dh = v.shape
        V, M = bank.shape[0], bank.shape[1]
        acc = reference.value_embedding._accumulator(v, gates, bank, grad_out)
        if ctx.backend == "reference":
            g, dout = gates.to(acc), grad_out.to(acc)
            rows = bank.detach()[ids].to(acc).view(B, N, M, H, Dh)
            grad_v = (g[..., :1] * dout).to(v.dtype)
            grad_gates = torch.cat([(v.to(acc) * dout).sum(-1, keepdim=True),
                                    torch.einsum("bnmhd,bnhd->bnhm", rows, dout)], dim=-1).to(gates.dtype)  # fmt: skip
        else:
            grad_v, grad_gates, _ = _mix_bwd(grad_out, v, gates, ids, bank, False, ctx.needs_input_grad[0],
                                             ctx.needs_input_grad[1], False)  # fmt: skip
        # each token's (M, H * Dh) bank row: slot i, head h holds g[t, h, i + 1] * dv'[t, h]
        entries = torch.einsum("bnhm,bnhd->bnmhd", gates[..., 1:].to(acc), grad_out.to(acc))
        entries = entries.reshape(B * N, M * H * Dh).to(bank.dtype)
        token_ids = row_ids.reshape(-1).to(torch.int64)
        if ctx.table is not None:
            update_in_backward(ctx.table, token_ids, entries)  # (rows of -1 are skipped)
            grad_bank = None
        else:
            if not torch.equal(row_ids, ids):  # the tokens whose grad belongs to no row of this bank are dropped
                kept = (token_ids >= 0).nonzero().squeeze(1)
                token_ids, entries = token_ids[kept], entries[kept]
            grad_bank = torch.sparse_coo_tensor(
                token_ids.unsqueeze(0), entries.view(B * N, M, H * Dh), (V, M, H * Dh), check_invariants=False
            )  # fmt: skip  (the ids were checked)
        return grad_v, grad_gates, None, grad_bank, None, None
