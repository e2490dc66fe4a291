"""The method registry: each method of `pystream-bench` is an object that puts a model in the state a stream of L
tokens leaves and times its decode steps there (quality, per-token NLL at each length, is `quality_at.py`'s).
`REGISTRY` maps the method names to them; `method(name)` also resolves the context-extension baselines
`dense-pi:F`, `dense-ntk:F`, `dense-yarn:F`.

Methods are settings of a few mechanisms, as in attention_sinks: "sink" is a streaming cache of capacity C with S
sinks, "window" the same with none (the paper's window attention), "dense" transformers' DynamicCache, "recompute"
runs the model on the last C tokens (its context) from scratch for every new token.
"""

from __future__ import annotations

import contextlib
import re
import time

import torch

from ..cache.hf import (CompileUnsupported, compiled_decoder, decode_attention_mask, dense_cache, dense_kv_bytes,
                        dense_length_limit, rope_scaled, streaming_cache)
from ..cache.streaming import prefill
from . import clocks
from .baselines import compiled_recompute, recompute_logits

# Dense attention with the model's RoPE scaled to a longer window (transformers' own rope scaling types):
# "dense-pi:4" (linear position interpolation), "dense-ntk:4" (dynamic NTK), "dense-yarn:4" (YaRN).
SCALED_DENSE = re.compile(r"dense-(pi|ntk|yarn):(\d+(?:\.\d+)?)")


class CellMethod:
    """What every method answers; the subclasses say how."""

    name: str
    has_capacity = True  # a cell per capacity (dense has none: one cell per length)
    rope_scaling: tuple[str, float] | None = None

    def sinks(self, cfg) -> int:
        """The sinks this method keeps (records carry them; 0 but for sink)."""
        return 0

    def mode(self, cfg) -> str:
        return cfg.mode

    def decode_steps(self, cfg) -> tuple[int, int]:
        """(warm-up, timed) decode steps of its cells."""
        return cfg.warmup, cfg.steps

    def kv_bytes_needed(self, bench, tokens: int, streams: int, capacity: int | None = None) -> int | None:
        """Bytes of KV cache (and the largest activations) the method will allocate for `streams` streams of
        `tokens` at `capacity` (checked against free memory before anything is allocated; None: nothing that
        grows with them)."""
        return None

    def unsupported(self, bench, tokens: int) -> str | None:
        """Why this method cannot run a stream of `tokens` on this model at all (then its record says
        `status: "unsupported"`), or None."""
        return None

    def context(self, bench):
        """The context the method runs in (its RoPE scaling for the scaled dense baselines)."""
        return contextlib.nullcontext()

    def time_cell(self, bench, capacity: int | None, length: int) -> dict:
        """Reach the state of a stream of `length` tokens and time decode steps there: {latencies_ms, kv_bytes,
        setup_s, ...}."""
        raise NotImplementedError


class StreamingMethod(CellMethod):
    """sink (S sinks) and window (none): a `SinkCache` / `WindowCache` of the cell's capacity."""

    def __init__(self, name: str):
        self.name = name

    def sinks(self, cfg) -> int:
        return cfg.sinks if self.name == "sink" else 0

    def kv_bytes_needed(self, bench, tokens, streams, capacity=None):
        if capacity is None:
            return None
        # the ring's slots, and the logits of the one-chunk prefill of up to `capacity` tokens (float32)
        chunk = min(tokens, capacity)
        return streams * (capacity * clocks.kv_bytes_per_token(bench.config, bench.dtype)
                          + chunk * bench.config.vocab_size * 4)

    def build(self, bench, capacity: int, **kwargs):
        return streaming_cache(capacity, self.sinks(bench.cfg), bench.config, device=bench.device, **kwargs)

    def reach(self, bench, cache, length: int, label: str) -> None:
        """Bring the cache to the state a stream of `length` tokens leaves."""
        S, capacity = cache.num_sinks, cache.capacity
        if bench.cfg.mode == "stream" or length <= capacity:
            def feed(position, end):
                # what fits before eviction in one exact chunk, then one token per forward
                count = max(1, min(end - position, capacity - position)) if position < capacity else 1
                prefill(bench.model, cache, bench.tokens.get(position, count))
                return count

            bench.stream_tokens(cache, length, label, feed)
            return
        # state mode: the first S tokens and the W before `length` in one exact chunk, then jump the counters
        chunk = torch.cat([bench.tokens.first(S), bench.tokens.get(length - cache.window, cache.window)], dim=1)
        with torch.inference_mode():
            bench.model(chunk, cache=cache, position_ids=cache.forward_positions(chunk.shape[1]))
        cache.fast_forward(length, keep_window=True)

    def time_cell(self, bench, capacity, length):
        cache = self.build(bench, capacity, batch_size=bench.cfg.batch)
        label = f"{self.name} {capacity} @ {length:,}"  # file names drop the commas
        _, setup_ms = clocks.timed(bench.device, lambda: self.reach(bench, cache, length, label))
        reached = cache.seen()  # where timing starts: the state a stream of `length` tokens leaves
        mask = decode_attention_mask(bench.model, bench.cfg.batch, cache.capacity)

        def step(x):
            full = cache.kv.attended(1) == cache.capacity
            return bench.forward(x, cache=cache, position_ids=cache.forward_positions(1),
                                 attention_mask=mask if full else None)

        timed, start, extra = step, length, {}
        decoder = None
        if bench.cfg.compile:  # the same step compiled; compiling (2 steps, untimed) before the timed ones
            try:
                decoder = compiled_decoder(bench.model, cache)
            except CompileUnsupported:  # ALiBi models gather their keys in order every step: they stay eager
                extra = dict(compiled=False, compile_s=None)
        if decoder is not None:
            extra = dict(compile_s=bench.compile_warmup(decoder, start), compiled=True)
            timed, start = decoder, start + 2
        latencies = bench.decode(timed, start, f"{self.name} {capacity} @ {length:,}: decoding")
        if decoder is not None:
            extra["compiled"] = decoder.eager_steps == 0
        result = dict(latencies_ms=latencies, kv_bytes=cache.kv_bytes, setup_s=setup_ms / 1e3,
                      stream_position=reached, frame_base=cache.ring.frame_base(0),
                      evicted=max(0, reached - cache.capacity), **extra)
        if bench.cfg.profile:
            result["profile"] = bench.profile(step, start + bench.cfg.warmup + bench.cfg.steps, label, cache,
                                              compiled=decoder)
        return result



class DenseMethod(CellMethod):
    """transformers' DynamicCache: every token kept; optionally with the model's RoPE scaled (dense-pi:F, ...)."""

    has_capacity = False

    def __init__(self, name: str = "dense", rope_scaling: tuple[str, float] | None = None):
        self.name, self.rope_scaling = name, rope_scaling

    def kv_bytes_needed(self, bench, tokens, streams, capacity=None):
        return tokens * clocks.kv_bytes_per_token(bench.config, bench.dtype) * streams

    def unsupported(self, bench, tokens):
        limit = dense_length_limit(bench.config)
        if limit is None or tokens <= limit[0]:
            return None
        return (f"{self.name} attends to all {tokens:,} tokens, but the model attends to at most {limit[0]:,} "
                f"({limit[1]})")

    def context(self, bench):
        return rope_scaled(bench.model, *self.rope_scaling) if self.rope_scaling else contextlib.nullcontext()

    def time_cell(self, bench, capacity, length):
        cache = dense_cache(bench.config, profiled=bench.cfg.profile)
        model = bench.model
        # state mode: prefill in exact chunks (dense attends to everything before a chunk); stream: token by token
        chunk = 1 if bench.cfg.mode == "stream" else 1024

        def feed(position, end):
            count = min(chunk, end - position)
            with torch.inference_mode():
                model(bench.tokens.get(position, count), cache=cache, use_cache=True)
            return count

        started = time.perf_counter()
        bench.stream_tokens(cache, length, f"dense @ {length:,}", feed)
        setup = time.perf_counter() - started
        reached = cache.get_seq_length()
        kv_bytes = dense_kv_bytes(cache)

        def step(x):
            mask = decode_attention_mask(model, bench.cfg.batch, cache.get_seq_length() + 1)
            return bench.forward(x, cache=cache, use_cache=True, attention_mask=mask)

        latencies = bench.decode(step, length, f"dense @ {length:,}: decoding")
        result = dict(latencies_ms=latencies, kv_bytes=kv_bytes, setup_s=setup, stream_position=reached)
        if bench.cfg.compile:  # its cache grows every step: no fixed shape to compile, so it runs eager
            result.update(compiled=False, compile_s=None)
        if bench.cfg.profile:
            result["profile"] = bench.profile(step, length + bench.cfg.warmup + bench.cfg.steps, f"dense @ {length:,}")
        return result



class RecomputeMethod(CellMethod):
    """Sliding window with re-computation: no cache; each step runs the model on its context, the last C tokens."""

    name = "recompute"

    def mode(self, cfg) -> str:
        return "stateless"

    def decode_steps(self, cfg) -> tuple[int, int]:
        # Each step is a whole forward over the context, the same work every time: one warm-up step and a few timed
        # ones give a steady p50 (p90 / p50 = 1.10 over 32 steps at 1,024), where 3 + 32 at 1,024 took 2 minutes of
        # the default run's 10.
        return min(cfg.warmup, 1), min(cfg.steps, cfg.recompute_steps)

    def time_cell(self, bench, context, length):
        position = length  # the token the next step predicts after

        def step(x):
            nonlocal position
            start = max(0, position + 1 - context)
            window = bench.tokens.get(start, position + 1 - start)
            position += 1
            if bench.profiling:
                positions = torch.arange(window.shape[1], device=window.device).expand(window.shape[0], -1)
                return bench.forward(window, position_ids=positions, use_cache=False)
            return recompute_logits(bench.model, window, context)

        timed, start, extra = step, length, {}
        if bench.cfg.compile:
            if length + 1 >= context:  # the context is full: every step has the same shape
                decoder = compiled_recompute(bench.model, context, bench.cfg.batch, bench.device)

                def timed(x):
                    nonlocal position
                    window = bench.tokens.get(position + 1 - context, context)
                    position += 1
                    return decoder(window)

                extra = dict(compile_s=bench.compile_warmup(decoder, start, timed), compiled=True)
                start += 2
            else:
                extra = dict(compiled=False, compile_s=None)
        warmup, steps = self.decode_steps(bench.cfg)
        latencies = bench.decode(timed, start, f"recompute {context} @ {length:,}: decoding", warmup, steps)
        result = dict(latencies_ms=latencies, kv_bytes=0, setup_s=0.0, **extra)
        if bench.cfg.profile:
            result["profile"] = bench.profile(step, start + warmup + steps,
                                              f"recompute {context} @ {length:,}",
                                              compiled=timed if extra.get("compiled") else None)
        return result



SINK, WINDOW = StreamingMethod("sink"), StreamingMethod("window")
REGISTRY: dict[str, CellMethod] = {"sink": SINK, "window": WINDOW, "recompute": RecomputeMethod(),
                                   "dense": DenseMethod()}
METHODS = tuple(REGISTRY)


def method(name: str) -> CellMethod:
    """The method called `name`: one of `REGISTRY`, or a scaled dense baseline (dense-pi:F, dense-ntk:F,
    dense-yarn:F). KeyError for anything else."""
    if name in REGISTRY:
        return REGISTRY[name]
    match = SCALED_DENSE.fullmatch(name)
    if match is None:
        raise KeyError(name)
    return DenseMethod(name, (match.group(1), float(match.group(2))))


def is_dense(name: str) -> bool:
    return name == "dense" or SCALED_DENSE.fullmatch(name) is not None
