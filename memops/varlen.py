"""Conversions between padded batches and FlashAttention's packed (varlen) layout.

A packed batch stores S sequences back to back: tokens (total, ...), with ``cu_seqlens`` (S + 1,) int32, where
sequence s is rows [cu_seqlens[s], cu_seqlens[s + 1]), and ``max_seqlen`` the longest length as a Python int.
The names and conventions follow ``flash_attn.bert_padding`` (``unpad_input`` / ``pad_input``) and
transformers' packed ``position_ids``, so code moves over by changing the import.

- :func:`unpad_input`: padded (B, L, ...) + attention_mask (B, L) -> packed rows, their flat indices,
  cu_seqlens, max_seqlen. Any mask layout works (left or right padding, holes); the kept tokens of each row
  stay in order.
- :func:`pad_input`: the inverse, zeros at the padding. Both are differentiable.
- :func:`cu_seqlens_from_position_ids` and :func:`position_ids_from_cu_seqlens`: packed ``position_ids``
  (a sequence starts wherever the position does not advance by 1: at every restart at 0, as transformers'
  packing writes them) to cu_seqlens and back.

The helpers that return ``max_seqlen`` read it off the device once (one host sync), as FlashAttention's do.
"""

from __future__ import annotations

import torch

from memops._validation import can_read_values, check_int

__all__ = [
    "unpad_input",
    "pad_input",
    "cu_seqlens_from_position_ids",
    "position_ids_from_cu_seqlens",
    "packed_positions",
]


def _check_tensor(name: str, value, *, integer: bool | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0)
    return out


def unpad_input(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(packed (total, ...), indices (total,) int64, cu_seqlens (B + 1,) int32, max_seqlen int).

    hidden_states: (B, L, ...) any dtype. attention_mask: (B, L) bool or 0/1 integers, nonzero at real tokens.
    ``packed[i] = hidden_states.flatten(0, 1)[indices[i]]``; row b's tokens are packed[cu_seqlens[b] :
    cu_seqlens[b + 1]], in order. A row with no token gives an empty sequence.
    """
    _check_tensor("hidden_states", hidden_states)
    _check_tensor("attention_mask", attention_mask)
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
    if hidden_states.dim() < 2 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"attention_mask must be (B, L) = {tuple(hidden_states.shape[:2])} for hidden_states (B, L, ...), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != hidden_states.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states on {hidden_states.device}")
    keep = attention_mask.bool()
    lengths = keep.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    packed = hidden_states.flatten(0, 1).index_select(0, indices)
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    return packed, indices, _cu_seqlens(lengths), max_seqlen


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(batch, seqlen, ...): the packed rows hidden_states (total, ...) put back at ``indices`` (total,) of the
    flattened (batch * seqlen) positions (from :func:`unpad_input`), zeros elsewhere."""
    _check_tensor("hidden_states", hidden_states)
    _check_tensor("indices", indices, integer=True)
    check_int(batch, "batch", "pad_input", low=0)
    check_int(seqlen, "seqlen", "pad_input", low=0)
    if indices.dim() != 1 or hidden_states.dim() < 1 or indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"indices must be (total,) with total = hidden_states.shape[0] = "
            f"{hidden_states.shape[0] if hidden_states.dim() else None}, got {tuple(indices.shape)}"
        )
    if indices.numel() and can_read_values(indices):
        if int(indices.min()) < 0 or int(indices.max()) >= batch * seqlen:
            raise IndexError(f"indices must lie in [0, batch * seqlen) = [0, {batch * seqlen})")
        if indices.unique().numel() != indices.numel():  # two rows to one position: one would be lost
            raise ValueError("indices must be distinct: each packed row goes to its own position")
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_copy(0, indices.long(), hidden_states)
    return out.unflatten(0, (batch, seqlen))


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens (S + 1,) int32, max_seqlen int) of packed position_ids (total,) or (1, total): a sequence
    starts at index 0 and wherever the position does not advance by 1 (transformers' packed position_ids
    restart at 0 for each sequence)."""
    _check_tensor("position_ids", position_ids, integer=True)
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be (total,) or (1, total), got {tuple(position_ids.shape)}")
    total = position_ids.numel()
    if total == 0:
        return torch.zeros(1, dtype=torch.int32, device=position_ids.device), 0
    starts = torch.ones(total, dtype=torch.bool, device=position_ids.device)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    first = torch.nonzero(starts).flatten()
    bounds = torch.cat([first, first.new_tensor([total])])
    lengths = bounds[1:] - bounds[:-1]
    return bounds.to(torch.int32), int(lengths.max().item())


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(total,) int64: each token's position within its sequence, for cu_seqlens (S + 1,) starting at 0 and
    non-decreasing (empty sequences allowed)."""
    _check_tensor("cu_seqlens", cu_seqlens, integer=True)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be (S + 1,), got {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.long()
    if int(bounds[0]) != 0 or bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {bounds.tolist()[:16]}")
    return packed_positions(cu_seqlens, int(bounds[-1]))


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 positions within each sequence, like :func:`position_ids_from_cu_seqlens` but with
    ``total`` (the packed rows, cu_seqlens[-1]) given, so nothing is read back: the modules' RoPE positions."""
    bounds = cu_seqlens.long()
    index = torch.arange(total, device=cu_seqlens.device)
    sequence = torch.searchsorted(bounds[1:], index, right=True).clamp_(max=max(bounds.shape[0] - 2, 0))
    return index - bounds[sequence]
