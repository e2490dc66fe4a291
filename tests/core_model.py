"""A pure-Python model of the C++ SinkRing, written from the rules rather than the formulas: each slot physically
holds a token index, a new window token takes the first empty window slot or else the slot of the oldest window
token, positions come from sorting what is held. Test code only."""

from __future__ import annotations

import copy


class PyStream:
    def __init__(self, capacity):
        self.slots = [None] * capacity  # token index held by each slot
        self.seen = 0
        self.frame_base = 0
        self.pending_shift = 0


class PyRing:
    def __init__(self, num_streams, num_sinks, window, rebase_interval):
        if num_streams < 1 or num_sinks < 0 or window < 1 or rebase_interval < 1:
            raise ValueError("bad geometry")
        self.S, self.W, self.R = num_sinks, window, rebase_interval
        self.capacity = num_sinks + window
        self.streams = [PyStream(self.capacity) for _ in range(num_streams)]

    @property
    def num_streams(self):
        return len(self.streams)

    @property
    def max_position(self):
        return self.capacity - 1 + self.R

    def _stream(self, b):
        if not 0 <= b < len(self.streams):
            raise IndexError(b)
        return self.streams[b]

    # --- one token at a time, by the rules -------------------------------------------------------------------------
    def _append_one(self, st):
        token = st.seen
        evicted = -1
        if token < self.S:
            slot = token
        else:
            window_slots = range(self.S, self.capacity)
            empty = [s for s in window_slots if st.slots[s] is None]
            if empty:
                slot = empty[0]
            else:
                slot = min(window_slots, key=lambda s: st.slots[s])
                evicted = st.slots[slot]
        st.slots[slot] = token
        st.seen += 1
        return slot, evicted

    def append(self, b, n):
        st = self._stream(b)
        if n < 0:
            raise ValueError(n)
        return [self._append_one(st) for _ in range(n)]

    def sink_shift(self, b):
        st = self._stream(b)
        last = max(st.seen - 1, 0)
        # paper: the newest token sits at in-cache position min(last, capacity-1); sink s at s. The model rotates
        # the query at last - frame_base, so sink s must be rotated to s + (last - in_cache(last)) - frame_base.
        return last - min(last, self.capacity - 1) - st.frame_base

    def step(self):
        outs = []
        for st in self.streams:
            slot, _ = self._append_one(st)
            pending = st.pending_shift
            st.pending_shift = 0
            b = self.streams.index(st)
            outs.append(dict(slot=slot, sink_shift=self.sink_shift(b), pending_shift=pending,
                             occupied=sum(s is not None for s in st.slots)))
        return outs

    def plan(self, b, n):
        st = self._stream(b)
        if n < 1:
            raise ValueError(n)
        last = st.seen + n - 1
        shift = 0
        if last - st.frame_base > self.max_position:
            new_base = min(st.seen, last - (self.capacity - 1))
            shift = new_base - st.frame_base
            st.frame_base = new_base
            st.pending_shift += shift
        return shift, [st.seen + i - st.frame_base for i in range(n)]

    def adopt(self, b, position):
        st = self._stream(b)
        if position < 0:
            raise ValueError(position)
        shift = (st.seen - position) - st.frame_base
        st.frame_base = st.seen - position
        st.pending_shift += shift
        return shift

    def take_pending_shift(self, b):
        st = self._stream(b)
        shift, st.pending_shift = st.pending_shift, 0
        return shift

    def reset(self, b):
        self.streams[b if 0 <= b < len(self.streams) else self._stream(b)] = PyStream(self.capacity)

    def fast_forward(self, b, seen):
        st = self._stream(b)
        if seen < st.seen:
            raise ValueError(seen)
        while st.seen < seen:
            self._append_one(st)
        st.frame_base = max(0, seen - (self.capacity - 1))
        st.pending_shift = 0

    def snapshot(self):
        return copy.deepcopy(self.streams)

    def restore(self, snap):
        self.streams = copy.deepcopy(snap)

    # --- views -------------------------------------------------------------------------------------------------------
    def tokens(self, b):
        return [-1 if t is None else t for t in self._stream(b).slots]

    def positions(self, b):
        st = self._stream(b)
        held = sorted((t, s) for s, t in enumerate(st.slots) if t is not None)
        pos = [-1] * self.capacity
        for rank, (_, s) in enumerate(held):
            pos[s] = rank
        return pos

    def state(self, b):
        st = self._stream(b)
        return dict(seen=st.seen, frame_base=st.frame_base, pending_shift=st.pending_shift,
                    occupied=sum(t is not None for t in st.slots), next_position=st.seen - st.frame_base,
                    sink_shift=self.sink_shift(b), tokens=self.tokens(b), positions=self.positions(b))
