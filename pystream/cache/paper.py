"""The paper's own cache implementation, kept as a benchmark baseline (`PaperCache`)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .hf import StubLayer, check_supported, rotary_spec


class PaperCache(Cache):
    """StreamingLLM the way the paper's code (and transformers' removed SinkCache) runs it, kept as a benchmark
    baseline: keys are stored un-rotated; every step each layer concatenates the sinks, the recent slice and the new
    key, then re-applies RoPE to every cached key at positions 0..len-1 (cos/sin precomputed, as there). That is
    O(cache) copying and rotation per layer per step, the cost `SinkCache` removes. One token per forward."""

    def __init__(self, num_sinks: int, window: int, config):
        check_supported(config)
        rotary = rotary_spec(config)
        super().__init__(layers=[StubLayer() for _ in range(config.num_hidden_layers)])
        self.num_sinks, self.capacity = num_sinks, num_sinks + window
        angles = torch.arange(self.capacity, dtype=torch.float64)[:, None] * rotary.inv_freq
        self._cos64, self._sin64 = angles.cos(), angles.sin()
        self._tables = {}
        self.raw_keys = [None] * config.num_hidden_layers
        self.raw_values = [None] * config.num_hidden_layers

    def _table(self, like):
        key = (like.dtype, like.device)
        if key not in self._tables:
            cos, sin = self._cos64.to(like.device, like.dtype), self._sin64.to(like.device, like.dtype)
            self._tables[key] = (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
        return self._tables[key]

    @staticmethod
    def _rotate(x, cos, sin):
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        x_rot = x[..., :rot]
        rotated = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), -1) * sin
        return torch.cat((rotated, x[..., rot:]), -1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.raw_keys[layer_idx]
        return 0 if keys is None else min(keys.shape[-2], self.capacity - 1)

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        return self.get_seq_length(layer_idx) + query_length, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("PaperCache is a decode-step baseline: feed one token per forward")
        cos, sin = self._table(key_states)
        position = self.get_seq_length(layer_idx)  # where the model rotated the new key
        raw_new = self._rotate(key_states, cos[position:position + 1], -sin[position:position + 1])
        keys, values = self.raw_keys[layer_idx], self.raw_values[layer_idx]
        if keys is None:
            keys, values = raw_new, value_states
        else:
            if keys.shape[-2] >= self.capacity:
                recent = keys.shape[-2] - (self.capacity - 1 - self.num_sinks)
                keys = torch.cat((keys[..., : self.num_sinks, :], keys[..., recent:, :]), -2)
                values = torch.cat((values[..., : self.num_sinks, :], values[..., recent:, :]), -2)
            keys, values = torch.cat((keys, raw_new), -2), torch.cat((values, value_states), -2)
        self.raw_keys[layer_idx], self.raw_values[layer_idx] = keys, values
        n = keys.shape[-2]
        return self._rotate(keys, cos[:n], sin[:n]), values
