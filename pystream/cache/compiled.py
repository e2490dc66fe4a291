"""The compiled decode step of a streaming cache: the tensor half of a `StreamingKV` step, with fixed shapes and no
host synchronisation, for `torch.compile` (inductor on a CPU, CUDA graphs on a GPU).

Split of one decode step:
- outside the compiled region (`StaticDecodeState.prepare`): the C++ ring books the token (slot, sink shift,
  positions, re-base), a re-base rotates the stored window keys eagerly (once per `rebase_interval` tokens), and the
  step's slot, positions, attention mask and sink rotation (cos/sin) are copied into tensors allocated once;
- inside (`StaticDecodeState.update`, called by the model's attention for every layer): `index_copy_` of the new
  key/value at the slot tensor, the sinks rotated into place from their pristine copies with the static cos/sin, and
  the whole buffer returned (unoccupied or invalid slots are masked by the static mask), so every step has the same
  shapes and reads no Python number that changes.

Nothing here imports transformers: the `Cache` the model is handed is `pystream.cache.hf.CompiledStreamingCache`.
"""

from __future__ import annotations

import time

import torch

from .kv import StreamingKV
from .rope import persistent

__all__ = ["StaticDecodeState", "CompiledDecoder", "compile_options", "CompileUnsupported"]


class CompileUnsupported(ValueError):
    """A cache state or kind the compiled step cannot serve (the message says which)."""


def compile_options(device) -> dict:
    """`torch.compile` keyword arguments for a device: CUDA graphs ("reduce-overhead") where the device has them, the
    default inductor mode elsewhere (on a CPU there is no launch overhead for graphs to remove)."""
    kind = torch.device(device).type
    options = {"fullgraph": True, "dynamic": False}
    if kind == "cuda":
        options["mode"] = "reduce-overhead"
    return options


def _mark_static(tensor: torch.Tensor) -> None:
    # CUDA graphs replay fixed addresses: tensors mutated in the graph must be known as static or cudagraphs are
    # skipped (transformers' StaticCache does the same for its buffers).
    if tensor.device.type == "cuda":
        torch._dynamo.mark_static_address(tensor)


class StaticDecodeState:
    """The static tensors a compiled decode step reads, and the per-step work that fills them.

    `kv`: the `StreamingKV` of a `SinkCache`/`WindowCache` built with the model's config (positions need its RoPE).
    `mask_dtype`: torch.bool for sdpa-style masks (True = attend), a float dtype for additive masks (eager attention).
    """

    def __init__(self, kv: StreamingKV, mask_dtype: torch.dtype = torch.bool):
        if kv.logical_order:
            raise CompileUnsupported("the compiled decode step serves RoPE models; ALiBi caches (BLOOM, MPT) gather "
                                     "their keys in logical order every step and stay eager")
        if kv.rotary is None:
            raise CompileUnsupported("the compiled decode step needs the cache's positions: build it with config=")
        self.kv = kv
        self.mask_dtype = mask_dtype
        self.ready = False
        self._mask_full = False  # the mask allows every slot (the steady state): nothing to copy per step
        # A deliberately broken variant for the tests that show the exactness check can fail (never set otherwise).
        self._skip = frozenset()

    # ---- allocation (once, after the cache holds its sinks) ------------------------------------------------------
    @persistent
    def _allocate(self):
        kv = self.kv
        layer0 = kv.layers[0]
        batch, device, dtype = layer0.keys.shape[0], layer0.device, layer0.dtype
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.mask = torch.zeros(batch, 1, 1, kv.capacity, dtype=self.mask_dtype, device=device)
        self._mask_host = torch.zeros(batch, kv.capacity, dtype=torch.bool)
        rot = kv.rotary.rotary_dim
        self.sink_cos = torch.ones(batch, 1, 1, rot, dtype=dtype, device=device)
        self.sink_sin = torch.zeros(batch, 1, 1, rot, dtype=dtype, device=device)
        self.sink_slots = torch.arange(kv.num_sinks, device=device)
        for tensor in (self.slot, self.positions, self.mask, self.sink_cos, self.sink_sin, self.sink_slots):
            _mark_static(tensor)
        for layer in kv.layers:
            for tensor in (layer.keys, layer.values, layer.sink_store, layer.sink_swapped):
                if tensor is not None:
                    _mark_static(tensor)
        self.ready = True

    def can_compile_next(self) -> bool:
        """Whether the next token can take the compiled step: every layer allocated, every stream past its sinks (the
        first S tokens store pristine sink copies, an eager step), streams of equal length."""
        kv = self.kv
        ring = kv.ring
        if ring is None or not kv.layers or any(layer is None for layer in kv.layers):
            return False
        seen = {ring.seen(b) for b in range(ring.num_streams)}
        return len(seen) == 1 and min(seen) >= kv.num_sinks

    # ---- outside the compiled region: book the token, fill the static tensors ------------------------------------
    def prepare(self) -> torch.Tensor:
        """Book the next token in the ring and fill the static tensors; returns the static positions tensor."""
        kv = self.kv
        if not self.ready:
            self._allocate()
        planned = kv.position_ids(1)  # the ring plans the positions (and any re-base) as in the eager step
        ring = kv.ring
        step = kv._book_token(ring)
        if step.slot < 0 or step.sink_writes:
            raise CompileUnsupported("the compiled step needs every stream past its sinks and at the same length")
        if kv._valid is not None:
            kv._refill_after_fast_forward(step)
        kv._planned, kv._step = None, step
        step.layers_done = len(kv.layers)
        if "positions" not in self._skip:
            self.positions.copy_(planned)
        if step.rebase is not None and "rebase" not in self._skip:
            for layer in kv.layers:  # rare: the frame moved; the window keys follow it, eagerly
                kv._rebase_window(layer, step)
        if "slot" not in self._skip:
            self.slot.fill_(step.slot)
        self._fill_mask(step)
        if kv.num_sinks and "sinks" not in self._skip:
            cos, sin = kv._angles(kv.layers[0], "sink")(step.sink_shift)
            self.sink_cos.copy_(cos)
            self.sink_sin.copy_(sin)
        for layer in kv.layers:  # the compiled step places the sinks for this shift
            layer.sink_shift = list(step.sink_shift)
        return self.positions

    def _fill_mask(self, step) -> None:
        """Slots the query may attend to: the occupied ones (and after a fast-forward only those rewritten since)."""
        kv = self.kv
        full = step.occupied == kv.capacity and kv._valid is None
        if full and self._mask_full:
            return
        host = self._mask_host
        host.zero_()
        if kv._valid is not None:
            host[:] = kv._valid.to("cpu")
            host[:, step.slot] = True
        else:
            host[:, :step.occupied] = True
        if self.mask_dtype == torch.bool:
            self.mask.view_as(host).copy_(host)
        else:  # additive: 0 where attended, the dtype's lowest value elsewhere
            additive = torch.zeros(host.shape, dtype=self.mask_dtype)
            additive.masked_fill_(~host, torch.finfo(self.mask_dtype).min)
            self.mask.view_as(additive).copy_(additive)
        self._mask_full = full

    # ---- inside the compiled region -------------------------------------------------------------------------------
    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """One layer's decode-step update with fixed shapes: write at the slot tensor, place the sinks, return the
        whole buffer (the static mask hides what may not be attended to)."""
        layer = self.kv.layers[layer_idx]
        layer.keys.index_copy_(2, self.slot, key_states)
        layer.values.index_copy_(2, self.slot, value_states)
        if layer.sink_swapped is not None:
            # Written through index_copy_ into the whole buffer, like the new token: a copy into a slice view
            # compiles to a scatter over the whole buffer (functionalisation), an O(capacity) copy per layer.
            rot = layer.sink_swapped.shape[-1]
            store = layer.sink_store
            rotated = store[..., :rot] * self.sink_cos + layer.sink_swapped * self.sink_sin
            if rot < store.shape[-1]:  # partial rotary (GPT-NeoX): the rest of the head as stored
                rotated = torch.cat((rotated, store[..., rot:]), dim=-1)
            layer.keys.index_copy_(2, self.sink_slots, rotated)
        return layer.keys, layer.values


class CompiledDecoder:
    """One decode step (`decoder(input_ids) -> logits [batch, 1, vocab]`) through a compiled forward.

    `forward(input_ids)`: the model step to compile (reads the static tensors `prepare` fills); `prepare()`: the
    bookkeeping outside the compiled region, or None (transformers' StaticCache keeps its own position tensor);
    `eager(input_ids)`: the same step uncompiled, taken while `can_compile()` says no (the first S tokens of a stream,
    a ragged batch). `compile_s`: the seconds of the first two compiled steps (compiling, and with CUDA graphs
    recording the graph on the second), which drivers keep apart from the timed steps. A later recompilation (a
    guard that fails, e.g. another batch size) is not in it.

    On a GPU with CUDA graphs the returned logits live in the graph's output buffer: read them before the next step.
    """

    def __init__(self, forward, device, *, prepare=None, eager=None, can_compile=None):
        self.device = torch.device(device)
        self.options = compile_options(self.device)
        self._compiled = torch.compile(forward, **self.options)
        self._prepare, self._eager, self._can_compile = prepare, eager, can_compile
        self.compile_s = 0.0
        self.compiled_steps = self.eager_steps = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._can_compile is not None and not self._can_compile():
            self.eager_steps += 1
            return self._eager(input_ids)
        if self._prepare is not None:
            self._prepare()
        if self.compiled_steps < 2:  # the first call compiles; CUDA graphs record on a later one
            start = time.perf_counter()
            logits = self._compiled(input_ids)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_s += time.perf_counter() - start
        else:
            logits = self._compiled(input_ids)
        self.compiled_steps += 1
        return logits
