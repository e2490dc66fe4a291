"""Several one-stream caches decoded together as one batch (`StreamBatch`): what the experiments use to compare
settings side by side at the cost of one forward."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .hf import StreamingCache, StubLayer


class StreamBatch(Cache):
    """Several one-stream caches decoded together as one batch, row i through `caches[i]`; the rows may differ in
    sinks and capacity (experiments compare settings side by side at the cost of one batched forward).

    Per step pass `position_ids=batch.position_ids()` and, when capacities differ, `attention_mask=
    batch.attention_mask()`. It concatenates the rows' keys every step (it allocates): an experiment driver, not the
    decode path the benchmarks time."""

    def __init__(self, caches: list):
        if not caches or not all(isinstance(c, StreamingCache) for c in caches):
            raise TypeError("StreamBatch takes a non-empty list of SinkCache / WindowCache")
        self.caches = caches
        layers = caches[0].layers
        if not layers:
            raise ValueError("StreamBatch needs caches built with config=")
        super().__init__(layers=[StubLayer() for _ in layers])
        self._planned = [None] * len(caches)

    def position_ids(self) -> torch.Tensor:
        """`[rows, 1]` positions for the next single-token step, each row from its own cache."""
        self._planned = [c.position_ids(1) for c in self.caches]
        return torch.cat(self._planned, dim=0)

    def attention_mask(self):
        """`[rows, keys]` bool mask for the next step when the rows hold different numbers of keys, else None."""
        lengths = [c.kv.attended(1) for c in self.caches]
        width = max(lengths)
        if min(lengths) == width:
            return None
        mask = torch.zeros(len(lengths), width, dtype=torch.bool)
        for row, n in enumerate(lengths):
            mask[row, :n] = True
        return mask.to(self.caches[0].kv._device() or "cpu")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        return max(c.kv.attended(query_length) for c in self.caches), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return max(c.kv.attended(1) for c in self.caches) - 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != len(self.caches) or key_states.shape[-2] != 1:
            raise ValueError(f"StreamBatch of {len(self.caches)} rows takes [rows, heads, 1, dim] keys")
        outs = [cache.kv.update(layer_idx, key_states[i:i + 1], value_states[i:i + 1], self._planned[i])
                for i, cache in enumerate(self.caches)]
        width = max(k.shape[-2] for k, _ in outs)
        keys = key_states.new_zeros(len(outs), key_states.shape[1], width, key_states.shape[-1])
        values = value_states.new_zeros(len(outs), value_states.shape[1], width, value_states.shape[-1])
        for i, (k, v) in enumerate(outs):
            keys[i, :, : k.shape[-2]] = k[0]
            values[i, :, : v.shape[-2]] = v[0]
        return keys, values
