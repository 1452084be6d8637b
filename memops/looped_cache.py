"""SharedLoopKVCache: MELT's decode-time KV cache, one per layer, shared by every loop of a looped transformer."""

from __future__ import annotations

import torch

from memops._validation import check_int, check_layer_idx, writable


class SharedLoopKVCache:
    """MELT's decode-time cache: one KV cache per layer, shared by every loop of a looped transformer.

    ``update(key_states, value_states, layer_idx, loop_idx, gate)`` with (B, Hkv, n, D) rows:
    - loop 0 appends the n rows (the step's new tokens) to the layer's cache;
    - loop r > 0 blends them into the last n rows in place, ``K = g * K + (1 - g) * k`` (and V), with the
      gate (B, Hkv, n, 1) per token and head or (B, Hkv, n, D) per channel (memops.looped_kv_update).
    It returns (keys, values) (B, Hkv, L, D), views of the layer's cache to attend over (e.g.
    ``memops.memory_attention(q, keys, values)`` at decode). Views share the cache's storage: a later
    update of the same layer changes them, as MELT's shared cache is meant to.

    Memory is one cache per layer whatever the number of loops (``memory_bytes``), where a per-loop cache
    (Ouro) holds one per loop. Storage grows by doubling, so appends are amortised O(n).
    """

    def __init__(self, n_layers: int) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"SharedLoopKVCache: n_layers must be an int >= 1, got {n_layers!r}")
        self.n_layers = n_layers
        self._keys: list[torch.Tensor | None] = [None] * n_layers
        self._values: list[torch.Tensor | None] = [None] * n_layers
        self._lengths = [0] * n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Rows layer ``layer_idx`` holds (0 before its first update)."""
        return self._lengths[check_layer_idx(layer_idx, "SharedLoopKVCache.get_seq_length", self.n_layers)]

    def memory_bytes(self) -> int:
        """Bytes of the key and value buffers of all layers (allocated capacity)."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values) if t is not None)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, loop_idx: int, gate: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        from memops.looped import check_update_inputs, looped_kv_update

        check_layer_idx(layer_idx, "SharedLoopKVCache.update", self.n_layers)
        check_int(loop_idx, "loop_idx", "SharedLoopKVCache.update", low=0)
        check_update_inputs(key_states, value_states, key_states, value_states, gate, "SharedLoopKVCache.update")
        B, Hkv, n, D = key_states.shape
        keys, length = self._keys[layer_idx], self._lengths[layer_idx]
        if keys is not None:
            cached = (keys.shape[0], keys.shape[1], keys.shape[3], keys.dtype, keys.device)
            given = (B, Hkv, D, key_states.dtype, key_states.device)
            if cached != given:
                raise ValueError(
                    f"SharedLoopKVCache.update: layer {layer_idx} caches (B, Hkv, D, dtype, device) = {cached}, "
                    f"got {given}"
                )
        if keys is not None:  # a cache filled under torch.inference_mode, written outside it: copy once
            self._keys[layer_idx], self._values[layer_idx] = writable(keys), writable(self._values[layer_idx])
        if loop_idx == 0:
            if keys is None or length + n > keys.shape[2]:
                self._grow(layer_idx, key_states, max(2 * length, length + n, 16))
            self._keys[layer_idx][:, :, length : length + n] = key_states
            self._values[layer_idx][:, :, length : length + n] = value_states
            self._lengths[layer_idx] = length = length + n
        else:
            if n > length:
                raise ValueError(
                    f"SharedLoopKVCache.update: loop {loop_idx} updates the last {n} rows but layer {layer_idx} holds "
                    f"{length}; loop 0 appends a step's rows first"
                )
            # The whole (contiguous) buffers, with the rows named: the in-place kernel addresses rows by pitch.
            looped_kv_update(
                self._keys[layer_idx],
                self._values[layer_idx],
                key_states,
                value_states,
                gate,
                rows=slice(length - n, length),
                inplace=True,
            )
        return self._keys[layer_idx][:, :, :length], self._values[layer_idx][:, :, :length]

    def _grow(self, layer_idx: int, like: torch.Tensor, capacity: int) -> None:
        B, Hkv, _, D = like.shape
        keys, values = like.new_empty((B, Hkv, capacity, D)), like.new_empty((B, Hkv, capacity, D))
        length = self._lengths[layer_idx]
        if length:
            keys[:, :, :length] = self._keys[layer_idx][:, :, :length]
            values[:, :, :length] = self._values[layer_idx][:, :, :length]
        self._keys[layer_idx], self._values[layer_idx] = keys, values
