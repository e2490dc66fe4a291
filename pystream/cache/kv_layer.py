"""One layer's preallocated buffers of a `StreamingKV`."""

from __future__ import annotations

import torch

from .rope import persistent


def out_pass_needed(layer, rot: int) -> bool:
    return rot < layer.keys.shape[-1]


class KVLayer:
    """One layer's buffers. `keys`/`values`: `[batch, kv_heads, capacity, head_dim]`, allocated once, written in
    place. `sink_store`: `[batch, kv_heads, num_sinks, head_dim]`, the sink keys rotated at positions 0..S-1."""

    @persistent
    def __init__(self, kv, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
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
