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


def bound_outputs(ring):
    names = ("slot", "evicted", "position", "sink_shift", "pending_shift", "occupied")
    outs = {name: np.full(ring.num_streams, -7, dtype=np.int64) for name in names}
    ring.bind_outputs(**outs)
    return outs


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
    outs = bound_outputs(cpp)
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


def test_step_fills_bound_arrays_in_place_and_reports_common_slot():
    ring = SinkRing(2, 1, 2, 10)
    outs = bound_outputs(ring)
    assert ring.step() == 0
    assert outs["slot"].tolist() == [0, 0] and outs["occupied"].tolist() == [1, 1]
    ring.append(1, 1)  # streams now ragged
    assert ring.step() == -1
    assert outs["slot"].tolist() == [1, 2]
    torch_out = torch.zeros(2, dtype=torch.int64)
    ring.bind_outputs(slot=torch_out)
    ring.step()
    assert torch_out.tolist() == [2, 1]


@pytest.mark.parametrize("start", [2**32 - 3, 2**40 + 11, 2**62 + 5])
def test_positions_past_32_bits(start):
    """64-bit counters: fast-forward far, then step, and check everything against exact big-int arithmetic."""
    S, W = 4, 7
    ring = SinkRing(1, S, W, 16)
    outs = bound_outputs(ring)
    ring.fast_forward(0, start)
    assert ring.seen(0) == start
    assert ring.next_position(0) == S + W - 1  # positions are small right after a fast-forward
    for i in range(3 * W):
        token = start + i
        common = ring.step()
        assert common == S + (token - S) % W
        assert outs["evicted"][0] == token - W
        assert outs["position"][0] == token - ring.frame_base(0)
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
    ((0, 4, 4, 1), "num_streams must be >= 1"),
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


def test_bad_bound_output_is_refused():
    ring = SinkRing(2, 1, 2, 4)
    with pytest.raises(ValueError, match="must have 2 elements"):
        ring.bind_outputs(slot=np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="CPU|int64"):
        ring.bind_outputs(slot=torch.zeros(2, dtype=torch.float32))
