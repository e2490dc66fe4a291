"""The C++ bookkeeping calls, and one layer's cache update per decode step at several capacities.

Shapes are the bundled SmolLM2-135M's (3 KV heads x 64 features; float32 on the CPU, and bfloat16 on a CUDA device
where there is one). Every cache is measured full, in a
steady state: streaming caches are full and keep evicting; dense and static are cropped back by one token after
each step so they stay at the capacity being measured.
"""

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, StaticCache

from conftest import interleaved_gate, ratio
from pystream import PaperCache, SinkCache, SinkRing, WindowCache

CAPACITIES = (256, 1024, 4096)
SINKS = 4
METHODS = ("sink", "window", "dense", "static", "paper")


def one_layer_config():
    return LlamaConfig(vocab_size=16, hidden_size=192, num_hidden_layers=1, num_attention_heads=3,
                       num_key_value_heads=3, intermediate_size=16, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


# ---- the C++ core --------------------------------------------------------------------------------------------------

def _ring(streams=1):
    return SinkRing(streams, SINKS, 1020, 1024)


def test_ring_noop(record):
    """The floor of any call through the binding (argument-free method, int result): what `ring_step_1` is gated
    against."""
    ring = _ring()
    record(ring.noop, key="ring_noop", method="core", op="noop")


@pytest.mark.parametrize("streams", [1, 8])
def test_ring_step(record, streams):
    """One call per decode step serves every layer (target <= 200 ns from Python, one stream): gated as a ratio to
    `noop` through the same binding in `test_ratios_core`; 8 streams recorded only."""
    ring = _ring(streams)
    record(ring.step, key=f"ring_step_{streams}", method="core", op="step", streams=streams)


def test_ring_plan(record):
    ring, out = _ring(), np.zeros(1, np.int64)
    record(lambda: ring.plan(0, 1, out), key="ring_plan", method="core", op="plan")


def test_ring_append_chunk(record):
    ring = _ring()
    slots, evicted = np.zeros(64, np.int64), np.zeros(64, np.int64)
    record(lambda: ring.append(0, 64, slots, evicted), key="ring_append64", method="core", op="append64")


def test_ring_positions(record):
    ring, out = _ring(), np.zeros(SINKS + 1020, np.int64)
    ring.append(0, 5000)
    record(lambda: ring.positions(0, out), key="ring_positions", method="core", op="positions")


# ---- one layer's update ----------------------------------------------------------------------------------------------

def make_update(method, capacity, device="cpu", dtype=torch.float32):
    """A closure doing one steady-state decode update of a full cache of `capacity` tokens."""
    config = one_layer_config()
    k, v = (torch.randn(1, 3, 1, 64, device=device, dtype=dtype) for _ in range(2))
    fill = lambda: torch.randn(1, 3, capacity - 1, 64, device=device, dtype=dtype)  # noqa: E731
    if method in ("sink", "window"):
        cache = SinkCache(SINKS, capacity - SINKS, config) if method == "sink" else WindowCache(capacity, config)
        with torch.inference_mode():
            for _ in range(capacity + 7):
                cache.update(k, v, 0, kwargs={"position_ids": cache.position_ids(1)})

        def step():
            cache.update(k, v, 0, kwargs={"position_ids": cache.position_ids(1)})
    elif method == "paper":
        cache = PaperCache(SINKS, capacity - SINKS, config)
        with torch.inference_mode():
            for _ in range(capacity + 7):
                cache.update(k, v, 0)

        def step():
            cache.update(k, v, 0)
    elif method == "dense":
        cache = DynamicCache(config=config)
        with torch.inference_mode():
            cache.update(fill(), fill(), 0)

        def step():
            cache.update(k, v, 0)
            cache.crop(-1)
    else:  # static: transformers' preallocated cache, the floor a streaming cache is held to
        cache = StaticCache(config=config, max_cache_len=capacity)
        with torch.inference_mode():
            cache.update(fill(), fill(), 0)

        def step():
            cache.update(k, v, 0)
            cache.crop(-1)

    if torch.device(device).type == "cuda":
        def run():  # the clock must see the GPU's work, not only its launch
            with torch.inference_mode():
                step()
            torch.cuda.synchronize()
    else:
        def run():
            with torch.inference_mode():
                step()

    return run


@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("method", METHODS)
def test_layer_update(record, method, capacity):
    record(make_update(method, capacity), key=f"update_{method}_{capacity}", method=method, capacity=capacity,
           dtype="float32", device="cpu", op="layer_update")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("method", METHODS)
def test_layer_update_cuda(record, method, capacity):
    """The same update on a CUDA device in bfloat16, synchronised: on a GPU a step is a handful of kernel launches,
    so what matters is how many each cache issues (recorded, not gated: GPUs differ too much)."""
    record(make_update(method, capacity, "cuda", torch.bfloat16), key=f"update_{method}_{capacity}_cuda",
           method=method, capacity=capacity, dtype="bfloat16", device=torch.cuda.get_device_name(), op="layer_update")


def test_ratios_core():
    """Same-run gate: the decode step's bookkeeping costs at most 5 no-op calls through the same binding (the
    machine-independent form of the <= 200 ns target; a per-step allocation, a Python callback or a loop over the
    window each break it)."""
    assert ratio("ring_step_1", "ring_noop") <= 5


def test_ratios_update():
    """Same-run gates: SinkCache's update beats the paper's by >= 50x at 4096, and is flat in capacity (at 4096 at
    most 1.5x its cost at 256). A real regression, such as touching the whole window every step, breaks both; noise
    does not: each gate times its pair interleaved (see conftest.interleaved_gate), since the fastest rounds of two
    separate benchmarks moved the flatness ratio to 2.3 on a busy CI machine."""
    sink_256, sink_4096 = make_update("sink", 256), make_update("sink", 4096)
    paper_4096 = make_update("paper", 4096)
    interleaved_gate({"paper_4096": paper_4096, "sink_4096": sink_4096}, 40,
                     lambda fastest: fastest["paper_4096"] / fastest["sink_4096"] >= 50)
    interleaved_gate({"sink_4096": sink_4096, "sink_256": sink_256}, 2000,
                     lambda fastest: fastest["sink_4096"] / fastest["sink_256"] <= 1.5)
