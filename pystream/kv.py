"""The torch side of the streaming KV cache: preallocated per-layer buffers written in place, driven by the C++ ring.

Nothing here imports transformers (see `pystream.hf` for the adapter). Shapes follow transformers:
keys and values are `[batch, kv_heads, seq, head_dim]`; batch row `b` is stream `b` of the ring.

How positions work (see core/include/pystream/sink_ring.hpp for the full story):
- window keys are stored exactly as the model rotated them (model frame); their distances to the query are the true
  ones, so they are never touched, except by a rare re-base of the frame that keeps model positions small;
- sink keys are stored rotated at their in-cache positions 0..S-1 (`sink_store`), and for each step the buffer's
  sink slots get them rotated by the ring's `sink_shift`, which puts every sink at the paper's in-cache distance from
  the query. That is S keys per layer per step, computed from the pristine copy, so no rounding accumulates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._core import SinkRing


@dataclass(frozen=True)
class RotarySpec:
    """RoPE as the model applies it, in the rotate-half layout (Llama, Mistral, Qwen2, GPT-NeoX).

    `inv_freq` is `[rotary_dim // 2]` float64 on the CPU; the first `rotary_dim` features of each head are rotated
    (GPT-NeoX rotates only part of the head).
    """

    inv_freq: torch.Tensor
    rotary_dim: int

    def __post_init__(self):
        if self.inv_freq.ndim != 1 or 2 * self.inv_freq.numel() != self.rotary_dim:
            raise ValueError(
                f"inv_freq must be 1-D with rotary_dim // 2 = {self.rotary_dim // 2} entries, "
                f"got shape {tuple(self.inv_freq.shape)}"
            )

    def cos_sin(self, shifts: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """cos and sin of `shifts[..., None] * inv_freq`, computed in float64 then cast: `[*shifts.shape, rot/2]`."""
        angles = shifts.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(torch.float64)
        # float64 keeps the angle exact to ~1e-16 relative; reduce before the cast so large shifts stay exact too.
        angles = torch.remainder(angles, 2 * math.pi)
        return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def rotate_into(out: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out = RoPE-rotate(src) by the angles whose cos/sin are given; rotate-half layout; no allocation.

    `src`, `out`: `[..., rotary_dim]` views that do not overlap; `cos`, `sin` broadcast to `[..., rotary_dim // 2]`.
    """
    half = src.shape[-1] // 2
    x1, x2 = src[..., :half], src[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)


def rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scratch: torch.Tensor) -> None:
    """x = RoPE-rotate(x) in place; `scratch` has the shape of `x[..., :rotary_dim // 2]`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    scratch.copy_(x1)
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).addcmul_(scratch, sin)


class KVLayer:
    """One layer's buffers. `keys`/`values`: `[batch, kv_heads, capacity, head_dim]`, allocated once, written in
    place. `sink_store`: `[batch, kv_heads, num_sinks, head_dim]`, the sink keys rotated at positions 0..S-1."""

    def __init__(self, kv: "StreamingKV", layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, heads, _, head_dim = key_states.shape
        cap, sinks = kv.capacity, kv.num_sinks
        self.layer_idx = layer_idx
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = torch.zeros(batch, heads, cap, head_dim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(
            batch, heads, cap, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device
        )
        self.sink_store = self.keys.new_zeros(batch, heads, sinks, head_dim) if sinks else None
        # The sink shift the buffer's sink slots are rotated by, per stream; None: unknown (rotate next time).
        self.sink_shift: list[int] | None = [0] * batch
        # Scratch for in-place rotations (re-base of the window, sinks written in a shifted frame).
        rot_half = kv.rotary.rotary_dim // 2 if kv.rotary is not None else 0
        self.scratch = self.keys.new_empty(batch, heads, kv.window, rot_half) if rot_half else None

    @property
    def nbytes(self) -> int:
        total = self.keys.nbytes + self.values.nbytes
        total += self.sink_store.nbytes if self.sink_store is not None else 0
        total += self.scratch.nbytes if self.scratch is not None else 0
        return total


class _Step:
    """What the ring decided for the tokens of the current forward; shared by every layer."""

    __slots__ = ("n", "first_token", "slot", "slots", "occupied", "sink_shift", "sink_cos", "sink_sin",
                 "rebase", "rebase_cos", "rebase_sin", "sink_writes", "layers_done")


class StreamingKV:
    """Preallocated StreamingLLM KV buffers for every layer of a model, driven by the C++ `SinkRing`.

    Args:
        num_layers: layers of the model; None: as many as the model updates.
        num_sinks: S, the first tokens kept forever (4 in the paper).
        window: W, the most recent tokens kept; the newest token counts towards it, so a query attends to at most
            S + W keys (the paper's "4+1020" is num_sinks=4, window=1020).
        rotary: the model's RoPE; needed whenever stored keys must be re-rotated (sinks once the window is full,
            re-basing). Only a cache with no sinks that is never re-based can do without it.
        rebase_interval: model positions handed out by `position_ids` stay below S + W - 1 + rebase_interval; the
            window keys are re-rotated once per interval (amortised O(1) per token). Default: S + W.
        batch_size: number of streams; default taken from the first update.
    """

    def __init__(self, num_layers: int | None, num_sinks: int, window: int, rotary: RotarySpec | None,
                 rebase_interval: int | None = None, batch_size: int | None = None):
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
        if num_sinks > 0 and rotary is None:
            raise ValueError("a cache with sinks needs the model's rotary embedding (rotary=...) to place them")
        self.num_layers, self.num_sinks, self.window = num_layers, num_sinks, window
        self.capacity = num_sinks + window
        self.rotary = rotary
        self.rebase_interval = int(rebase_interval) if rebase_interval is not None else self.capacity
        if self.rebase_interval < 1:
            raise ValueError(f"rebase_interval must be >= 1, got {rebase_interval}")
        self.layers: list[KVLayer | None] = [None] * (num_layers or 0)
        self.ring: SinkRing | None = None
        self._planned: torch.Tensor | None = None
        self._step: _Step | None = None
        if batch_size is not None:
            self._make_ring(batch_size)

    # ---- the ring --------------------------------------------------------------------------------------------------
    def _make_ring(self, batch_size: int) -> SinkRing:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.ring = SinkRing(batch_size, self.num_sinks, self.window, self.rebase_interval)
        self._out = {name: np.zeros(batch_size, dtype=np.int64)
                     for name in ("slot", "evicted", "position", "sink_shift", "pending_shift", "occupied")}
        self.ring.bind_outputs(**self._out)
        return self.ring

    def _require_ring(self) -> SinkRing:
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

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers of every allocated layer."""
        return sum(layer.nbytes for layer in self.layers if layer is not None)

    # ---- stream control ------------------------------------------------------------------------------------------
    def _forget_sink_placement(self) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.sink_shift = None

    def reset(self) -> None:
        """Empty every stream; the buffers stay allocated."""
        if self.ring is not None:
            self.ring.reset_all()
        self._planned = self._step = None
        self._forget_sink_placement()

    def reset_stream(self, stream: int) -> None:
        """Empty one stream; the others keep their state (the batch becomes ragged)."""
        self._require_ring().reset(stream)
        self._forget_sink_placement()

    def fast_forward(self, seen: int, stream: int | None = None) -> None:
        """Put `stream` (default: all) in the state a stream of `seen` tokens leaves, without feeding them.

        Only the bookkeeping moves: the buffers keep what they hold, so the caller refills the window (the sinks stay
        valid if they were fed). Positions after it are small (see `SinkRing.fast_forward`)."""
        ring = self._require_ring()
        streams = range(ring.num_streams) if stream is None else [stream]
        for b in streams:
            ring.fast_forward(b, seen)
        self._planned = None
        self._forget_sink_placement()

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
        }

    def restore(self, snapshot: dict) -> None:
        """Put back a `snapshot()` of a cache with the same geometry and allocated layers."""
        ring = self._require_ring()
        geometry = (self.num_sinks, self.window, self.rebase_interval, ring.num_streams)
        if snapshot.get("geometry") != geometry:
            raise ValueError(f"snapshot geometry {snapshot.get('geometry')} does not match this cache {geometry} "
                             "(num_sinks, window, rebase_interval, streams)")
        saved = snapshot["layers"]
        if len(saved) != len(self.layers) or any((s is None) != (layer is None) for s, layer in zip(saved, self.layers)):
            raise ValueError("snapshot layers do not match this cache's allocated layers")
        ring.restore(snapshot["ring"])
        for layer, state in zip(self.layers, saved):
            if layer is None:
                continue
            keys, values, sink_store, sink_shift = state
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            if sink_store is not None:
                layer.sink_store.copy_(sink_store)
            layer.sink_shift = None if sink_shift is None else list(sink_shift)
        self._planned = self._step = None

    # ---- positions -------------------------------------------------------------------------------------------------
    def position_ids(self, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Model positions `[batch, num_tokens]` for the next tokens, kept below S + W - 1 + rebase_interval.

        Pass them as `position_ids=` to the model: the paper's positions-inside-the-cache at float32-exact angles,
        however long the stream. Before the first forward (no streams yet) they are `[1, num_tokens]`, valid for
        any batch.
        """
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        if self.rotary is None:
            raise ValueError("re-basing positions needs the model's rotary embedding: build the cache with config=")
        ring = self.ring
        if ring is None:
            # Fresh streams start at position 0 in frame 0: nothing to book yet.
            positions = torch.arange(num_tokens).unsqueeze(0)
            device = device if device is not None else self._device()
            self._planned = positions.to(device) if device is not None else positions
            return self._planned
        out = np.empty((ring.num_streams, num_tokens), dtype=np.int64)
        for b in range(ring.num_streams):
            ring.plan(b, num_tokens, out[b])
        positions = torch.from_numpy(out)
        if device is None:
            device = self._device()
        positions = positions.to(device) if device is not None else positions
        self._planned = positions
        return positions

    def _device(self):
        for layer in self.layers:
            if layer is not None:
                return layer.device
        return None

    def _adopt_positions(self, position_ids: torch.Tensor | None, n: int) -> None:
        """Make the ring's frame match the positions the model rotated the new tokens with."""
        if position_ids is None or position_ids is self._planned:
            return
        ring = self.ring
        pos = position_ids.detach()
        if pos.ndim == 1:
            pos = pos.unsqueeze(0)
        if pos.ndim != 2 or pos.shape[-1] != n or pos.shape[0] not in (1, ring.num_streams):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not match {ring.num_streams} stream(s) of "
                f"{n} new token(s)"
            )
        pos = pos.cpu()
        first = pos[:, 0]
        if n > 1 and not torch.equal(pos - first.unsqueeze(1), torch.arange(n).expand_as(pos)):
            raise ValueError("position_ids must be consecutive within each stream (a stream has no gaps)")
        firsts = first.tolist()
        if len(firsts) == 1:
            firsts = firsts * ring.num_streams
        for b, p in enumerate(firsts):
            if p != ring.next_position(b):
                if self.rotary is None:
                    raise ValueError(
                        f"stream {b}: the model used position {p}, the cache expected {ring.next_position(b)}; "
                        "moving the frame needs the model's rotary embedding: build the cache with config="
                    )
                ring.adopt(b, int(p))

    # ---- the per-forward step --------------------------------------------------------------------------------------
    def begin_step(self, key_states: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Book the new tokens in the ring; called once per forward, by the first layer, before any write."""
        batch, _, n, _ = key_states.shape
        ring = self.ring if self.ring is not None else self._make_ring(batch)
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
        self._adopt_positions(position_ids, n)
        self._planned = None

        step = _Step()
        step.n = n
        step.layers_done = 0
        if n == 1:
            step.first_token = None
            step.slot = ring.step()
            out = self._out
            step.slots = out["slot"].tolist()
            step.occupied = int(out["occupied"].max())
            sink_shift = out["sink_shift"].tolist()
            pending = out["pending_shift"].tolist()
            tokens = [ring.seen(b) - 1 for b in range(ring.num_streams)]
        else:
            first = ring.seen(0)
            pending = [ring.take_pending_shift(b) for b in range(ring.num_streams)]
            for b in range(ring.num_streams):
                ring.append(b, n)
            step.first_token = first
            step.slot = first  # slots first..first+n-1: no wrap before the cache is full
            step.slots = None
            step.occupied = first + n
            sink_shift = [ring.sink_shift(b) for b in range(ring.num_streams)]
            tokens = [first + n - 1] * ring.num_streams
        step.sink_shift = sink_shift
        # Sinks written this step, per stream: (token index, frame base at the write).
        step.sink_writes = [
            (b, t, ring.frame_base(b)) for b in range(ring.num_streams) for t in
            (range(step.first_token, min(step.first_token + n, self.num_sinks)) if n > 1 else [tokens[b]])
            if t < self.num_sinks
        ]
        step.sink_cos = step.sink_sin = None
        step.rebase = pending if any(pending) else None
        step.rebase_cos = step.rebase_sin = None
        self._step = step

    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
               position_ids: torch.Tensor | None = None):
        """Write the new keys/values of `layer_idx` in place and return the keys/values to attend to.

        `position_ids` (read by layer 0 only): the positions the model rotated the new tokens with, when known;
        None means the ones the cache expects (`next_position`).

        Returns views `[batch, kv_heads, occupied, head_dim]` of the buffers: the sinks (rotated for this step) and the
        window, in slot order. The order is free: a single query needs no mask, and a chunk only happens before the
        cache is full, when slot order is arrival order.
        """
        if layer_idx == 0:
            self.begin_step(key_states, position_ids)
        step = self._step
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
        S = self.num_sinks
        n = step.n

        if step.rebase is not None:
            self._rebase_window(layer, step)

        if n == 1 and step.slot >= 0:
            s = step.slot
            layer.keys[:, :, s].copy_(key_states[:, :, 0])
            layer.values[:, :, s].copy_(value_states[:, :, 0])
        elif n == 1:
            for b, s in enumerate(step.slots):
                layer.keys[b, :, s].copy_(key_states[b, :, 0])
                layer.values[b, :, s].copy_(value_states[b, :, 0])
        else:
            first = step.first_token
            layer.keys[:, :, first:first + n].copy_(key_states)
            layer.values[:, :, first:first + n].copy_(value_states)

        if step.sink_writes:
            self._store_sinks(layer, step, key_states)
        if S:
            self._place_sinks(layer, step)

        step.layers_done += 1
        occ = step.occupied
        return layer.keys[:, :, :occ], layer.values[:, :, :occ]

    # ---- rotations -------------------------------------------------------------------------------------------------
    def _rebase_window(self, layer: KVLayer, step: _Step) -> None:
        """The frame moved by `step.rebase[b]` for stream b: rotate stored window keys back by that much."""
        rot = self.rotary.rotary_dim
        if step.rebase_cos is None:
            shifts = torch.tensor([-d for d in step.rebase], dtype=torch.int64)
            cos, sin = self.rotary.cos_sin(shifts, layer.dtype, layer.device)
            step.rebase_cos, step.rebase_sin = cos[:, None, None, :], sin[:, None, None, :]
        S = self.num_sinks
        window_keys = layer.keys[:, :, S:, :rot]
        rotate_inplace(window_keys, step.rebase_cos, step.rebase_sin, layer.scratch)

    def _store_sinks(self, layer: KVLayer, step: _Step, key_states: torch.Tensor) -> None:
        """Keep a pristine copy of new sink keys, rotated to their in-cache positions (the model rotated token t at
        t - frame_base)."""
        for b, token, frame_base in step.sink_writes:
            src = key_states[b, :, token - step.first_token] if step.n > 1 else key_states[b, :, 0]
            dst = layer.sink_store[b, :, token]
            if frame_base == 0:
                dst.copy_(src)
            else:
                cos, sin = self.rotary.cos_sin(torch.tensor([frame_base]), layer.dtype, layer.device)
                dst.copy_(src)
                rot = self.rotary.rotary_dim
                rotate_inplace(dst[None, :, :rot], cos, sin, layer.scratch[b, :, :1, :].transpose(0, 1))
            # The buffer's sink slot now holds the key in the current frame, not rotated by the layer's sink shift.
            layer.sink_shift = None

    def _place_sinks(self, layer: KVLayer, step: _Step) -> None:
        """Rotate the sinks into the buffer for this step's query, unless they already sit there."""
        if layer.sink_shift == step.sink_shift:
            return
        occupied_sinks = min(self.num_sinks, step.occupied)
        if occupied_sinks == 0:
            return
        if step.sink_cos is None:
            cos, sin = self.rotary.cos_sin(torch.tensor(step.sink_shift, dtype=torch.int64), layer.dtype,
                                           layer.device)
            step.sink_cos, step.sink_sin = cos[:, None, None, :], sin[:, None, None, :]
        rot = self.rotary.rotary_dim
        rotate_into(layer.keys[:, :, :occupied_sinks, :rot], layer.sink_store[:, :, :occupied_sinks, :rot],
                    step.sink_cos, step.sink_sin)
        if rot < layer.keys.shape[-1]:
            layer.keys[:, :, :occupied_sinks, rot:].copy_(layer.sink_store[:, :, :occupied_sinks, rot:])
        layer.sink_shift = list(step.sink_shift)
