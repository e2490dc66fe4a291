"""What `pystream-bench` measures: cells (method x cache size x stream length) and quality (per-token NLL).

Methods are settings of a few mechanisms, as in attention_sinks: "sink" is SinkCache(S, C - S), "window" is the
same cache with no sinks, "dense" is transformers' DynamicCache, "recompute" runs the model on the last C tokens
from scratch for every new token.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .measure import clocks as measure
from .baselines import recompute_logits
from .hf import DynamicCache, SinkCache, StreamBatch, WindowCache, decode_attention_mask, rope_scaled
from .quality import nll_dense, nll_recompute, nll_streaming, stream_batch_nll_step, summarise
from .results import record
from .streaming import prefill

METHODS = ("sink", "window", "recompute", "dense")
STREAMING = ("sink", "window")
# Dense attention with the model's RoPE scaled to a longer window (transformers' own rope scaling types):
# "dense-pi:4" (linear position interpolation), "dense-ntk:4" (dynamic NTK), "dense-yarn:4" (YaRN).
SCALED_DENSE = re.compile(r"dense-(pi|ntk|yarn):(\d+(?:\.\d+)?)")


def is_dense(method: str) -> bool:
    return method == "dense" or SCALED_DENSE.fullmatch(method) is not None


def rope_scaling_of(method: str) -> tuple[str, float] | None:
    match = SCALED_DENSE.fullmatch(method)
    return (match.group(1), float(match.group(2))) if match else None
BUCKET_TOKENS = 256


@dataclass
class BenchConfig:
    lengths: list[int]
    methods: list[str]
    cache_sizes: list[int]
    sinks: int = 4
    mode: str = "state"
    batch: int = 1
    steps: int = 32
    warmup: int = 3
    seed: int = 0
    ppl_tokens: int = 1536
    ppl_cache: int | None = None
    recompute_ppl: str = "auto"  # "all", "sample" or "auto" (sample on CPU, all on GPU)
    recompute_samples: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_every_s: float = 60.0  # --mode stream: save the cache this often, for --resume
    profile: bool = False  # --profile: a profiled pass after the timed steps, with a trace and a breakdown
    profile_steps: int = 8

    @property
    def quality_cache(self) -> int:
        return self.ppl_cache if self.ppl_cache is not None else min(self.cache_sizes)


class TokenSource:
    """Token ids of the text for B streams; a stream longer than the text cycles it (recorded in each cell).
    Stream b starts b/B of the way into the text, so that the streams of a batch differ."""

    def __init__(self, ids: np.ndarray, batch: int, device):
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.n = len(ids)
        self.offsets = torch.tensor([b * self.n // batch for b in range(batch)]).unsqueeze(1)
        self.device = device

    def get(self, start: int, count: int) -> torch.Tensor:
        """Tokens start..start+count-1 of every stream: `[batch, count]`."""
        index = (self.offsets + start + torch.arange(count).unsqueeze(0)) % self.n
        return self.ids[index].to(self.device)

    def first(self, count: int) -> torch.Tensor:
        return self.get(0, count)

    def cycles(self, length: int) -> bool:
        return length > self.n


class Bench:
    def __init__(self, cfg: BenchConfig, model, ids: np.ndarray, progress, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.model = model
        self.device = torch.device(cfg.device)
        self.tokens = TokenSource(ids, cfg.batch, self.device)
        self.progress = progress
        self.config = model.config
        self._streamed: dict = {}  # quality NLL of a method streamed alongside another (see _streaming_nll)
        self.dtype = next(model.parameters()).dtype
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._profiling = False

    def _forward(self, input_ids, **kwargs):
        """One forward of the model; split into named ranges during a profiled pass."""
        if self._profiling:
            from .profiling import split_forward

            return split_forward(self.model, input_ids, **kwargs)
        return self.model(input_ids, **kwargs).logits

    def _profile(self, step_fn, start: int, label: str, cache=None) -> dict:
        """A profiled pass of `profile_steps` more decode steps (after the timed ones, so that timing is clean)."""
        from .profiling import profile_steps

        kv = getattr(cache, "kv", None)
        self._profiling = True
        if kv is not None:
            kv.profile = True
        try:
            with torch.inference_mode():
                return profile_steps(lambda i: step_fn(self.tokens.get(start + i, 1)), self.cfg.profile_steps,
                                     self.device, None if self.run_dir is None else
                                     self.run_dir / "traces" / f"{label.replace(' ', '-').replace('@', 'at')}.json")
        finally:
            self._profiling = False
            if kv is not None:
                kv.profile = False

    # ---- the plan ---------------------------------------------------------------------------------------------------
    def cells(self) -> list[tuple[str, int | None, int]]:
        """(method, cache size, length) in the order they run: recompute first for each cache size, so that the
        others can report their speedup over it; dense once per length (it has no cache size)."""
        plan = []
        for length in self.cfg.lengths:
            for cache_size in self.cfg.cache_sizes:
                for method in ("recompute", "sink", "window"):
                    if method in self.cfg.methods:
                        plan.append((method, cache_size, length))
            for method in self.cfg.methods:
                if is_dense(method):
                    plan.append((method, None, length))
        return plan

    def scaling(self, method: str):
        """The context a method runs in: its RoPE scaling for dense-pi/ntk/yarn, nothing otherwise."""
        scaling = rope_scaling_of(method)
        return rope_scaled(self.model, *scaling) if scaling else contextlib.nullcontext()

    def cell_mode(self, method: str) -> str:
        return "stateless" if method == "recompute" else self.cfg.mode

    # ---- one cell ---------------------------------------------------------------------------------------------------
    def run_cell(self, method: str, cache_size: int | None, length: int, done: list[dict]) -> dict:
        common = dict(method=method, cache_size=cache_size, length=length, mode=self.cell_mode(method),
                      batch=self.cfg.batch, sinks=self.cfg.sinks if method == "sink" else 0,
                      window=None if cache_size is None else cache_size - (self.cfg.sinks if method == "sink" else 0),
                      dtype=self.cfg.dtype, device=str(self.device),
                      text_cycled=self.tokens.cycles(length + self.cfg.warmup + self.cfg.steps))
        scaling = rope_scaling_of(method)
        if scaling:
            common["rope_scaling"] = {"type": scaling[0], "factor": scaling[1]}
        started = time.perf_counter()
        if is_dense(method):
            needed = length * measure.kv_bytes_per_token(self.config, self.dtype) * self.cfg.batch
            ok, message = measure.fits(needed, self.device)
            if not ok:
                return record("cell", **common, status="oom", error=message, kv_bytes_needed=needed)
        try:
            with measure.peak_memory(self.device) as memory, self.scaling(method):
                result = getattr(self, "_cell_dense" if is_dense(method) else f"_cell_{method}")(cache_size, length)
        except (torch.OutOfMemoryError, MemoryError) as err:
            self._free()
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            return record("cell", **common, status="oom", error=f"OOM: {text}")
        latencies = result.pop("latencies_ms")
        summary = measure.latency_summary(latencies)
        seconds = sum(latencies) / 1e3
        tokens_per_s = self.cfg.batch * len(latencies) / seconds
        kv_read = result.get("kv_bytes", 0)
        rec = record(
            "cell", **common, status="ok", latency_ms=summary, timed_steps=len(latencies),
            warmup_steps=self.cfg.warmup, tokens_per_s=tokens_per_s,
            # gpt-fast's measure: bytes that must be read per step (weights and the KV attended) over the p50 time
            achieved_bandwidth_gb_s=(self.param_bytes + kv_read) / (summary["p50"] / 1e3) / 1e9,
            wall_s=time.perf_counter() - started, **memory, **result,
        )
        self._add_speedup(rec, done)
        self._free()
        return rec

    def _add_speedup(self, rec: dict, done: list[dict]) -> None:
        recomputes = {r["cache_size"]: r["latency_ms"]["p50"] for r in done
                      if r.get("record") == "cell" and r.get("method") == "recompute" and r.get("status") == "ok"
                      and r.get("length") == rec["length"]}
        p50 = rec["latency_ms"]["p50"]
        if is_dense(rec["method"]):
            rec["speedup_vs_recompute"] = {str(cs): v / p50 for cs, v in recomputes.items()} or None
        elif rec["method"] != "recompute" and rec["cache_size"] in recomputes:
            rec["speedup_vs_recompute"] = recomputes[rec["cache_size"]] / p50
        else:
            rec["speedup_vs_recompute"] = 1.0 if rec["method"] == "recompute" else None

    def _free(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _decode(self, step_fn, start: int, label: str) -> list[float]:
        """Warm-up, then the timed steps; `step_fn(tokens [batch, 1])` runs one decode step."""
        total = self.cfg.warmup + self.cfg.steps
        task = self.progress.add_task(label, total=total)
        latencies = []
        try:
            with torch.inference_mode():
                for i in range(total):
                    x = self.tokens.get(start + i, 1)
                    _, ms = measure.timed(self.device, lambda: step_fn(x))
                    if i >= self.cfg.warmup:
                        latencies.append(ms)
                    self.progress.advance(task)
        finally:
            self.progress.remove_task(task)
        return latencies

    def _streaming_cache(self, method: str, cache_size: int):
        if method == "sink":
            return SinkCache(self.cfg.sinks, cache_size - self.cfg.sinks, self.config, batch_size=self.cfg.batch,
                             device=self.device)
        return WindowCache(cache_size, self.config, batch_size=self.cfg.batch, device=self.device)

    def _checkpoint_path(self, label: str) -> Path | None:
        if self.run_dir is None or self.cfg.mode != "stream":
            return None
        return self.run_dir / "checkpoints" / f"{label}.safetensors"

    def _stream_tokens(self, cache, length: int, label: str, feed) -> None:
        """Stream tokens 0..length-1 for real through `feed(start, count)`, with a progress bar, resuming from and
        saving checkpoints (every `checkpoint_every_s`) when the run has a directory."""
        from . import checkpoint

        path = self._checkpoint_path(label.replace(" ", "-").replace("@", "at"))
        start = 0
        if path is not None and path.exists():
            checkpoint.load(path, cache, self.device)
            start = cache.seen() if hasattr(cache, "seen") else cache.get_seq_length()
        task = self.progress.add_task(f"{label}: streaming {length:,} tokens", total=length, completed=start)
        last_save = time.monotonic()
        try:
            position = start
            while position < length:
                count = feed(position, length)
                position += count
                self.progress.advance(task, count)
                if path is not None and time.monotonic() - last_save > self.cfg.checkpoint_every_s:
                    checkpoint.save(path, cache)
                    last_save = time.monotonic()
        finally:
            self.progress.remove_task(task)
        if path is not None and path.exists():
            path.unlink()

    def _reach_streaming(self, cache, length: int, label: str) -> None:
        """Bring a sink/window cache to the state a stream of `length` tokens leaves."""
        S, capacity = cache.num_sinks, cache.capacity
        if self.cfg.mode == "stream" or length <= capacity:
            def feed(position, end):
                # what fits before eviction in one exact chunk, then one token per forward
                count = max(1, min(end - position, capacity - position)) if position < capacity else 1
                prefill(self.model, cache, self.tokens.get(position, count))
                return count

            self._stream_tokens(cache, length, label, feed)
            return
        # state mode: the first S tokens and the W before `length` in one exact chunk, then jump the counters
        chunk = torch.cat([self.tokens.first(S), self.tokens.get(length - cache.window, cache.window)], dim=1)
        with torch.inference_mode():
            self.model(chunk, cache=cache, position_ids=cache.position_ids(chunk.shape[1]))
        cache.fast_forward(length, keep_window=True)

    def _cell_streaming(self, method: str, cache_size: int, length: int) -> dict:
        cache = self._streaming_cache(method, cache_size)
        label = f"{method} {cache_size} @ {length}"
        setup, ms = measure.timed(self.device, lambda: self._reach_streaming(cache, length, label))
        reached = cache.seen()  # where timing starts: the state a stream of `length` tokens leaves
        mask = decode_attention_mask(self.model, self.cfg.batch, cache.capacity)

        def step(x):
            full = cache.kv.attended(1) == cache.capacity
            return self._forward(x, cache=cache, position_ids=cache.position_ids(1),
                                 attention_mask=mask if full else None)

        latencies = self._decode(step, length, f"{method} {cache_size} @ {length:,}: decoding")
        ring = cache.ring
        result = dict(latencies_ms=latencies, kv_bytes=cache.kv_bytes, setup_s=ms / 1e3, stream_position=reached,
                      frame_base=ring.frame_base(0), evicted=max(0, reached - cache.capacity))
        if self.cfg.profile:
            result["profile"] = self._profile(step, length + self.cfg.warmup + self.cfg.steps, label, cache)
        return result

    def _cell_sink(self, cache_size, length):
        return self._cell_streaming("sink", cache_size, length)

    def _cell_window(self, cache_size, length):
        return self._cell_streaming("window", cache_size, length)

    def _cell_dense(self, cache_size, length) -> dict:
        from .profiling import ProfiledDynamicCache

        cache = (ProfiledDynamicCache if self.cfg.profile else DynamicCache)(config=self.config)
        model = self.model
        # state mode: prefill in exact chunks (dense attends to everything before a chunk); stream: token by token
        chunk = 1 if self.cfg.mode == "stream" else 1024

        def feed(position, end):
            count = min(chunk, end - position)
            with torch.inference_mode():
                model(self.tokens.get(position, count), cache=cache, use_cache=True)
            return count

        started = time.perf_counter()
        self._stream_tokens(cache, length, f"dense @ {length}", feed)
        setup = time.perf_counter() - started
        reached = cache.get_seq_length()
        kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
        def step(x):
            mask = decode_attention_mask(model, self.cfg.batch, cache.get_seq_length() + 1)
            return self._forward(x, cache=cache, use_cache=True, attention_mask=mask)

        latencies = self._decode(step, length, f"dense @ {length:,}: decoding")
        result = dict(latencies_ms=latencies, kv_bytes=kv_bytes, setup_s=setup, stream_position=reached)
        if self.cfg.profile:
            result["profile"] = self._profile(step, length + self.cfg.warmup + self.cfg.steps, f"dense @ {length}")
        return result

    def _cell_recompute(self, cache_size, length) -> dict:
        model = self.model

        def step(x, position=[length]):
            start = max(0, position[0] + 1 - cache_size)
            context = self.tokens.get(start, position[0] + 1 - start)
            position[0] += 1
            if self._profiling:
                positions = torch.arange(context.shape[1], device=context.device).expand(context.shape[0], -1)
                return self._forward(context, position_ids=positions, use_cache=False)
            return recompute_logits(model, context, cache_size)

        latencies = self._decode(step, length, f"recompute {cache_size} @ {length:,}: decoding")
        result = dict(latencies_ms=latencies, kv_bytes=0, setup_s=0.0)
        if self.cfg.profile:
            result["profile"] = self._profile(step, length + self.cfg.warmup + self.cfg.steps,
                                              f"recompute {cache_size} @ {length}")
        return result

    # ---- quality ----------------------------------------------------------------------------------------------------
    def quality_plan(self) -> list[tuple[str, int | None]]:
        if self.cfg.ppl_tokens <= 1:
            return []
        cache_size = self.cfg.quality_cache
        order = [m for m in self.cfg.methods if is_dense(m)]
        order += [m for m in ("sink", "window", "recompute") if m in self.cfg.methods]
        return [(m, None if is_dense(m) else cache_size) for m in order]

    def quality_key(self, method: str, cache_size: int | None) -> tuple:
        return ("quality", method, cache_size, self.cfg.ppl_tokens, "quality",
                self.cfg.sinks if method == "sink" else 0)

    def cell_key(self, method: str, cache_size: int | None, length: int) -> tuple:
        return ("cell", method, cache_size, length, self.cell_mode(method), self.cfg.sinks if method == "sink" else 0)

    def _streaming_nll(self, method: str, cache_size: int, x: torch.Tensor, tick) -> np.ndarray:
        """Token by token. When both sink and window are asked for, they stream together as one batch of two (one
        forward per token for both); the second one's result is kept for its turn."""
        key = (method, cache_size, x.shape[0])
        if key in self._streamed:
            return self._streamed.pop(key)
        make = {"sink": lambda: SinkCache(self.cfg.sinks, cache_size - self.cfg.sinks, self.config,
                                          device=self.device),
                "window": lambda: WindowCache(cache_size, self.config, device=self.device)}
        methods = [m for m in STREAMING if m in self.cfg.methods]
        if len(methods) < 2:
            return nll_streaming(self.model, make[method](), x, on_step=tick)
        n = x.shape[0]
        batch = StreamBatch([make[m]() for m in methods])
        out = np.full((len(methods), n - 1), np.nan)
        with torch.inference_mode():
            for t in range(n - 1):
                out[:, t] = stream_batch_nll_step(self.model, batch, x[t], x[t + 1])
                tick(t)
        self._streamed = {(m, cache_size, n): out[i] for i, m in enumerate(methods) if m != method}
        return out[methods.index(method)]

    def run_quality(self, method: str, cache_size: int | None) -> dict:
        n = self.cfg.ppl_tokens
        ids = self.tokens.first(n)[0].cpu()
        x = ids.to(self.device)
        model = self.model
        task = self.progress.add_task(f"quality: {method}" + (f" {cache_size}" if cache_size else ""), total=n - 1)
        tick = lambda i: self.progress.update(task, completed=i + 1)  # noqa: E731
        sampled, sample_size = False, None
        started = time.perf_counter()
        try:
            if method in STREAMING:
                nll = self._streaming_nll(method, cache_size, x, tick)
            elif is_dense(method):
                needed = n * measure.kv_bytes_per_token(self.config, self.dtype)
                ok, message = measure.fits(needed, self.device)
                if not ok:
                    return record("quality", method=method, cache_size=cache_size, length=n, mode="quality",
                                  status="oom", error=message)
                with self.scaling(method):
                    nll = nll_dense(model, x, on_step=tick)
            else:
                sample = self.cfg.recompute_ppl == "sample" or (
                    self.cfg.recompute_ppl == "auto" and self.device.type == "cpu")
                positions = None
                if sample and self.cfg.recompute_samples < n - 1:
                    rng = random.Random(self.cfg.seed)
                    positions = sorted(rng.sample(range(n - 1), self.cfg.recompute_samples))
                    sampled, sample_size = True, len(positions)
                    self.progress.update(task, total=len(positions))
                    counter = iter(range(1, len(positions) + 1))
                    tick = lambda i: self.progress.update(task, completed=next(counter))  # noqa: E731
                nll = nll_recompute(model, x, cache_size, positions, on_step=tick)
        finally:
            self.progress.remove_task(task)
        scaling = rope_scaling_of(method)
        extra = {"rope_scaling": {"type": scaling[0], "factor": scaling[1]}} if scaling else {}
        return record(
            "quality", method=method, cache_size=cache_size, length=n, mode="quality", status="ok", tokens=n, **extra,
            sinks=self.cfg.sinks if method == "sink" else 0, sampled=sampled, sample_size=sample_size,
            wall_s=time.perf_counter() - started, **summarise(nll, sampled=sampled, bucket_tokens=BUCKET_TOKENS),
            pretraining_length=getattr(self.config, "max_position_embeddings", None),
        )


__all__ = ["Bench", "BenchConfig", "METHODS", "TokenSource"]
