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

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function

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
        # float64: the angle is exact to ~1e-16 of the shift, far below float32 rounding for the shifts the cache
        # uses (small with its own positions); reducing it before the cast keeps sin/cos of large angles exact.
        angles = torch.remainder(angles, 2 * math.pi)
        return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)

    def full_cos_sin(self, shifts: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """The full-width tables `rotate_into` / `rotate_inplace` take: `cat(cos, cos)` and `cat(-sin, sin)`,
        `[*shifts.shape, rotary_dim]`."""
        cos, sin = self.cos_sin(shifts, dtype, device)
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


# Buffers that outlive one forward are made outside inference mode: tensors made inside it could never again be
# written outside it (a user may switch between inference_mode and no_grad), while normal tensors can be written in
# both.
_persistent = torch.inference_mode(False)
_NO_RANGE = contextlib.nullcontext()


def rotate_into(out: torch.Tensor, src: torch.Tensor, src_swapped: torch.Tensor, cos: torch.Tensor,
                sin_signed: torch.Tensor) -> None:
    """out = RoPE-rotate(src), in two ops and no allocation.

    Rotate-half RoPE maps [x1, x2] to [x1 cos - x2 sin, x2 cos + x1 sin], which is
    src * cat(cos, cos) + cat(x2, x1) * cat(-sin, sin): with `src_swapped` = cat(x2, x1) kept beside `src`, and the
    full-width `cos` and `sin_signed` tables, one multiply and one multiply-add do it.
    `src`, `src_swapped`, `out`: `[..., rotary_dim]`, `out` not overlapping the others.
    """
    torch.mul(src, cos, out=out)
    out.addcmul_(src_swapped, sin_signed)


def rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, scratch: torch.Tensor) -> None:
    """x = RoPE-rotate(x) in place (full-width tables as for `rotate_into`); `scratch` is shaped like
    `x[..., :rotary_dim // 2]`."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin_signed[..., half:]
    x1, x2 = x[..., :half], x[..., half:]
    scratch.copy_(x1)
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).addcmul_(scratch, sin)


class RotationAngles:
    """Full-width rotation tables for `shift * inv_freq` per stream, `cat(cos, cos)` and `cat(-sin, sin)`, each
    `[batch or 1, 1, 1, rotary_dim]` in the model's dtype and device (see `rotate_into`), from buffers allocated once:
    the decode step allocates nothing.

    Shifts in [0, table_size) shared by every stream (the common case with the cache's own positions) are views of a
    precomputed table; others are computed in float64 on the CPU into preallocated buffers, then copied over.
    """

    @_persistent
    def __init__(self, rotary: RotarySpec, batch: int, dtype: torch.dtype, device: torch.device, table_size: int):
        half = rotary.rotary_dim // 2
        self.inv_freq = rotary.inv_freq.to(torch.float64)
        self.shift = torch.zeros(batch, 1, dtype=torch.float64)
        self.shift_np = self.shift.numpy()[:, 0]
        self.angle = torch.empty(batch, half, dtype=torch.float64)
        # cos/sin in float64 land here first: an out= of another dtype would make a temporary every call.
        self.cos64, self.sin64 = torch.empty_like(self.angle), torch.empty_like(self.angle)
        self.cos = torch.empty(batch, 1, 1, 2 * half, dtype=dtype, device=device)
        self.sin = torch.empty_like(self.cos)
        # Assembled on the host in the model's dtype, then one contiguous copy each: a copy into a strided slice of a
        # GPU tensor, or one that converts dtypes on the way, would allocate a temporary on the device every call.
        on_host = torch.device(device).type == "cpu"
        self.cos_host = self.cos.view(batch, 2 * half) if on_host else torch.empty(batch, 2 * half, dtype=dtype)
        self.sin_host = self.sin.view(batch, 2 * half) if on_host else torch.empty(batch, 2 * half, dtype=dtype)
        table_cos, table_sin = rotary.full_cos_sin(torch.arange(table_size), dtype, device)
        self.table_cos, self.table_sin = table_cos[:, None, None, :], table_sin[:, None, None, :]
        self.table_size = table_size
        self.half = half

    def __call__(self, shifts: list[int]):
        first = shifts[0]
        if 0 <= first < self.table_size and all(v == first for v in shifts):
            return self.table_cos[first:first + 1], self.table_sin[first:first + 1]
        self.shift_np[:] = shifts
        torch.mul(self.shift, self.inv_freq, out=self.angle)
        torch.remainder(self.angle, 2 * math.pi, out=self.angle)
        half = self.half
        torch.cos(self.angle, out=self.cos64)
        torch.sin(self.angle, out=self.sin64)
        self.cos_host[:, :half].copy_(self.cos64)
        self.cos_host[:, half:].copy_(self.cos64)
        self.sin_host[:, half:].copy_(self.sin64)
        torch.neg(self.sin_host[:, half:], out=self.sin_host[:, :half])
        if self.cos_host.data_ptr() != self.cos.data_ptr():
            # From pageable host memory: the copy has read the host buffer when it returns, so the next call may
            # overwrite it right away.
            self.cos.view_as(self.cos_host).copy_(self.cos_host, non_blocking=True)
            self.sin.view_as(self.sin_host).copy_(self.sin_host, non_blocking=True)
        return self.cos, self.sin


def out_pass_needed(layer, rot: int) -> bool:
    return rot < layer.keys.shape[-1]


class KVLayer:
    """One layer's buffers. `keys`/`values`: `[batch, kv_heads, capacity, head_dim]`, allocated once, written in
    place. `sink_store`: `[batch, kv_heads, num_sinks, head_dim]`, the sink keys rotated at positions 0..S-1."""

    @_persistent
    def __init__(self, kv: "StreamingKV", layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, heads, _, head_dim = key_states.shape
        cap, sinks = kv.capacity, kv.num_sinks
        self.layer_idx = layer_idx
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = torch.zeros(batch, heads, cap, head_dim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(
            batch, heads, cap, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device
        )
        self.sink_store = self.keys.new_zeros(batch, heads, sinks, head_dim) if sinks and kv.rotary else None
        self.ordered = (torch.empty_like(self.keys), torch.empty_like(self.values)) if kv.logical_order else None
        rot = kv.rotary.rotary_dim if kv.rotary is not None else 0
        # cat(x2, x1) of each stored sink's rotated part, so that placing the sinks takes two ops (rotate_into).
        self.sink_swapped = self.keys.new_zeros(batch, heads, sinks, rot) if sinks and rot else None
        # Views the steady-state step uses every time, made once.
        if self.sink_swapped is not None:
            partial = rot < head_dim
            self.sink_views = (self.keys[:, :, :sinks, :rot], self.sink_store[:, :, :sinks, :rot], self.sink_swapped,
                               self.keys[:, :, :sinks, rot:] if partial else None,
                               self.sink_store[:, :, :sinks, rot:] if partial else None)
        # The sink shift the buffer's sink slots are rotated by, per stream; None: unknown (rotate next time).
        self.sink_shift: list[int] | None = [0] * batch
        # Scratch for in-place rotations (re-base of the window, sinks written in a shifted frame).
        rot_half = kv.rotary.rotary_dim // 2 if kv.rotary is not None else 0
        self.scratch = self.keys.new_empty(batch, heads, kv.window, rot_half) if rot_half else None

    @property
    def nbytes(self) -> int:
        total = self.keys.nbytes + self.values.nbytes
        total += self.sink_store.nbytes if self.sink_store is not None else 0
        total += self.sink_swapped.nbytes if self.sink_swapped is not None else 0
        total += sum(t.nbytes for t in self.ordered) if self.ordered is not None else 0
        total += self.scratch.nbytes if self.scratch is not None else 0
        return total


class _Step:
    """What the ring decided for the tokens of the current forward; shared by every layer."""

    __slots__ = ("n", "first_token", "slot", "slots", "occupied", "sink_shift", "sink_cos", "sink_sin",
                 "rebase", "rebase_cos", "rebase_sin", "sink_writes", "layers_done", "order", "valid_index")

    def __init__(self):
        self.sink_cos = self.sink_sin = self.rebase_cos = self.rebase_sin = self.valid_index = None


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
        self.ring: SinkRing | None = None
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

    # ---- the ring --------------------------------------------------------------------------------------------------
    def _make_ring(self, batch_size: int) -> SinkRing:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.ring = SinkRing(batch_size, self.num_sinks, self.window, self.rebase_interval)
        # Read-only views of the arrays the ring owns and each step() overwrites (slot, sink_shift, pending_shift,
        # occupied): the core never writes into memory of ours.
        self._out = self.ring.outputs
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

    # ---- stream control ------------------------------------------------------------------------------------------
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

    @_persistent
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
        if shift and not rot:
            raise ValueError("moving the window needs the model's rotary embedding: build the cache with config=")
        for layer in self.layers:
            if layer is None:
                continue
            index_old, index_new = old_slots.to(layer.device), new_slots.to(layer.device)
            keys = layer.keys.index_select(2, index_old)
            values = layer.values.index_select(2, index_old)
            if shift:
                full_cos, full_sin = self.rotary.full_cos_sin(torch.tensor([shift]), layer.dtype, layer.device)
                rotate_inplace(keys[..., :rot], full_cos, full_sin, torch.empty_like(keys[..., : rot // 2]))
            layer.keys.index_copy_(2, index_new, keys)
            layer.values.index_copy_(2, index_new, values)

    @_persistent
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

    @_persistent
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
                self._fill_swapped(layer.sink_swapped, layer.sink_store)
            layer.sink_shift = None if sink_shift is None else list(sink_shift)
        self._valid = None if snapshot.get("valid") is None else snapshot["valid"].clone()
        self._planned = self._step = None

    def _fill_swapped(self, swapped: torch.Tensor, store: torch.Tensor) -> None:
        """swapped = cat(x2, x1) of the rotated part of `store` (see `rotate_into`)."""
        half = self.rotary.rotary_dim // 2
        swapped[..., :half].copy_(store[..., half:2 * half])
        swapped[..., half:].copy_(store[..., :half])

    # ---- positions -------------------------------------------------------------------------------------------------
    def position_ids(self, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Model positions `[batch, num_tokens]` for the next tokens, kept below S + W - 1 + rebase_interval.

        Pass them as `position_ids=` to the model: the paper's positions-inside-the-cache at float32-exact angles,
        however long the stream. Before the first forward (no streams yet) they are `[1, num_tokens]`, valid for
        any batch.
        """
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        if self.logical_order:
            raise ValueError("this model takes no positions (ALiBi biases come from the order of the keys)")
        if self.rotary is None:
            raise ValueError("re-basing positions needs the model's rotary embedding: build the cache with config=")
        ring = self.ring
        if ring is None:
            # Fresh streams start at position 0 in frame 0: nothing to book yet.
            positions = torch.arange(num_tokens).unsqueeze(0)
            device = device if device is not None else self._device()
            self._planned = positions.to(device) if device is not None else positions
            return self._planned
        if device is None:
            device = self._device()
        if num_tokens == 1:
            # The decode step reuses one buffer (a tensor from an earlier step is overwritten: use it right away).
            host, on_device, host_np, copied = self._decode_positions(ring.num_streams, device)
            if copied is not None:
                # The last step's copy out of this pinned buffer runs asynchronously: it must have read the buffer
                # before the ring writes the next positions into it (no-op once the GPU has caught up).
                copied.synchronize()
        else:
            host = torch.empty(ring.num_streams, num_tokens, dtype=torch.int64)
            on_device, host_np, copied = None, host.numpy(), None
        for b in range(ring.num_streams):
            ring.plan(b, num_tokens, host_np[b])
        if on_device is None:
            positions = host.to(device) if device is not None else host
        elif on_device is host:
            positions = host
        else:
            positions = on_device.copy_(host, non_blocking=True)
            if copied is not None:
                copied.record()
        self._planned = positions
        return positions

    def _decode_positions(self, streams: int, device):
        key = (streams, None if device is None else str(device))
        buffers = self._position_buffers.get(key)
        if buffers is None:
            buffers = self._make_decode_positions(key, streams, device)
        return buffers

    @_persistent
    def _make_decode_positions(self, key, streams: int, device):
        host = torch.empty(streams, 1, dtype=torch.int64)
        on_device = host if device is None or torch.device(device).type == "cpu" else \
            torch.empty(streams, 1, dtype=torch.int64, device=device)
        copied = None
        if on_device is not host and on_device.device.type == "cuda":
            host, copied = host.pin_memory(), torch.cuda.Event()
        buffers = self._position_buffers[key] = (host, on_device, host.numpy(), copied)
        return buffers

    def _device(self):
        for layer in self.layers:
            if layer is not None:
                return layer.device
        return self.device

    def _adopt_positions(self, position_ids: torch.Tensor | None, n: int) -> None:
        """Make the ring's frame match the positions the model rotated the new tokens with."""
        if position_ids is None or position_ids is self._planned or self.logical_order:
            return
        ring = self.ring
        streams = ring.num_streams
        if position_ids.ndim == 1:
            position_ids = position_ids.unsqueeze(0)
        rows = position_ids.shape[0]
        if position_ids.ndim != 2 or position_ids.shape[-1] != n or rows not in (1, streams):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not match {streams} stream(s) of "
                f"{n} new token(s)"
            )
        values = position_ids.tolist()  # a handful of ints: no tensor is made
        for row in values:
            if row != list(range(row[0], row[0] + n)):
                raise ValueError("position_ids must be consecutive within each stream (a stream has no gaps)")
        for b in range(streams):
            p = values[b if rows > 1 else 0][0]
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
        if self._valid is not None and (n > 1 or len({ring.seen(b) for b in range(ring.num_streams)}) > 1):
            raise ValueError("after fast_forward, feed every stream the same tokens one at a time until the window "
                             "is refilled")
        self._adopt_positions(position_ids, n)
        self._planned = None

        step = _Step()
        step.n = n
        step.layers_done = 0
        S = self.num_sinks
        if n == 1:
            step.first_token = None
            step.slot = slot = ring.step()
            out = self._out
            step.slots = slots = out["slot"].tolist()
            step.occupied = int(out["occupied"].max())
            sink_shift = out["sink_shift"].tolist()
            pending = out["pending_shift"].tolist()
            # Sink slots hold sink tokens only, and token t < S goes to slot t.
            step.sink_writes = [(b, s, ring.frame_base(b)) for b, s in enumerate(slots) if s < S] \
                if S and (slot < 0 or slot < S) else None
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
            # Sinks written this step, per stream: (token index, frame base at the write).
            step.sink_writes = [(b, t, ring.frame_base(b)) for b in range(ring.num_streams)
                                for t in range(first, min(first + n, S))] or None
        step.sink_shift = sink_shift
        step.rebase = pending if any(pending) else None
        step.order = self._order_index(step) if self.logical_order and step.occupied == self.capacity else None
        if self._valid is not None:  # refilling the window after a fast-forward: this step's slot joins the valid
            self._valid[step.slot] = True
            if bool(self._valid.all()):
                self._valid = None
            else:
                step.valid_index = self._valid.nonzero().squeeze(1)
        self._step = step

    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
               position_ids: torch.Tensor | None = None):
        with self._range("pystream::cache_update"):
            return self._update(layer_idx, key_states, value_states, position_ids)

    def _range(self, name: str):
        """A named torch.profiler range when profiling (see pystream-bench --profile), else a no-op: ranges cost a
        few us each."""
        return record_function(name) if self.profile else _NO_RANGE

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

    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                position_ids: torch.Tensor | None = None):
        """Write the new keys/values of `layer_idx` in place and return the keys/values to attend to.

        `position_ids` (read by layer 0 only): the positions the model rotated the new tokens with, when known;
        None means the ones the cache expects (`next_position`).

        Returns views `[batch, kv_heads, occupied, head_dim]` of the buffers: the sinks (rotated for this step) and the
        window, in slot order. The order is free: a single query needs no mask, and a chunk only happens before the
        cache is full, when slot order is arrival order.
        """
        if layer_idx == 0:
            with self._range("pystream::bookkeeping"):
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
            with self._range("pystream::rerotate"):
                self._rebase_window(layer, step)

        if n == 1 and step.slot >= 0:
            layer.keys.narrow(2, step.slot, 1).copy_(key_states)
            layer.values.narrow(2, step.slot, 1).copy_(value_states)
        elif n == 1:
            for b, s in enumerate(step.slots):
                layer.keys[b, :, s].copy_(key_states[b, :, 0])
                layer.values[b, :, s].copy_(value_states[b, :, 0])
        else:
            first = step.first_token
            layer.keys[:, :, first:first + n].copy_(key_states)
            layer.values[:, :, first:first + n].copy_(value_states)

        if step.sink_writes and layer.sink_store is not None:
            self._store_sinks(layer, step, key_states)
        if S and self.rotary is not None:
            with self._range("pystream::rerotate"):
                self._place_sinks(layer, step)

        step.layers_done += 1
        if step.valid_index is not None:
            # After a fast-forward, until the window is refilled: the sinks and the slots rewritten since.
            if step.valid_index.device != layer.device:
                step.valid_index = step.valid_index.to(layer.device)
            index = step.valid_index
            return layer.keys.index_select(2, index), layer.values.index_select(2, index)
        occ = step.occupied
        if step.order is not None:
            keys, values = layer.ordered
            torch.index_select(layer.keys, 2, step.order, out=keys)
            torch.index_select(layer.values, 2, step.order, out=values)
            return keys, values
        if occ == self.capacity:  # the steady state: the whole buffer, no view to make
            return layer.keys, layer.values
        return layer.keys[:, :, :occ], layer.values[:, :, :occ]

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
            self._fill_swapped(layer.sink_swapped[b, :, token], dst)
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
