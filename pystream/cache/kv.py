"""The torch side of the streaming KV cache: preallocated per-layer buffers written in place, driven by the C++ ring.

Nothing here imports transformers (see `pystream.cache.hf` for the adapter). This module holds the per-forward
step, read top to bottom in `_update`; the setup paths live beside it: positions in `kv_positions`, reset,
fast-forward and snapshots in `kv_state`, one layer's buffers in `kv_layer`, RoPE maths in `rope`. Shapes follow transformers:
keys and values are `[batch, kv_heads, seq, head_dim]`; batch row `b` is stream `b` of the ring.

How positions work (see core/include/pystream/sink_ring.hpp for the full story):
- window keys are stored exactly as the model rotated them (model frame); their distances to the query are the true
  ones, so they are never touched, except by a rare re-base of the frame that keeps model positions small;
- sink keys are stored rotated at their in-cache positions 0..S-1 (`sink_store`), and for each step the buffer's
  sink slots get them rotated by the ring's `sink_shift`, which puts every sink at the paper's in-cache distance from
  the query. That is S keys per layer per step, computed from the pristine copy, so no rounding accumulates.
"""


from __future__ import annotations

import contextlib

import torch
from torch.autograd.profiler import record_function

from .kv_layer import KVLayer, out_pass_needed
from .kv_positions import PositionPlanner
from .kv_state import StreamControl
from .ring import new_ring
from .rope import RotarySpec, RotationAngles, fill_swapped, rotate_inplace, rotate_into

__all__ = ["StreamingKV", "KVLayer", "RotarySpec", "RotationAngles"]

NO_RANGE = contextlib.nullcontext()
# torch.profiler ranges of the cache (see pystream-bench --profile), read by pystream.measure.profiling.
CACHE_UPDATE, BOOKKEEPING, REROTATE = "pystream::cache_update", "pystream::bookkeeping", "pystream::rerotate"


class _Step:
    """What the ring decided for the tokens of the current forward; shared by every layer."""

    __slots__ = ("n", "first_token", "slot", "slots", "occupied", "sink_shift", "sink_cos", "sink_sin",
                 "rebase", "rebase_cos", "rebase_sin", "sink_writes", "layers_done", "order", "valid_index")

    def __init__(self):
        self.sink_cos = self.sink_sin = self.rebase_cos = self.rebase_sin = self.valid_index = None


class StreamingKV(PositionPlanner, StreamControl):
    """Preallocated StreamingLLM KV buffers for every layer of a model, driven by the C++ `SinkRing`.

    Args:
        num_layers: layers of the model; None: as many as the model updates.
        num_sinks: S, the first tokens kept forever (4 in the paper).
        window: W, the most recent tokens kept; the newest token counts towards it, so a query attends to at most
            S + W keys, the capacity (the paper's "4+1020" is num_sinks=4, window=1020: capacity 1,024).
        rotary: the model's RoPE; needed whenever stored keys must be re-rotated (sinks once the window is full,
            re-basing). Only a cache with no sinks that is never re-based can do without it.
        rebase_interval: model positions handed out by `position_ids` stay below S + W - 1 + rebase_interval; the
            window keys are re-rotated once per interval (amortised O(1) per token). Default: S + W.
        batch_size: number of streams; default taken from the first update.
        device: where `position_ids` puts positions before the first update has allocated the buffers (after that,
            the buffers' device); default the CPU. On a GPU, pass the model's device.
    """

    def __init__(self, num_layers: int | None, num_sinks: int, window: int, rotary: RotarySpec | None,
                 rebase_interval: int | None = None, batch_size: int | None = None, logical_order: bool = False,
                 device: torch.device | str | None = None):
        for name, value in (("num_sinks", num_sinks), ("window", window)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if num_layers is not None and num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_sinks < 0 or window < 0:
            raise ValueError(f"num_sinks and window must be >= 0, got num_sinks={num_sinks}, window={window}")
        if num_sinks + window == 0:
            raise ValueError("num_sinks + window must be > 0: a cache of 0 slots holds nothing")
        if window < 1:
            raise ValueError(f"window must be >= 1: the newest token always occupies a window slot (got {window})")
        if num_sinks > 0 and rotary is None and not logical_order:
            raise ValueError("a cache with sinks needs the model's rotary embedding (rotary=...) to place them")
        if logical_order and rotary is not None:
            raise ValueError("logical_order is for position biases built from the key order (ALiBi), not RoPE")
        # ALiBi models bias each key by its index among the keys they are given: the paper's contiguous bias needs
        # the keys in logical order (sinks, then the window oldest to newest), so once the ring wraps they are
        # gathered into a second preallocated buffer every step (O(cache) copying, no allocation).
        self.logical_order = logical_order
        self.num_layers, self.num_sinks, self.window = num_layers, num_sinks, window
        self.capacity = num_sinks + window
        self.rotary = rotary
        self.rebase_interval = int(rebase_interval) if rebase_interval is not None else self.capacity
        if self.rebase_interval < 1:
            raise ValueError(f"rebase_interval must be >= 1, got {rebase_interval}")
        self.layers: list[KVLayer | None] = [None] * (num_layers or 0)
        self.ring = None  # the C++ SinkRing, made with the first forward (or batch_size=)
        self._planned: torch.Tensor | None = None
        self._step: _Step | None = None
        # After a fast-forward the window slots hold nothing valid for the new positions until rewritten: which slots
        # may be attended to ([capacity] bool), or None when every occupied slot may.
        self._valid: torch.Tensor | None = None
        self._angle_buffers: dict = {}
        self.profile = False  # wrap the update in torch.profiler ranges (see pystream-bench --profile)
        self._position_buffers: dict = {}
        self.device = torch.device(device) if device is not None else None
        if batch_size is not None:
            self._make_ring(batch_size)

    def _make_ring(self, batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.ring, self._out = new_ring(batch_size, self.num_sinks, self.window, self.rebase_interval)
        return self.ring

    def _require_ring(self):
        if self.ring is None:
            raise RuntimeError("the cache has no streams yet: run a forward first, or create it with batch_size=")
        return self.ring

    @property
    def batch_size(self) -> int:
        return self.ring.num_streams if self.ring is not None else -1

    def seen(self, stream: int = 0) -> int:
        """Tokens fed to `stream` so far."""
        return self.ring.seen(stream) if self.ring is not None else 0

    def next_position(self, stream: int = 0) -> int:
        """Model position the next token of `stream` is expected at (what `get_seq_length` reports)."""
        return self.ring.next_position(stream) if self.ring is not None else 0

    def occupied(self) -> int:
        """Slots holding a token, the most over all streams."""
        if self.ring is None:
            return 0
        return max(self.ring.occupied(b) for b in range(self.ring.num_streams))

    def attended(self, num_new: int) -> int:
        """Keys the next forward of `num_new` tokens attends to (what `update` will return), the most over streams."""
        if self._valid is not None:
            slot = self.ring.slot_for_token(self.ring.seen(0))
            return int(self._valid.sum()) + (0 if self._valid[slot] else 1)
        before = self.occupied()
        return min(before + 1, self.capacity) if num_new == 1 else before + num_new

    def slot_mask(self, device=None) -> torch.Tensor:
        """`[batch, attended(1)]` bool: which returned keys stream b may attend to in the next single-token step.

        Needed only when streams differ in how many slots they fill (after `reset_stream`): pass it to the model as
        `attention_mask=` for that step. Key j of the returned keys is slot j."""
        ring = self._require_ring()
        if self._valid is not None:
            raise ValueError("slot_mask is not available while a fast-forwarded window is being refilled")
        width = self.attended(1)
        mask = torch.zeros(ring.num_streams, width, dtype=torch.bool)
        for b in range(ring.num_streams):
            mask[b, : min(ring.occupied(b) + 1, self.capacity, width)] = True
        return mask.to(device if device is not None else (self._device() or "cpu"))

    def query_offset(self) -> int:
        """How many returned keys come before the first new query (for the causal mask)."""
        if self._valid is not None:
            return self.attended(1) - 1
        return min(self.occupied(), self.capacity - 1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers of every allocated layer."""
        return sum(layer.nbytes for layer in self.layers if layer is not None)

    def _device(self):
        for layer in self.layers:
            if layer is not None:
                return layer.device
        return self.device


    # ---- the per-forward step --------------------------------------------------------------------------------------
    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
               position_ids: torch.Tensor | None = None):
        with self._range(CACHE_UPDATE):
            return self._update(layer_idx, key_states, value_states, position_ids)

    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                position_ids: torch.Tensor | None = None):
        """Write the new keys/values of `layer_idx` in place and return the keys/values to attend to.

        `position_ids` (read by layer 0 only): the positions the model rotated the new tokens with, when known;
        None means the ones the cache expects (`next_position`).

        Returns views `[batch, kv_heads, occupied, head_dim]` of the buffers: the sinks (rotated for this step) and the
        window, in slot order. The order is free: a single query needs no mask, and a chunk only happens before the
        cache is full, when slot order is arrival order.
        """
        if layer_idx == 0:  # the first layer books the forward's tokens in the ring, for every layer
            with self._range(BOOKKEEPING):
                self.begin_step(key_states, position_ids)
        step = self._step
        layer = self._layer_for(layer_idx, step, key_states, value_states)

        if step.rebase is not None:  # once per rebase_interval tokens: the frame moved, window keys follow it
            with self._range(REROTATE):
                self._rebase_window(layer, step)

        if step.n == 1 and step.slot >= 0:  # the decode step: every stream writes the same slot
            layer.keys.narrow(2, step.slot, 1).copy_(key_states)
            layer.values.narrow(2, step.slot, 1).copy_(value_states)
        else:
            self._write_ragged_or_chunk(layer, step, key_states, value_states)

        if step.sink_writes and layer.sink_store is not None:  # the first S tokens of a stream
            self._store_sinks(layer, step, key_states)
        if self.num_sinks and self.rotary is not None:  # the sinks at their in-cache distance from the query
            with self._range(REROTATE):
                self._place_sinks(layer, step)

        step.layers_done += 1
        if step.occupied == self.capacity and step.order is None and step.valid_index is None:
            return layer.keys, layer.values  # the steady state: the whole buffer, no view to make
        return self._attended_view(layer, step)

    # ---- booking a forward in the ring (layer 0) -------------------------------------------------------------------
    def begin_step(self, key_states: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Book the new tokens in the ring; called once per forward, by the first layer, before any write."""
        batch, _, n, _ = key_states.shape
        ring = self.ring if self.ring is not None else self._make_ring(batch)
        self._check_forward(ring, batch, n)
        self._adopt_positions(position_ids, n)
        self._planned = None
        step = self._book_token(ring) if n == 1 else self._book_chunk(ring, n)
        step.order = self._order_index(step) if self.logical_order and step.occupied == self.capacity else None
        if self._valid is not None:
            self._refill_after_fast_forward(step)
        self._step = step

    def _check_forward(self, ring, batch: int, n: int) -> None:
        if batch != ring.num_streams:
            raise ValueError(f"the cache holds {ring.num_streams} stream(s) but the model passed a batch of {batch}")
        if n < 1:
            raise ValueError("a forward with no new tokens has nothing to cache")
        if n > 1:
            for b in range(ring.num_streams):
                if ring.seen(b) + n > self.capacity:
                    room = self.capacity - ring.seen(b)
                    raise ValueError(
                        f"stream {b} already holds {ring.seen(b)} tokens and {n} more arrive in one forward, but only "
                        f"{max(room, 0)} fit before the cache (capacity {self.capacity}) starts evicting: tokens of one "
                        "forward cannot attend to different windows through transformers' causal mask. Feed the "
                        "overflow one token at a time: pystream.prefill(model, cache, input_ids) does it, and "
                        "generate(..., prefill_chunk_size=1) too."
                    )
            if len({ring.seen(b) for b in range(ring.num_streams)}) > 1:
                raise ValueError("a multi-token forward needs every stream at the same length; feed ragged streams "
                                 "one token at a time")
        if self._valid is not None and (n > 1 or len({ring.seen(b) for b in range(ring.num_streams)}) > 1):
            raise ValueError("after fast_forward, feed every stream the same tokens one at a time until the window "
                             "is refilled")

    def _book_token(self, ring) -> _Step:
        """One token per stream: one call into the ring, which fills the bound output arrays."""
        step = _Step()
        step.n, step.layers_done, step.first_token = 1, 0, None
        step.slot = slot = ring.step()  # the slot every stream wrote, or -1 when they differ (ragged)
        out = self._out
        step.slots = slots = out["slot"].tolist()
        step.occupied = int(out["occupied"].max())
        step.sink_shift = out["sink_shift"].tolist()
        pending = out["pending_shift"].tolist()
        step.rebase = pending if any(pending) else None
        # Sink slots hold sink tokens only, and token t < S goes to slot t.
        S = self.num_sinks
        step.sink_writes = [(b, s, ring.frame_base(b)) for b, s in enumerate(slots) if s < S] \
            if S and (slot < 0 or slot < S) else None
        return step

    def _book_chunk(self, ring, n: int) -> _Step:
        """A chunk of n tokens per stream, all fitting before eviction (checked): slots first..first+n-1."""
        step = _Step()
        step.n, step.layers_done, step.slots = n, 0, None
        first = ring.seen(0)
        pending = [ring.take_pending_shift(b) for b in range(ring.num_streams)]
        for b in range(ring.num_streams):
            ring.append(b, n)
        step.first_token = step.slot = first  # no wrap before the cache is full
        step.occupied = first + n
        step.sink_shift = [ring.sink_shift(b) for b in range(ring.num_streams)]
        step.rebase = pending if any(pending) else None
        # Sinks written this step, per stream: (token index, frame base at the write).
        step.sink_writes = [(b, t, ring.frame_base(b)) for b in range(ring.num_streams)
                            for t in range(first, min(first + n, self.num_sinks))] or None
        return step

    def _refill_after_fast_forward(self, step: _Step) -> None:
        """Refilling the window after a fast-forward: this step's slot joins the slots that may be attended to."""
        self._valid[step.slot] = True
        if bool(self._valid.all()):
            self._valid = None
        else:
            step.valid_index = self._valid.nonzero().squeeze(1)

    def _range(self, name: str):
        """A named torch.profiler range when profiling (see pystream-bench --profile), else a no-op: ranges cost a
        few us each."""
        return record_function(name) if self.profile else NO_RANGE

    def _order_index(self, step) -> torch.Tensor:
        """Slots in logical order (sinks, then the window oldest to newest) for a full cache, in a reused tensor."""
        ring = self.ring
        if step.slot < 0:
            raise ValueError("a logical-order (ALiBi) cache needs every stream at the same length")
        oldest = ring.slot_for_token(ring.seen(0) - self.window) - self.num_sinks
        device = self._device() or "cpu"
        if getattr(self, "_order", None) is None or self._order.device != torch.device(device):
            with torch.inference_mode(False):
                self._order = torch.arange(self.capacity, device=device)
                self._window_arange = torch.arange(self.window, device=device)
        window_part = self._order[self.num_sinks:]
        torch.add(self._window_arange, oldest, out=window_part)
        torch.remainder(window_part, self.window, out=window_part)
        window_part.add_(self.num_sinks)
        return self._order


    # ---- the per-layer pieces --------------------------------------------------------------------------------------
    def _layer_for(self, layer_idx: int, step: _Step, key_states: torch.Tensor,
                   value_states: torch.Tensor) -> KVLayer:
        """The layer's buffers, allocated on its first update; checks that layers come in order."""
        if step is None or step.layers_done != layer_idx:
            raise RuntimeError(
                f"cache layer {layer_idx} updated out of order (expected layer "
                f"{0 if step is None else step.layers_done}); the cache must see every layer of a forward in order"
            )
        if layer_idx >= len(self.layers):
            if self.num_layers is not None or layer_idx != len(self.layers):
                raise IndexError(f"layer {layer_idx} is outside the cache's {len(self.layers)} layers")
            self.layers.append(None)
        layer = self.layers[layer_idx]
        if layer is None:
            layer = self.layers[layer_idx] = KVLayer(self, layer_idx, key_states, value_states)
        elif key_states.shape[0] != layer.keys.shape[0] or key_states.shape[1] != layer.keys.shape[1]:
            raise ValueError(f"layer {layer_idx}: keys of shape {tuple(key_states.shape)} do not fit the cache's "
                             f"buffers {tuple(layer.keys.shape)}")
        return layer

    @staticmethod
    def _write_ragged_or_chunk(layer: KVLayer, step: _Step, key_states: torch.Tensor,
                               value_states: torch.Tensor) -> None:
        """The writes other than the decode step's: one token per stream into per-stream slots (a ragged batch), or
        a chunk of tokens into consecutive slots (before the cache is full)."""
        if step.n == 1:
            for b, s in enumerate(step.slots):
                layer.keys[b, :, s].copy_(key_states[b, :, 0])
                layer.values[b, :, s].copy_(value_states[b, :, 0])
        else:
            first, n = step.first_token, step.n
            layer.keys[:, :, first:first + n].copy_(key_states)
            layer.values[:, :, first:first + n].copy_(value_states)

    def _attended_view(self, layer: KVLayer, step: _Step):
        """The keys/values to attend to outside the steady state."""
        if step.valid_index is not None:
            # After a fast-forward, until the window is refilled: the sinks and the slots rewritten since.
            if step.valid_index.device != layer.device:
                step.valid_index = step.valid_index.to(layer.device)
            index = step.valid_index
            return layer.keys.index_select(2, index), layer.values.index_select(2, index)
        if step.order is not None:  # ALiBi: logical order, gathered into the second buffer
            keys, values = layer.ordered
            torch.index_select(layer.keys, 2, step.order, out=keys)
            torch.index_select(layer.values, 2, step.order, out=values)
            return keys, values
        if step.occupied == self.capacity:
            return layer.keys, layer.values
        return layer.keys[:, :, :step.occupied], layer.values[:, :, :step.occupied]

    # ---- rotations -------------------------------------------------------------------------------------------------
    def _angles(self, layer: KVLayer, purpose: str) -> RotationAngles:
        key = (purpose, layer.dtype, layer.device)
        angles = self._angle_buffers.get(key)
        if angles is None:
            table = self.rebase_interval + self.capacity if purpose == "sink" else 1
            angles = self._angle_buffers[key] = RotationAngles(self.rotary, layer.keys.shape[0], layer.dtype,
                                                               layer.device, table)
        return angles

    def _rebase_window(self, layer: KVLayer, step: _Step) -> None:
        """The frame moved by `step.rebase[b]` for stream b: rotate stored window keys back by that much."""
        rot = self.rotary.rotary_dim
        if step.rebase_cos is None or step.rebase_cos.device != layer.device:
            step.rebase_cos, step.rebase_sin = self._angles(layer, "rebase")([-d for d in step.rebase])
        S = self.num_sinks
        window_keys = layer.keys[:, :, S:, :rot]
        rotate_inplace(window_keys, step.rebase_cos, step.rebase_sin, layer.scratch)

    def _store_sinks(self, layer: KVLayer, step: _Step, key_states: torch.Tensor) -> None:
        """Keep a pristine copy of new sink keys, rotated to their in-cache positions (the model rotated token t at
        t - frame_base), and its half-swapped twin."""
        rot = self.rotary.rotary_dim
        for b, token, frame_base in step.sink_writes:
            src = key_states[b, :, token - step.first_token] if step.n > 1 else key_states[b, :, 0]
            dst = layer.sink_store[b, :, token]
            dst.copy_(src)
            if frame_base != 0:  # rare: only when a caller's positions put the first tokens off frame 0
                full_cos, full_sin = self.rotary.full_cos_sin(torch.tensor([frame_base]), layer.dtype, layer.device)
                rotate_inplace(dst[None, :, :rot], full_cos, full_sin, layer.scratch[b, :, :1, :].transpose(0, 1))
            fill_swapped(layer.sink_swapped[b, :, token], dst, rot)
            # The buffer's sink slot now holds the key in the current frame, not rotated by the layer's sink shift.
            layer.sink_shift = None

    def _place_sinks(self, layer: KVLayer, step: _Step) -> None:
        """Rotate the sinks into the buffer for this step's query, unless they already sit there."""
        if layer.sink_shift == step.sink_shift:
            return
        occupied_sinks = min(self.num_sinks, step.occupied)
        if occupied_sinks == 0:
            return
        if step.sink_cos is None or step.sink_cos.device != layer.device:
            step.sink_cos, step.sink_sin = self._angles(layer, "sink")(step.sink_shift)
        if occupied_sinks == self.num_sinks:
            out, src, swapped, out_pass, src_pass = layer.sink_views
        else:  # the first tokens of a stream
            rot = self.rotary.rotary_dim
            out, src = layer.keys[:, :, :occupied_sinks, :rot], layer.sink_store[:, :, :occupied_sinks, :rot]
            swapped = layer.sink_swapped[:, :, :occupied_sinks]
            out_pass = layer.keys[:, :, :occupied_sinks, rot:] if out_pass_needed(layer, rot) else None
            src_pass = layer.sink_store[:, :, :occupied_sinks, rot:] if out_pass is not None else None
        rotate_into(out, src, swapped, step.sink_cos, step.sink_sin)
        if out_pass is not None:  # partial rotary (GPT-NeoX): the rest of the head is not rotated
            out_pass.copy_(src_pass)
        layer.sink_shift = step.sink_shift
