"""The setup paths of `StreamingKV`, apart from its decode step: emptying streams (all, or one: a ragged batch),
fast-forwarding to a far position without feeding tokens, and snapshot / restore of the whole state."""

from __future__ import annotations

import torch

from .kv_layer import KVLayer
from .rope import fill_swapped, persistent, rotate_inplace


class StreamControl:
    """Mixin of `StreamingKV` (uses its ring, layers, geometry and `_valid`, `_planned`, `_step`)."""

    def _forget_sink_placement(self) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.sink_shift = None

    def reset(self) -> None:
        """Empty every stream; the buffers stay allocated."""
        if self.ring is not None:
            self.ring.reset_all()
        self._planned = self._step = self._valid = None
        self._forget_sink_placement()

    def reset_stream(self, stream: int) -> None:
        """Empty one stream; the others keep their state (the batch becomes ragged)."""
        self._require_ring().reset(stream)
        self._forget_sink_placement()

    @persistent
    def fast_forward(self, seen: int, *, keep_window: bool = False) -> None:
        """Put every stream in the state a stream of `seen` tokens leaves, without feeding them (benchmarks use it
        to reach position 1M in no time). Counters, slots and positions become those after `seen` tokens; positions
        after it are small. The sinks already fed stay.

        keep_window=False: the window slots are not attended to until tokens fed after this rewrite them, so
            feeding the W tokens before `seen` fills the window as a stream of `seen` tokens leaves it.
        keep_window=True: the window tokens held now become the last ones before `seen`, in the same order (their
            keys are moved to the slots and re-rotated to the positions those tokens have there). Fill the cache
            with the first S tokens and the W before `seen` in one chunk, then jump: one forward instead of W.
        """
        ring = self._require_ring()
        if not isinstance(seen, int) or seen < 0:
            raise ValueError(f"seen must be a non-negative int, got {seen!r}")
        before = [ring.seen(b) for b in range(ring.num_streams)]
        if seen < max(before):
            raise ValueError(f"fast_forward cannot go back: a stream has seen {max(before)} tokens, asked for {seen} "
                             "(reset first)")
        held_window = []
        if keep_window:
            if len(set(before)) > 1 or self._valid is not None:
                raise ValueError("fast_forward(keep_window=True) needs every stream at the same length, refilled")
            held_window = sorted((ring.token_in_slot(0, s), s) for s in range(self.num_sinks, self.capacity)
                                 if ring.token_in_slot(0, s) >= 0)
            if held_window and seen - len(held_window) < self.num_sinks:
                raise ValueError(f"cannot place {len(held_window)} window tokens before position {seen}")
        old_base = ring.frame_base(0)
        for b in range(ring.num_streams):
            ring.fast_forward(b, seen)
        valid = torch.zeros(self.capacity, dtype=torch.bool)
        valid[: min(min(before), self.num_sinks)] = True
        if held_window:
            first_new = seen - len(held_window)
            new_slots = [ring.slot_for_token(first_new + k) for k in range(len(held_window))]
            old_slots = torch.tensor([s for _, s in held_window])
            shift = (first_new - ring.frame_base(0)) - (held_window[0][0] - old_base)
            self._move_window(old_slots, torch.tensor(new_slots), shift)
            valid[new_slots] = True
        self._valid = None if bool(valid.all()) else valid
        self._planned = None
        self._forget_sink_placement()

    def _move_window(self, old_slots: torch.Tensor, new_slots: torch.Tensor, shift: int) -> None:
        """Move window keys/values between slots and rotate the keys by `shift` positions (setup path: allocates)."""
        rot = self.rotary.rotary_dim if self.rotary is not None else 0
        if shift and not rot and not self.logical_order:  # ALiBi keys carry no position: moving them is enough
            raise ValueError("moving the window needs the model's rotary embedding: build the cache with config=")
        for layer in self.layers:
            if layer is None:
                continue
            index_old, index_new = old_slots.to(layer.device), new_slots.to(layer.device)
            keys = layer.keys.index_select(2, index_old)
            values = layer.values.index_select(2, index_old)
            if shift and rot:
                full_cos, full_sin = self.rotary.full_cos_sin(torch.tensor([shift]), layer.dtype, layer.device)
                rotate_inplace(keys[..., :rot], full_cos, full_sin, torch.empty_like(keys[..., : rot // 2]))
            layer.keys.index_copy_(2, index_new, keys)
            layer.values.index_copy_(2, index_new, values)

    @persistent
    def snapshot(self) -> dict:
        """A copy of the whole state (ring and buffers) that `restore` puts back."""
        ring = self._require_ring()
        return {
            "geometry": (self.num_sinks, self.window, self.rebase_interval, ring.num_streams),
            "ring": ring.snapshot(),
            "layers": [None if layer is None else (layer.keys.clone(), layer.values.clone(),
                                                   None if layer.sink_store is None else layer.sink_store.clone(),
                                                   None if layer.sink_shift is None else list(layer.sink_shift))
                       for layer in self.layers],
            "valid": None if self._valid is None else self._valid.clone(),
        }

    @persistent
    def restore(self, snapshot: dict, device=None) -> None:
        """Put back a `snapshot()` of a cache with the same geometry. Layers not allocated yet are allocated (on
        `device`, default where the snapshot's tensors are)."""
        if self.ring is None and len(snapshot.get("geometry", ())) == 4:
            self._make_ring(int(snapshot["geometry"][3]))
        ring = self._require_ring()
        geometry = (self.num_sinks, self.window, self.rebase_interval, ring.num_streams)
        if tuple(snapshot.get("geometry", ())) != geometry:
            raise ValueError(f"snapshot geometry {snapshot.get('geometry')} does not match this cache {geometry} "
                             "(num_sinks, window, rebase_interval, streams)")
        saved = snapshot["layers"]
        if self.num_layers is None and len(self.layers) < len(saved):
            self.layers.extend([None] * (len(saved) - len(self.layers)))
        if len(saved) != len(self.layers) or any(s is None and layer is not None
                                                  for s, layer in zip(saved, self.layers)):
            raise ValueError("snapshot layers do not match this cache's layers")
        ring.restore(snapshot["ring"])
        for index, state in enumerate(saved):
            if state is None:
                continue
            keys, values, sink_store, sink_shift = state
            layer = self.layers[index]
            if layer is None:
                where = device if device is not None else keys.device
                like_k = torch.empty(keys.shape[0], keys.shape[1], 1, keys.shape[3], dtype=keys.dtype, device=where)
                like_v = torch.empty(values.shape[0], values.shape[1], 1, values.shape[3], dtype=values.dtype,
                                     device=where)
                layer = self.layers[index] = KVLayer(self, index, like_k, like_v)
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            if sink_store is not None:
                layer.sink_store.copy_(sink_store)
                fill_swapped(layer.sink_swapped, layer.sink_store, self.rotary.rotary_dim)
            layer.sink_shift = None if sink_shift is None else list(sink_shift)
        self._valid = None if snapshot.get("valid") is None else snapshot["valid"].clone()
        self._planned = self._step = None

