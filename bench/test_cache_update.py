"""The C++ bookkeeping call, and one layer's cache update per decode step at several capacities.

Shapes are the bundled SmolLM2-135M's (3 KV heads x 64 features, float32, CPU); the cache is full and has wrapped.
"""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from conftest import median_ratio
from pystream import PaperCache, SinkCache, SinkRing, WindowCache

CAPACITIES = (256, 1024, 4096)
SINKS = 4


def one_layer_config():
    return LlamaConfig(vocab_size=16, hidden_size=192, num_hidden_layers=1, num_attention_heads=3,
                       num_key_value_heads=3, intermediate_size=16, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def test_ring_step(record):
    """One call per decode step serves every layer: target <= 200 ns from Python."""
    ring = SinkRing(1, SINKS, 1020, 1024)
    ring.bind_outputs(*[np.zeros(1, np.int64) for _ in range(6)])
    record(ring.step, key="ring_step", method="core", op="step")


def _filled(cache, k, v, capacity, planned):
    with torch.inference_mode():
        for _ in range(capacity + 7):
            kwargs = {"position_ids": cache.position_ids(1)} if planned else {}
            cache.update(k, v, 0, kwargs=kwargs)
    return cache


@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("method", ["sink", "window", "paper"])
def test_layer_update(record, method, capacity):
    config = one_layer_config()
    k, v = torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
    if method == "sink":
        cache, planned = SinkCache(SINKS, capacity - SINKS, config), True
    elif method == "window":
        cache, planned = WindowCache(capacity, config), True
    else:
        cache, planned = PaperCache(SINKS, capacity - SINKS, config), False
    _filled(cache, k, v, capacity, planned)

    def step():
        with torch.inference_mode():
            kwargs = {"position_ids": cache.position_ids(1)} if planned else {}
            return cache.update(k, v, 0, kwargs=kwargs)

    record(step, key=f"update_{method}_{capacity}", method=method, capacity=capacity, dtype="float32",
           device="cpu", op="layer_update")


def test_ratios_update():
    """Same-run gates: SinkCache's update beats the paper's by >= 50x at 4096, and stays flat in capacity."""
    assert median_ratio("update_paper_4096", "update_sink_4096") >= 50
    assert median_ratio("update_sink_4096", "update_sink_256") <= 1.5
