"""The compiled decode step (pystream-bench --compile) of the bundled SmolLM2-135M, float32, one thread: the sink
cache's compiled step against transformers' StaticCache compiled the same way (gate: at most 1.05x, at capacities
1,024 and 4,096), and each compiled step against its eager twin (recorded, not gated: on a CPU the launch overhead
that compiling removes is small beside the matrix multiplies of a 135M model, so it may not pay).

Compiling the 30-layer model takes minutes per graph on a 2-core CPU; each test compiles its two graphs once. The
figures (fastest step of each, compile seconds, ratios) are printed (run with -s) for every trial.
"""

import pytest
import torch

from pystream.cache.hf import compiled_decoder, static_cache

from conftest import interleaved_gate
from test_decode_step import SINKS, _tokens, make_step

CAPACITIES = (1024, 4096)
RATIO_ROUNDS = 15
TRIALS = 3
BOUND = 1.05


@pytest.fixture(scope="module")
def model():
    from pystream.inputs.models import load_model

    return load_model(None).model


def make_compiled_step(model, method, capacity):
    """A compiled decode step at `capacity` ("sink": SinkCache 4+(C-4); "static": StaticCache of C slots, cropped
    back after each step like the eager benchmark's); returns (run, compile seconds)."""
    from pystream import SinkCache

    x = _tokens(1)
    with torch.inference_mode():
        if method == "sink":
            cache = SinkCache(SINKS, capacity - SINKS, model.config)
            model(_tokens(capacity), cache=cache)
        else:
            cache = static_cache(model, capacity)
            model(_tokens(capacity - 1), cache=cache)
        decoder = compiled_decoder(model, cache)

        def step():
            decoder(x)
            if method == "static":
                cache.crop(-1)  # stay at the capacity being measured (outside the compiled step)

        for _ in range(2):  # compile (and on a GPU record the graph)
            step()

    def run():
        with torch.inference_mode():
            step()

    return run, decoder.compile_s


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_ratio_compiled_sink_vs_static(model, capacity):
    """Compiled sink step <= 1.05x the compiled StaticCache step (fastest of interleaved rounds, up to 3 trials, as
    bench/test_decode_step.py::test_ratio_sink_step_vs_static); the compiled-over-eager speedup of each is recorded
    from the same rounds."""
    steps, compile_s = {}, {}
    for method in ("sink", "static"):
        steps[f"{method}_compiled"], compile_s[method] = make_compiled_step(model, method, capacity)
        steps[f"{method}_eager"] = make_step(model, method, capacity)

    def passes(fastest):  # prints every trial's figures: the compiled-vs-eager speedups are recorded, not gated
        figures = {
            "ms": {k: round(v * 1e3, 2) for k, v in fastest.items()},
            "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
            "sink_vs_static_compiled": fastest["sink_compiled"] / fastest["static_compiled"],
            "sink_vs_static_eager": fastest["sink_eager"] / fastest["static_eager"],
            "speedup_sink": fastest["sink_eager"] / fastest["sink_compiled"],
            "speedup_static": fastest["static_eager"] / fastest["static_compiled"],
        }
        print(f"\ncompiled step at {capacity}: {figures}")
        return figures["sink_vs_static_compiled"] <= BOUND

    interleaved_gate(steps, RATIO_ROUNDS, passes, TRIALS)
