"""A full decode step of the bundled SmolLM2-135M with each cache, and one recompute step, at capacities 1024 and
4096 (float32, CPU, one thread). Target: the sink cache's step costs at most 1.03x a static preallocated cache's of
the same capacity, measured side by side in this run."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import interleaved_gate
from pystream import PaperCache, SinkCache, WindowCache
from pystream.measure.baselines import recompute_logits
from pystream.cache.hf import decode_attention_mask

CAPACITIES = (1024, 4096)
RATIO_ROUNDS = 30
TRIALS = 3  # of RATIO_ROUNDS interleaved rounds each (see test_ratio_sink_step_vs_static)
SINKS = 4


@pytest.fixture(scope="module")
def model():
    from pystream.inputs.models import load_model

    return load_model(None).model


def _tokens(n, seed=0):
    return torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(seed))


def make_step(model, method, capacity):
    x = _tokens(1)
    with torch.inference_mode():
        if method in ("sink", "window"):
            cache = (SinkCache(SINKS, capacity - SINKS, model.config) if method == "sink"
                     else WindowCache(capacity, model.config))
            model(_tokens(capacity), cache=cache)
            for _ in range(3):
                model(x, cache=cache, position_ids=cache.position_ids(1))

            mask = decode_attention_mask(model, 1, capacity)

            def step():
                model(x, cache=cache, position_ids=cache.position_ids(1), attention_mask=mask)
        elif method == "paper":
            cache = PaperCache(SINKS, capacity - SINKS, model.config)
            for t in range(8):  # the paper's cache takes one token per forward: fill it cheaply from a dense pass
                model(_tokens(1, t), cache=cache)
            keys = [torch.cat([k] * (capacity // k.shape[-2] + 1), -2)[..., :capacity, :] for k in cache.raw_keys]
            values = [torch.cat([v] * (capacity // v.shape[-2] + 1), -2)[..., :capacity, :] for v in cache.raw_values]
            cache.raw_keys, cache.raw_values = keys, values

            mask = decode_attention_mask(model, 1, capacity)

            def step():
                model(x, cache=cache, attention_mask=mask)
        elif method in ("dense", "static"):
            cache = (DynamicCache(config=model.config) if method == "dense"
                     else StaticCache(config=model.config, max_cache_len=capacity))
            model(_tokens(capacity - 1), cache=cache)
            # static builds its own mask; dense gets the same explicit one as the streaming caches
            mask = decode_attention_mask(model, 1, capacity) if method == "dense" else None

            def step():
                model(x, cache=cache, attention_mask=mask)
                cache.crop(-1)  # stay at the capacity being measured
        else:
            raise ValueError(method)

    def run():
        with torch.inference_mode():
            step()

    return run


@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("method", ["sink", "window", "static", "dense", "paper"])
def test_decode_step(record, model, method, capacity):
    """Records only: a decode step per cache, for --benchmark-compare against a stored run; gates nothing here
    (the sink-vs-static gate below times its own interleaved loop)."""
    record(make_step(model, method, capacity), key=f"step_{method}_{capacity}", method=method, capacity=capacity,
           dtype="float32", device="cpu", op="decode_step")


@pytest.mark.parametrize("capacity", [1024])
def test_recompute_step(benchmark, model, capacity):
    """Records only: one recompute step over its context, for --benchmark-compare; gates nothing here."""
    context = _tokens(capacity)
    benchmark.extra_info.update(method="recompute", capacity=capacity, dtype="float32", device="cpu",
                                op="recompute_step", threads=torch.get_num_threads())
    benchmark.pedantic(lambda: recompute_logits(model, context, capacity), rounds=3, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_ratio_sink_step_vs_static(model, capacity):
    """Sink-cache decode step <= 1.03x the static cache's at the same capacity. Measured here, interleaved (sink,
    static, static, sink, ...), so that a slow spell of a shared machine lands on both; the fastest step of each
    (interference only ever adds time). Two separate benchmarks a minute apart can drift by more than 3%, and so can
    one trial of 30 interleaved rounds: the static step's fastest time moved from 78 to 107 ms between consecutive
    trials here (sink 82-84 ms), ratios 0.79-1.04. So up to TRIALS trials: a real regression shows in every one."""
    steps = {"sink": make_step(model, "sink", capacity), "static": make_step(model, "static", capacity)}
    interleaved_gate(steps, RATIO_ROUNDS, lambda fastest: fastest["sink"] / fastest["static"] <= 1.03, TRIALS)
