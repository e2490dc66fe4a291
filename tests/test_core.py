"""The C++ core against its pure-Python model (tests/core_model.py), plus its edge cases and errors."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_model import PyRing
from pystream import SinkRing


def cpp_state(ring, b):
    cap = ring.capacity
    tokens, positions = np.empty(cap, np.int64), np.empty(cap, np.int64)
    ring.tokens(b, tokens)
    ring.positions(b, positions)
    return dict(seen=ring.seen(b), frame_base=ring.frame_base(b), pending_shift=ring.pending_shift(b),
                occupied=ring.occupied(b), next_position=ring.next_position(b), sink_shift=ring.sink_shift(b),
                tokens=tokens.tolist(), positions=positions.tolist())


STEP_OUTPUTS = ("slot", "sink_shift", "pending_shift", "occupied")


# ---- property-based: random operation sequences drive both and must leave identical states ------------------------

geometry = st.tuples(st.integers(1, 3), st.integers(0, 5), st.integers(1, 9), st.integers(1, 12))
op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 2), st.integers(0, 25)),
    st.tuples(st.just("step"), st.integers(0, 2), st.integers(1, 6)),
    st.tuples(st.just("plan"), st.integers(0, 2), st.integers(1, 20)),
    st.tuples(st.just("adopt"), st.integers(0, 2), st.integers(0, 300)),
    st.tuples(st.just("reset"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("fast_forward"), st.integers(0, 2), st.integers(0, 200)),
    st.tuples(st.just("take"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("snapshot_restore"), st.integers(0, 2), st.integers(0, 30)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry, st.lists(op, max_size=40))
def test_core_matches_python_model(geom, ops):
    streams, sinks, window, interval = geom
    cpp, py = SinkRing(streams, sinks, window, interval), PyRing(streams, sinks, window, interval)
    outs = cpp.outputs
    assert sorted(outs) == sorted(STEP_OUTPUTS)
    for name, b, n in ops:
        b %= streams
        if name == "append":
            slots, evicted = np.empty(n, np.int64), np.empty(n, np.int64)
            cpp.append(b, n, slots, evicted)
            expected = py.append(b, n)
            assert list(zip(slots.tolist(), evicted.tolist())) == expected
        elif name == "step":
            for _ in range(n):
                common = cpp.step()
                expected = py.step()
                for key in outs:
                    assert outs[key].tolist() == [e[key] for e in expected], key
                slots = {e["slot"] for e in expected}
                assert common == (slots.pop() if len(slots) == 1 else -1)
        elif name == "plan":
            got = np.empty(n, np.int64)
            shift = cpp.plan(b, n, got)
            assert (shift, got.tolist()) == py.plan(b, n)
        elif name == "adopt":
            assert cpp.adopt(b, n) == py.adopt(b, n)
        elif name == "reset":
            cpp.reset(b)
            py.reset(b)
        elif name == "fast_forward":
            target = cpp.seen(b) + n
            cpp.fast_forward(b, target)
            py.fast_forward(b, target)
        elif name == "take":
            assert cpp.take_pending_shift(b) == py.take_pending_shift(b)
        elif name == "snapshot_restore":
            saved_cpp, saved_py = cpp.snapshot(), py.snapshot()
            cpp.append(b, n)
            py.append(b, n)
            cpp.restore(saved_cpp)
            py.restore(saved_py)
        for s in range(streams):
            assert cpp_state(cpp, s) == py.state(s)


@settings(max_examples=100, deadline=None)
@given(geometry, st.integers(1, 8), st.integers(0, 400))
def test_planned_positions_stay_small_and_consecutive(geom, n, prefix):
    streams, sinks, window, interval = geom
    ring = SinkRing(1, sinks, window, interval)
    ring.append(0, prefix)
    out = np.empty(n, np.int64)
    ring.plan(0, n, out)
    assert out.tolist() == list(range(out[0], out[0] + n))
    assert out[0] >= 0
    if n <= ring.capacity:
        assert out[-1] <= ring.max_position


# ---- what the slots and positions mean -------------------------------------------------------------------------------

def test_layout_sinks_then_ring():
    ring = SinkRing(1, 2, 3, 100)
    slots = np.empty(9, np.int64)
    evicted = np.empty(9, np.int64)
    ring.append(0, 9, slots, evicted)
    assert slots.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 2]
    assert evicted.tolist() == [-1, -1, -1, -1, -1, 2, 3, 4, 5]
    tokens = np.empty(5, np.int64)
    ring.tokens(0, tokens)
    assert tokens.tolist() == [0, 1, 8, 6, 7]
    positions = np.empty(5, np.int64)
    ring.positions(0, positions)
    # sinks at 0, 1; window tokens 6, 7, 8 at 2, 3, 4 in arrival order
    assert positions.tolist() == [0, 1, 4, 2, 3]
    # the newest token (8) sits at in-cache 4 but at true distance 8 - s from sink s: sinks shift by 4
    assert ring.sink_shift(0) == 4


def test_step_fills_its_own_outputs_in_place_and_reports_common_slot():
    ring = SinkRing(2, 1, 2, 10)
    outs = ring.outputs
    assert ring.step() == 0
    assert outs["slot"].tolist() == [0, 0] and outs["occupied"].tolist() == [1, 1]
    ring.append(1, 1)  # streams now ragged
    assert ring.step() == -1
    assert outs["slot"].tolist() == [1, 2]
    again = ring.outputs  # the same memory every time: views read after any step see that step
    ring.step()
    assert again["slot"].tolist() == outs["slot"].tolist() == [2, 1]


@pytest.mark.parametrize("start", [2**32 - 3, 2**40 + 11, 2**62 + 5])
def test_positions_past_32_bits(start):
    """64-bit counters: fast-forward far, then step, and check everything against exact big-int arithmetic."""
    S, W = 4, 7
    ring = SinkRing(1, S, W, 16)
    outs = ring.outputs
    ring.fast_forward(0, start)
    assert ring.seen(0) == start
    assert ring.next_position(0) == S + W - 1  # positions are small right after a fast-forward
    for i in range(3 * W):
        token = start + i
        assert ring.next_position(0) == token - ring.frame_base(0)
        common = ring.step()
        assert common == S + (token - S) % W
        assert ring.evicted_count(0) == token + 1 - (S + W)
        assert outs["sink_shift"][0] == (token + 1 - (S + W)) - ring.frame_base(0)
        if i % 5 == 0:  # a planned position re-bases when needed and stays small
            planned = np.empty(1, np.int64)
            ring.plan(0, 1, planned)
            assert planned[0] <= ring.max_position
    tokens = np.empty(S + W, np.int64)
    ring.tokens(0, tokens)
    last = start + 3 * W - 1
    assert tokens[:S].tolist() == list(range(S))
    assert sorted(tokens[S:].tolist()) == list(range(last - W + 1, last + 1))
    positions = np.empty(S + W, np.int64)
    ring.positions(0, positions)
    for slot in range(S, S + W):
        assert positions[slot] == S + (tokens[slot] - (last - W + 1))


def test_overflow_is_refused():
    ring = SinkRing(1, 1, 1, 1)
    ring.fast_forward(0, 2**63 - 2)
    with pytest.raises(OverflowError):
        ring.append(0, 1)
    with pytest.raises(OverflowError):
        ring.step()
    assert ring.seen(0) == 2**63 - 2


# ---- errors: a clear message, the right type, and no state change ---------------------------------------------------

@pytest.mark.parametrize("args, match", [
    ((1, -1, 4, 1), "num_sinks must be >= 0"),
    ((1, 4, -2, 1), "window must be >= 0"),
    ((1, 0, 0, 1), "num_sinks \\+ window must be > 0"),
    ((1, 4, 0, 1), "window must be >= 1"),
    ((0, 4, 4, 1), "num_streams must be in 1.."),
    ((2**20 + 1, 4, 4, 1), "num_streams must be in 1.."),
    ((1, 4, 4, 0), "rebase_interval must be >= 1"),
])
def test_bad_geometry(args, match):
    with pytest.raises(ValueError, match=match):
        SinkRing(*args)


def test_errors_leave_state_unchanged():
    ring = SinkRing(2, 2, 4, 8)
    ring.append(0, 5)
    before = ring.snapshot()
    with pytest.raises(IndexError, match="unknown stream 2"):
        ring.append(2, 1)
    with pytest.raises(IndexError, match="unknown stream -1"):
        ring.seen(-1)
    with pytest.raises(ValueError, match="negative number of tokens"):
        ring.append(0, -1)
    with pytest.raises(TypeError, match="dtype int64"):
        ring.append(0, 3, np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="contiguous"):
        ring.append(0, 3, np.zeros(6, np.int64)[::2])
    with pytest.raises(TypeError, match="read-only"):
        ro = np.zeros(3, np.int64)
        ro.flags.writeable = False
        ring.append(0, 3, ro)
    with pytest.raises(TypeError, match="1-D"):
        ring.append(0, 3, np.zeros((3, 1), np.int64))
    with pytest.raises(ValueError, match="must have 3 elements"):
        ring.append(0, 3, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="int64 array"):
        ring.append(0, 3, [0, 0, 0])
    with pytest.raises(ValueError, match="cannot go back"):
        ring.fast_forward(0, 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        ring.adopt(0, -5)
    with pytest.raises(IndexError, match="slot 6 is outside"):
        ring.token_in_slot(0, 6)
    with pytest.raises(ValueError, match="n >= 1"):
        ring.plan(0, 0)
    with pytest.raises(ValueError, match="geometry"):
        ring.restore(SinkRing(2, 2, 5, 8).snapshot())
    with pytest.raises(ValueError, match="bad magic"):
        ring.restore(b"\0" * len(before))
    with pytest.raises(ValueError, match="too short"):
        ring.restore(b"abc")
    assert ring.snapshot() == before


def test_bad_output_array_is_refused():
    ring = SinkRing(2, 1, 2, 4)
    with pytest.raises(ValueError, match="must have 3 elements"):
        ring.plan(0, 3, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="CPU|int64"):
        ring.plan(0, 2, torch.zeros(2, dtype=torch.float32))
    assert ring.snapshot() == SinkRing(2, 1, 2, 4).snapshot()


# ---- memory safety (issue 16): the core never writes into memory it does not own ------------------------------------

def test_binding_caller_arrays_for_step_is_gone():
    """The use-after-free of issue 16: `bind_outputs(slot=t); t.resize_(10**6); step()` wrote into freed memory.
    The ring now owns its step outputs; there is nothing to bind."""
    ring = SinkRing(2, 4, 12, 16)
    assert not hasattr(ring, "bind_outputs") and not hasattr(ring, "unbind_outputs")


def test_step_outputs_cannot_be_resized_or_freed_under_the_ring():
    """The issue's reproducer, on what replaced `bind_outputs`: the views of the ring's outputs (numpy, or torch
    tensors made from them without a copy) refuse to be resized, and keep the ring alive after it is dropped."""
    ring = SinkRing(2, 4, 12, 16)
    outs = ring.outputs
    with pytest.raises(ValueError, match="does not own its data"):
        outs["slot"].resize(10**6, refcheck=False)
    with pytest.raises(ValueError, match="read-only"):
        outs["slot"][0] = 5
    with pytest.warns(UserWarning, match="not writable"):  # torch says so, and shares the memory
        t, victim = torch.as_tensor(outs["slot"]), torch.as_tensor(outs["slot"])
    with pytest.raises(RuntimeError, match="not resizable"):
        victim.resize_(10**6)
    # torch 2.13 leaves the refused tensor claiming the new size (its bug, not ours): never read `victim` again
    del victim
    for i in range(1000):
        ring.step()
    assert t.tolist() == outs["slot"].tolist() == [4 + (1000 - 1 - 4) % 12] * 2
    assert outs["occupied"].tolist() == [16, 16]
    del ring  # the views own a reference to the ring: its arrays stay alive and unchanged
    import gc
    gc.collect()
    assert outs["occupied"].tolist() == [16, 16] and t.tolist() == outs["slot"].tolist()


class _FreshEachTime:
    """An array whose export hands out a tensor nothing else holds: the exporter's reference is the only one."""

    def __init__(self, n):
        self.n = n

    def __dlpack__(self, *args, **kwargs):
        return torch.full((self.n,), -7, dtype=torch.int64).__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return torch.zeros(1).__dlpack_device__()


class _ResizesOnExport:
    """An array whose export resizes another tensor (a second argument of the same call) before exporting."""

    def __init__(self, victim, n):
        self.victim, self.target = victim, torch.zeros(n, dtype=torch.int64)

    def __dlpack__(self, *args, **kwargs):
        self.victim.resize_(10**6)  # reallocates: the victim's old storage is freed here
        return self.target.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.target.__dlpack_device__()


def test_call_arrays_are_written_only_while_held():
    """An array passed to a call is written while the binding holds the exporter's reference, and before any other
    argument's export runs Python code. The old binding let go of the export first (a write into freed memory when
    the export held the only reference) and took both pointers before writing (the second export could free the
    first array): ASan reports both on the old code (`bash .ci/sanitize`); here they must be clean and defined."""
    ring = SinkRing(1, 2, 3, 8)
    ring.append(0, 4, _FreshEachTime(4), _FreshEachTime(4))
    ring.plan(0, 2, _FreshEachTime(2))
    ring.positions(0, _FreshEachTime(5))
    ring.tokens(0, _FreshEachTime(5))
    slots = torch.zeros(4, dtype=torch.int64)
    hostile = _ResizesOnExport(slots, 4)
    ring.append(0, 4, slots, hostile)
    # slots was filled before the second export resized it; the resize kept the filled prefix
    assert slots[:4].tolist() == [4, 2, 3, 4] and hostile.target.tolist() == [-1, 2, 3, 4]
    assert ring.seen(0) == 8


# ---- bounded work (issue 16): a count larger than the window costs O(1), not O(count) -------------------------------

HANG_CHECK = """
from pystream import SinkRing
ring = SinkRing(1, 4, 12, 16)
ring.append(0, 10**12)
ring.plan(0, 10**12)
ring.fast_forward(0, 2**62)
ring.append(0, 2**62 - 10)
print(ring.seen(0), ring.occupied(0), ring.evicted_count(0))
"""


def test_huge_counts_do_not_loop():
    """The old append looped over every token with the GIL held (10**12 tokens: hours, deaf to Ctrl-C). Run in a
    subprocess so that a regression fails on the timeout (a hang detector, far above the microseconds it takes)
    instead of hanging the suite."""
    import os
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", HANG_CHECK], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    seen = 2**62 + 2**62 - 10
    assert done.stdout.split() == [str(seen), "16", str(seen - 16)]


@settings(max_examples=100, deadline=None)
@given(geometry, st.integers(0, 60), st.integers(0, 10**6))
def test_huge_append_matches_stepping_by_the_window(geom, prefix, n):
    """append(n) for any n leaves the state of appending the same tokens one window at a time (the model's rule)."""
    streams, sinks, window, interval = geom
    fast, slow = SinkRing(1, sinks, window, interval), PyRing(1, sinks, window, interval)
    fast.append(0, prefix)
    slow.append(0, prefix)
    fast.append(0, n)
    # The model walks the tokens that matter only: once the sinks and the window are full, skipping a multiple of the
    # window moves every window token on by that much and leaves each in its slot.
    head = min(n, 2 * (sinks + window))
    slow.append(0, head)
    skip = max(0, n - head - 2 * window) // window * window
    for st_ in slow.streams:
        st_.slots = [t if t is None or t < sinks else t + skip for t in st_.slots]
        st_.seen += skip
    slow.append(0, n - head - skip)
    assert cpp_state(fast, 0) == slow.state(0)


# ---- counters that no stream can reach are refused (issue 16) ------------------------------------------------------

MAX = 2**63 - 1


def _snapshot_with(ring, seen, frame_base, pending_shift):
    import struct
    data = bytearray(ring.snapshot())
    struct.pack_into("<qqq", data, 8 + 4 * 8, seen, frame_base, pending_shift)
    return bytes(data)


@pytest.mark.parametrize("seen, frame_base, pending, field", [
    (-1, 0, 0, "seen=-1"),
    (MAX, 0, 0, "seen="),
    (5, 6, 0, "frame_base=6"),                      # the next model position would be negative
    (0, -MAX, 0, "frame_base="),                    # ... or past 2^63 - 2
    (10, 3, -8, "pending_shift=-8"),                # a frame change larger than the stream's positions
    (0, 0, MAX, "pending_shift="),                  # more than any sequence of frame changes adds up to
    (5, 5, -(2**63), "pending_shift="),
])
def test_restore_refuses_unreachable_counters(seen, frame_base, pending, field):
    ring = SinkRing(1, 4, 12, 16)
    ring.append(0, 7)
    before = ring.snapshot()
    with pytest.raises(ValueError, match=f"snapshot stream 0: {field}"):
        ring.restore(_snapshot_with(ring, seen, frame_base, pending))
    assert ring.snapshot() == before


def test_restore_accepts_the_extremes_a_stream_reaches():
    ring = SinkRing(1, 4, 12, 16)
    ring.adopt(0, MAX - 1)  # frame_base = -(2^63 - 2), pending the same
    reached = [ring.snapshot()]
    ring.take_pending_shift(0)
    ring.adopt(0, 0)
    ring.append(0, 1)
    ring.adopt(0, 0)  # pending = 2^63 - 1: the most frame changes add up to
    assert ring.pending_shift(0) == MAX
    reached.append(ring.snapshot())
    ring.fast_forward(0, MAX - 1)
    reached.append(ring.snapshot())
    for snap in reached:
        SinkRing(1, 4, 12, 16).restore(snap)


def test_frame_changes_that_would_overflow_are_refused():
    """The old core added to pending_shift and handed out positions past 2^63 - 1 without a check (signed overflow:
    undefined behaviour, a negative shift in practice)."""
    ring = SinkRing(1, 4, 12, 16)
    with pytest.raises(OverflowError):
        ring.adopt(0, MAX)
    ring.adopt(0, MAX - 1)
    ring.take_pending_shift(0)
    ring.adopt(0, 0)
    ring.append(0, 5)
    before = ring.snapshot()
    with pytest.raises(OverflowError, match="pending frame change"):
        ring.adopt(0, 0)  # pending would be 2^63 - 2 + 5
    assert ring.snapshot() == before
    ring = SinkRing(1, 4, 12, 16)
    ring.adopt(0, MAX - 2)
    ring.step()
    assert ring.next_position(0) == MAX - 1
    with pytest.raises(OverflowError):
        ring.step()
    with pytest.raises(OverflowError):
        ring.append(0, 1)
    assert ring.next_position(0) == MAX - 1


int64 = st.one_of(st.integers(-(2**63), MAX),
                  st.sampled_from([0, 1, -1, MAX, MAX - 1, MAX - 2, -MAX, -(2**63), 2**62, -(2**62)]),
                  st.integers(-50, 50))


@settings(max_examples=400, deadline=None)
@given(int64, int64, int64)
def test_any_restored_snapshot_is_refused_or_safe(seen, frame_base, pending):
    """Either a clear ValueError, or a state every operation handles: results or OverflowError, never a wrapped
    counter (the sanitizer run turns any signed overflow into a failure)."""
    ring = SinkRing(1, 2, 3, 4)
    try:
        ring.restore(_snapshot_with(ring, seen, frame_base, pending))
    except ValueError as e:
        assert str(e).startswith("snapshot stream 0: ")
        return
    assert 0 <= ring.next_position(0) <= MAX - 1
    ring.sink_shift(0), ring.occupied(0), ring.evicted_count(0)
    ring.tokens(0, np.empty(5, np.int64)), ring.positions(0, np.empty(5, np.int64))
    for op in (ring.step, lambda: ring.plan(0, 2, np.empty(2, np.int64)), lambda: ring.adopt(0, 3),
               lambda: ring.take_pending_shift(0), lambda: ring.append(0, 3, np.empty(3, np.int64))):
        try:
            op()
        except OverflowError:
            pass
        assert 0 <= ring.next_position(0) <= MAX - 1 and 0 <= ring.seen(0) <= MAX - 1


def test_noop_is_the_benchmark_floor():
    assert SinkRing(1, 1, 1, 1).noop() == 0
