"""RetentionKVCache: TRIM-KV's memory-bounded KV cache, shaped like the transformers ``Cache.update`` contract."""

from __future__ import annotations

import dataclasses

import torch

from memops import reference
from memops._backend import resolve_backend
from memops._validation import check_bool, check_int, check_layer_idx, writable


@dataclasses.dataclass
class _Layer:
    """One layer's rows: (B, Hkv, capacity, D) storage of which the first `length` rows are live."""

    keys: torch.Tensor
    values: torch.Tensor
    log_beta: torch.Tensor  # (B, Hkv, capacity) fp32
    positions: torch.Tensor  # (B, Hkv, capacity) int64: each row's original position
    length: int
    next_position: int

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def writable(self) -> _Layer:
        """This layer, with buffers made under torch.inference_mode replaced by normal copies when written
        outside it (the copies are fresh, so tensors returned earlier stay intact)."""
        buffers = [writable(t) for t in (self.keys, self.values, self.log_beta, self.positions)]
        return dataclasses.replace(self, keys=buffers[0], values=buffers[1], log_beta=buffers[2], positions=buffers[3])


class RetentionKVCache:
    """A KV cache that keeps, per layer, batch row and KV head, the ``budget`` most-retained tokens.

    ``update(key_states, value_states, layer_idx, log_beta)`` appends (B, Hkv, n, D) rows and their retention
    log_beta (B, Hkv, n) to layer ``layer_idx`` and returns (keys, values): the rows kept so far followed by
    the new rows, in order, which the current queries attend over. Then, if the layer holds at least
    ``budget + buffer`` rows, it keeps the ``budget`` rows of largest eviction score, in their original order
    (ties keep the older row; the official code's ``torch.topk`` breaks them arbitrarily). The score, with
    n the number of tokens the layer has seen and pos_j a row's original position (from 0):

    - ``score="official"`` (default): ``log_beta_j * (n + 1 - pos_j)``, as ngocbh/trimkv's
      ``TrimKVCache.compress`` (``q_idx = seen_tokens + 1``);
    - ``score="next_query"``: ``log_beta_j * (n - pos_j)``, the decay the next query (at position n) applies
      to the row, memops' earlier rule; one position nearer, so it can keep a different set.

    Compaction writes into fresh buffers, so tensors returned earlier are never changed; appends go in place
    into spare capacity after the live rows, which returned tensors do not cover.

    Positions count from 0 per layer and advance by n on each call, so a long prompt given in one update
    is attended in full, then compacted once. Decode attention over the returned rows is
    ``memops.memory_attention(q, keys, values)`` (N = 1, not causal).

    On CUDA (or under the Triton interpreter with backend "triton") the selection and the gather are Triton
    kernels; on backend "reference" they are ``torch.sort`` and ``torch.gather``.

    Every update is all or nothing: one that raises (bad input, NaN in log_beta) leaves the cache exactly
    as it was. Layer indices are ints >= 0 (negative ones raise IndexError; layers are stored sparsely, so
    any index costs only its own rows). A cache filled under ``torch.inference_mode`` keeps working outside
    it (its buffers are copied once on the first write there).

    Args:
        budget: tokens kept per (layer, batch row, KV head) after a compaction, >= 1.
        buffer: extra tokens accepted before compacting again, >= 0 (TRIM-KV: 128).
        score: ``"official"`` or ``"next_query"``, the eviction score's position (above).
        check_log_beta: reject an update whose log_beta has NaN before it changes anything (one reduction
            and a host sync per update). False skips it; NaN then surfaces at the next compaction, which
            raises and leaves the cache as before that update, NaN rows included.
    """

    SCORES = ("official", "next_query")

    def __init__(self, budget: int, buffer: int = 128, *, score: str = "official", check_log_beta: bool = True) -> None:
        check_int(budget, "budget", "RetentionKVCache", low=1)
        check_int(buffer, "buffer", "RetentionKVCache", low=0)
        if score not in self.SCORES:
            raise ValueError(f"RetentionKVCache: score must be one of {self.SCORES}, got {score!r}")
        self.budget, self.buffer, self.score = budget, buffer, score
        self.check_log_beta = check_bool(check_log_beta, "check_log_beta", "RetentionKVCache")
        self._layers: dict[int, _Layer] = {}

    def __len__(self) -> int:
        """The number of layers: one past the highest layer index updated (transformers' convention)."""
        return max(self._layers, default=-1) + 1

    def _layer(self, layer_idx: int, op: str) -> _Layer:
        check_layer_idx(layer_idx, f"RetentionKVCache.{op}")
        if layer_idx not in self._layers:
            raise IndexError(f"RetentionKVCache.{op}: layer {layer_idx} has no cached rows")
        return self._layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Rows held by ``layer_idx`` now (after any compaction); 0 for a layer never updated."""
        check_layer_idx(layer_idx, "RetentionKVCache.get_seq_length")
        layer = self._layers.get(layer_idx)
        return 0 if layer is None else layer.length

    def positions(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, L) int64: the original position of each row ``layer_idx`` holds."""
        layer = self._layer(layer_idx, "positions")
        return layer.positions[:, :, : layer.length]

    def log_beta(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, L) fp32: the retention of each row ``layer_idx`` holds."""
        layer = self._layer(layer_idx, "log_beta")
        return layer.log_beta[:, :, : layer.length]

    def memory_bytes(self) -> int:
        """Bytes of the buffers the cache holds (all layers; the allocated capacity, not only live rows)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self._layers.values()
            for t in (layer.keys, layer.values, layer.log_beta, layer.positions)
        )

    def _check(self, key_states, value_states, layer_idx, log_beta) -> None:
        check_layer_idx(layer_idx, "RetentionKVCache.update")
        for name, t in (("key_states", key_states), ("value_states", value_states), ("log_beta", log_beta)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RetentionKVCache.update: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"RetentionKVCache.update: {name} must be floating point, got {t.dtype}")
            if t.device != key_states.device:
                raise ValueError(
                    f"RetentionKVCache.update: {name} is on {t.device} but key_states is on {key_states.device}"
                )
        if key_states.dim() != 4:
            raise ValueError(
                f"RetentionKVCache.update: key_states must be (B, Hkv, n, D), got {tuple(key_states.shape)}"
            )
        if value_states.shape != key_states.shape or value_states.dtype != key_states.dtype:
            raise ValueError(
                f"RetentionKVCache.update: value_states must match key_states {tuple(key_states.shape)} "
                f"{key_states.dtype}, got {tuple(value_states.shape)} {value_states.dtype}"
            )
        if tuple(log_beta.shape) != tuple(key_states.shape[:3]):
            raise ValueError(
                f"RetentionKVCache.update: log_beta must be (B, Hkv, n) = {tuple(key_states.shape[:3])}, "
                f"got {tuple(log_beta.shape)}"
            )
        if layer_idx in self._layers:
            layer = self._layers[layer_idx]
            cached = (
                layer.keys.shape[0],
                layer.keys.shape[1],
                layer.keys.shape[3],
                layer.keys.dtype,
                layer.keys.device,
            )
            given = (key_states.shape[0], key_states.shape[1], key_states.shape[3], key_states.dtype, key_states.device)
            if cached != given:
                raise ValueError(
                    f"RetentionKVCache.update: layer {layer_idx} caches (B, Hkv, D, dtype, device) = {cached}, "
                    f"got {given}"
                )

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        log_beta: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, n, D) key/value rows with their log_beta (B, Hkv, n) to ``layer_idx``; return the
        (B, Hkv, L + n, D) keys and values to attend over; compact the layer when it is full (see class).
        Raises ValueError for NaN in log_beta (eviction by retention would be arbitrary), leaving the cache
        as it was."""
        self._check(key_states, value_states, layer_idx, log_beta)
        if self.check_log_beta and bool(torch.isnan(log_beta).any()):
            raise ValueError("RetentionKVCache.update: log_beta has NaN; eviction by retention would be arbitrary")
        B, Hkv, n, D = key_states.shape
        # Build the new state beside the committed one: rows go into spare capacity past the live rows (or
        # fresh buffers), and the layer entry is replaced only once everything, compaction included, is done.
        layer = self._layers.get(layer_idx)
        if layer is None:
            layer = self._allocate(key_states, max(n, self.budget + self.buffer), None)
        elif layer.length + n > layer.capacity:
            # Grow into fresh buffers: rows returned before stay where they are.
            grown = self._allocate(key_states, layer.length + n, layer)
            for old, new in (
                (layer.keys, grown.keys),
                (layer.values, grown.values),
                (layer.log_beta, grown.log_beta),
                (layer.positions, grown.positions),
            ):
                new[:, :, : layer.length] = old[:, :, : layer.length]
            layer = grown
        else:
            layer = layer.writable()
        rows = slice(layer.length, layer.length + n)
        layer.keys[:, :, rows] = key_states
        layer.values[:, :, rows] = value_states
        layer.log_beta[:, :, rows] = log_beta
        layer.positions[:, :, rows] = torch.arange(
            layer.next_position, layer.next_position + n, device=key_states.device
        )
        layer = dataclasses.replace(layer, length=layer.length + n, next_position=layer.next_position + n)
        keys, values = layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]
        if layer.length >= self.budget + self.buffer and layer.length > self.budget:
            layer = self._compact(layer)
        self._layers[layer_idx] = layer
        return keys, values

    def _allocate(self, like: torch.Tensor, capacity: int, layer: _Layer | None) -> _Layer:
        B, Hkv, _, D = like.shape
        return _Layer(
            keys=like.new_empty((B, Hkv, capacity, D)),
            values=like.new_empty((B, Hkv, capacity, D)),
            log_beta=like.new_empty((B, Hkv, capacity), dtype=torch.float32),
            positions=like.new_empty((B, Hkv, capacity), dtype=torch.int64),
            length=0 if layer is None else layer.length,
            next_position=0 if layer is None else layer.next_position,
        )

    def _compact(self, layer: _Layer) -> _Layer:
        compacted = self._allocate(layer.keys, self.budget + max(self.buffer, 1), layer)
        compacted.length = self.budget
        rows = (layer.keys, layer.values, layer.log_beta, layer.positions)
        # next_position is the number of tokens the layer has seen
        score_position = layer.next_position + 1 if self.score == "official" else layer.next_position
        evict(
            *(t[:, :, : layer.length] for t in rows),
            newest_position=layer.next_position - 1,
            budget=self.budget,
            score_position=score_position,
            out=(compacted.keys, compacted.values, compacted.log_beta, compacted.positions),
        )
        return compacted


def evict(
    keys: torch.Tensor, values: torch.Tensor, log_beta: torch.Tensor, positions: torch.Tensor, *,
    newest_position: int, budget: int, score_position: int | None = None, out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One TRIM-KV eviction step: per (batch, KV head), keep the ``budget`` rows of largest
    ``log_beta_j * (score_position - positions_j)`` (ties keep the older row), in their original order.
    ``score_position`` defaults to ``newest_position + 1``; RetentionKVCache's official score passes
    ``newest_position + 2`` (the tokens seen + 1).

    keys, values (B, Hkv, L, D); log_beta (B, Hkv, L) float; positions (B, Hkv, L) int64; budget <= L. The
    inputs are only read; each may be the first L rows of a larger contiguous (B, Hkv, capacity[, D]) buffer.
    Writes the kept rows into the first ``budget`` rows of ``out`` (four such buffers, of the inputs'
    dtypes) or of fresh tensors, and returns those four tensors.
    Raises ValueError for NaN in log_beta: eviction by retention would be arbitrary.
    """
    if bool(torch.isnan(log_beta).any()):
        raise ValueError("RetentionKVCache.update: log_beta has NaN; eviction by retention would be arbitrary")
    B, Hkv, L, D = keys.shape
    if not 1 <= budget <= L:
        raise ValueError(f"evict: budget must be in [1, L={L}], got {budget}")
    if out is None:
        out = (
            keys.new_empty((B, Hkv, budget, D)),
            values.new_empty((B, Hkv, budget, D)),
            log_beta.new_empty((B, Hkv, budget)),
            positions.new_empty((B, Hkv, budget)),
        )
    # the scoring functions take the newest position t and score at t + 1
    newest_position = newest_position if score_position is None else score_position - 1
    if resolve_backend(keys) == "reference":
        kept = reference.retention_keep(log_beta, positions, newest_position, budget)
        out[2][:, :, :budget] = log_beta.gather(2, kept)
        out[3][:, :, :budget] = positions.gather(2, kept)
        index = kept.unsqueeze(-1).expand(-1, -1, -1, D)
        out[0][:, :, :budget] = keys.gather(2, index)
        out[1][:, :, :budget] = values.gather(2, index)
        return out
    from memops.kernels import retention as retention_kernels

    rows = B * Hkv

    def flat(t: torch.Tensor) -> torch.Tensor:
        # (B, Hkv, L[, D]), a prefix of a contiguous buffer -> (B * Hkv, capacity, width) for the kernels
        width = t.shape[3] if t.dim() == 4 else 1
        if t.stride()[-1] != 1 or (width > 1 and t.stride(2) != width) or t.stride(0) != Hkv * t.stride(1):
            t = t.contiguous()
        return t.as_strided((rows, t.stride(1) // width, width), (t.stride(1), width, 1))

    flat_log_beta, flat_positions = flat(log_beta)[..., 0], flat(positions)[..., 0]
    kept = retention_kernels.retention_select(flat_log_beta, flat_positions, L, newest_position, budget)
    for source, target in zip((keys, values, log_beta, positions), out):
        retention_kernels.cache_gather(flat(source), kept, flat(target))
    return out
