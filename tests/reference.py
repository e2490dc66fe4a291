"""Oracles, written as plainly as possible. Test code only.

`PaperReferenceCache` is StreamingLLM as the paper's code does it (mit-han-lab/streaming-llm, "pos_shift"): keep
un-rotated keys; for each step make room (keep the first S and the last W-1 so that the new token fits in S+W),
append the new one, rotate all keys with positions 0..len-1, and let the query sit at len-1. It costs O(cache) per
step and allocates freely; it only has to be obviously right.

It plugs into the same transformers model as the caches under test, so the two are compared on identical weights
and attention code. The model rotates each new key at the position the reference reported (`get_seq_length`), and
the reference un-rotates it with the model's own rotary module.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def find_rotary_module(model):
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "forward") and "Rotary" in type(module).__name__:
            return module
    raise LookupError("model has no rotary embedding module")


class _RefLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.raw_keys = None  # un-rotated

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, *a, **k):
        raise AssertionError("PaperReferenceCache.update handles layers itself")

    def get_mask_sizes(self, query_length):
        return 0, 0

    def get_seq_length(self):
        return 0 if self.raw_keys is None else self.raw_keys.shape[-2]

    def get_max_length(self):
        return -1


class PaperReferenceCache(Cache):
    def __init__(self, model, num_sinks: int, window: int):
        self.rotary = find_rotary_module(model)
        self.S, self.W = num_sinks, window
        n_layers = model.config.num_hidden_layers
        super().__init__(layers=[_RefLayer() for _ in range(n_layers)])
        self.values_by_layer = [None] * n_layers

    # Number of keys kept before the incoming tokens are appended; this is also the position of the first incoming
    # token, which is what the model rotates it with (we report it through get_seq_length).
    def _kept_before(self, layer_idx, n_new):
        layer = self.layers[layer_idx]
        m = layer.get_seq_length()
        return min(m, self.S + self.W - n_new) if m + n_new > self.S + self.W else m

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kept_before(layer_idx, 1)

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        return self._kept_before(layer_idx, query_length) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kept_before(layer_idx, 1)

    def _cos_sin(self, positions, like):
        pos = torch.as_tensor(positions, device=like.device).view(1, -1)
        cos, sin = self.rotary(like, pos)
        # Undo any attention scaling baked into cos/sin by the rotary module: we rotate stored keys, and the model
        # already scaled them once when it rotated them.
        scale = getattr(self.rotary, "attention_scaling", 1.0)
        return cos[0] / scale, sin[0] / scale

    def _rotate(self, x, positions):
        cos, sin = self._cos_sin(positions, x)
        rot = cos.shape[-1]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        n = key_states.shape[-2]
        # 1. make room: keep the first S and the most recent keys so that the new ones fit in S + W
        keep = self._kept_before(layer_idx, n)
        if layer.raw_keys is not None and keep < layer.raw_keys.shape[-2]:
            recent = keep - self.S
            cut = lambda t: torch.cat((t[..., : self.S, :], t[..., t.shape[-2] - recent:, :]), dim=-2)
            layer.raw_keys = cut(layer.raw_keys)
            self.values_by_layer[layer_idx] = cut(self.values_by_layer[layer_idx])
        # 2. append the new keys, un-rotated (the model rotated them at positions keep..keep+n-1)
        new_positions = list(range(keep, keep + n))
        raw_new = self._rotate(key_states, [-p for p in new_positions])
        if layer.raw_keys is None:
            layer.raw_keys, self.values_by_layer[layer_idx] = raw_new, value_states
        else:
            layer.raw_keys = torch.cat((layer.raw_keys, raw_new), dim=-2)
            self.values_by_layer[layer_idx] = torch.cat((self.values_by_layer[layer_idx], value_states), dim=-2)
        # 3. rotate every key at its position inside the cache: 0..len-1
        length = layer.raw_keys.shape[-2]
        keys = self._rotate(layer.raw_keys, list(range(length)))
        return keys, self.values_by_layer[layer_idx]


def reference_from(cache, model) -> PaperReferenceCache:
    """A PaperReferenceCache holding what a streaming cache (one stream) holds now: the same tokens' keys, un-rotated,
    in arrival order, and their values. Continuing both from here must give the same logits."""
    ring = cache.ring
    S, W = cache.num_sinks, cache.window
    ref = PaperReferenceCache(model, S, W)
    frame_base = ring.frame_base(0)
    slots = [s for s in range(cache.capacity) if ring.token_in_slot(0, s) >= 0]
    slots.sort(key=lambda s: ring.token_in_slot(0, s))
    for layer_idx, layer in enumerate(cache.kv.layers):
        raw, vals = [], []
        for s in slots:
            token = ring.token_in_slot(0, s)
            if token < S:
                key, position = layer.sink_store[:, :, token:token + 1], token
            else:
                key, position = layer.keys[:, :, s:s + 1], token - frame_base
            raw.append(ref._rotate(key, [-position]))
            vals.append(layer.values[:, :, s:s + 1])
        ref.layers[layer_idx].raw_keys = torch.cat(raw, dim=-2)
        ref.values_by_layer[layer_idx] = torch.cat(vals, dim=-2)
    return ref


class AlibiReferenceCache(Cache):
    """StreamingLLM for ALiBi models as the paper describes it, plainly: keep the first S and the most recent keys in
    order (concatenating every step), so that the model's bias, built from the index of each key among those it is
    given, is contiguous. Nothing to rotate."""

    def __init__(self, model, num_sinks: int, window: int):
        self.S, self.W = num_sinks, window
        n_layers = model.config.num_hidden_layers
        super().__init__(layers=[_RefLayer() for _ in range(n_layers)])
        self.keys_by_layer = [None] * n_layers
        self.values_by_layer = [None] * n_layers

    def _kept_before(self, layer_idx, n_new):
        keys = self.keys_by_layer[layer_idx]
        m = 0 if keys is None else keys.shape[-2]
        return min(m, self.S + self.W - n_new) if m + n_new > self.S + self.W else m

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kept_before(layer_idx, 1)

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        return self._kept_before(layer_idx, query_length) + query_length, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keep = self._kept_before(layer_idx, key_states.shape[-2])
        keys, values = self.keys_by_layer[layer_idx], self.values_by_layer[layer_idx]
        if keys is not None and keep < keys.shape[-2]:
            recent = keep - self.S
            cut = lambda t: torch.cat((t[..., : self.S, :], t[..., t.shape[-2] - recent:, :]), dim=-2)  # noqa
            keys, values = cut(keys), cut(values)
        keys = key_states if keys is None else torch.cat((keys, key_states), dim=-2)
        values = value_states if values is None else torch.cat((values, value_states), dim=-2)
        self.keys_by_layer[layer_idx], self.values_by_layer[layer_idx] = keys, values
        return keys, values


class PlainPositionsReferenceCache(Cache):
    """Sink/window streaming with positions chosen per key, written plainly, token by token (test oracle).

    The model is fed every token at position 0 (pass `position_ids=[[0]]`), so it hands over un-rotated keys and
    computes an un-rotated query. The reference keeps the first S keys and the last W (the new one included), un-rotated,
    with their stream indices, and for the query of token t returns each kept key j rotated by -(distance of j from
    t), with float64 angles: q . R(-d) k is the RoPE score of a key at distance d.

    scheme "original": keys keep the positions they were computed at, so d = t - j for every key (sinks included).
    scheme "in-cache": the paper, d = min(t, S + W - 1) - j for a sink j < S, t - j for the window.
    """

    def __init__(self, model, num_sinks: int, window: int, scheme: str = "original"):
        rotary = find_rotary_module(model)
        self.inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64)
        self.S, self.W, self.scheme = num_sinks, window, scheme
        n_layers = model.config.num_hidden_layers
        super().__init__(layers=[_RefLayer() for _ in range(n_layers)])
        self.kept = [None] * n_layers  # (stream indices, raw keys, values)
        self.t = -1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the model is fed position 0 anyway

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        return self._count(layer_idx) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._count(layer_idx)

    def _count(self, layer_idx):
        kept = self.kept[layer_idx]
        return 0 if kept is None else min(len(kept[0]), self.S + self.W - 1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("the reference takes one token per forward")
        if layer_idx == 0:
            self.t += 1
        t = self.t
        kept = self.kept[layer_idx]
        if kept is None:
            tokens, keys, values = [t], key_states, value_states
        else:
            tokens = kept[0] + [t]
            keys = torch.cat((kept[1], key_states), dim=-2)
            values = torch.cat((kept[2], value_states), dim=-2)
        # keep the sinks and the most recent W tokens
        keep = [i for i, j in enumerate(tokens) if j < self.S or j > t - self.W]
        tokens, keys, values = [tokens[i] for i in keep], keys[..., keep, :], values[..., keep, :]
        self.kept[layer_idx] = (tokens, keys, values)
        dist = [(min(t, self.S + self.W - 1) - j) if (self.scheme == "in-cache" and j < self.S) else t - j
                for j in tokens]
        angles = -torch.tensor(dist, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)
        half = cos.shape[-1]
        x1, x2, rest = keys[..., :half], keys[..., half:2 * half], keys[..., 2 * half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
        return rotated, values
