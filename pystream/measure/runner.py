"""What `pystream-bench` measures: cells (method x capacity x stream length) and quality (per-token NLL), each
returned as a measurement `{"record": kind, ...fields}` that `pystream.results` stamps and stores.

The methods themselves are in `cells.REGISTRY`; `Bench` plans the cells, runs each under one clock and memory
protocol, and gives the methods what they share: the model, the tokens, decoding with warm-up, streaming with
checkpoints, profiling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import clocks
from .cells import METHODS, is_dense, method
from . import quality_at



@dataclass(frozen=True)
class BenchConfig:
    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    cache_sizes: tuple[int, ...]  # capacities: sinks + window, as --cache-sizes gives them
    sinks: int = 4  # the sink method's sinks (the window gets the rest of the capacity)
    mode: str = "state"
    batch: int = 1
    steps: int = 32
    warmup: int = 3
    recompute_steps: int = 8  # recompute's timed steps (at most `steps`; see cells.RecomputeMethod.decode_steps)
    seed: int = 0
    ppl_tokens: int = 1536
    ppl_cache: int | None = None
    recompute_ppl: str = "auto"  # "all", "sample" or "auto" (sample on CPU, all on GPU)
    recompute_samples: int = 64  # recompute's first sample of positions (the pilot of the paired design)
    recompute_target: float = 0.05  # relative half-width of the 95% interval of sink PPL / recompute PPL to reach
    recompute_max_positions: int | None = 512  # the paired sample stops growing here (time bound of the default run)
    position_schemes: tuple[str, ...] = ("in-cache",)  # sink quality under each ("in-cache", "original")
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_every_s: float = 60.0  # --mode stream: save the cache this often, for --resume
    profile: bool = False  # --profile: a profiled pass after the timed steps, with a trace and a breakdown
    profile_steps: int = 8
    compile: bool = False  # --compile: time the decode steps compiled (cells.py says which methods can be)

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
        self.dtype = next(model.parameters()).dtype
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.profiling = False
        self.resumed_from_token = 0  # where the current cell's stream resumed from a checkpoint (0: from the start)

    # ---- the plan ---------------------------------------------------------------------------------------------------
    def cells(self) -> list[tuple[str, int | None, int]]:
        """(method, capacity, length) in the order they run: recompute first for each capacity, so that the others
        can report their speedup over it; dense once per length (it has no capacity)."""
        plan = []
        for length in self.cfg.lengths:
            for capacity in self.cfg.cache_sizes:
                for name in ("recompute", "sink", "window"):
                    if name in self.cfg.methods:
                        plan.append((name, capacity, length))
            for name in self.cfg.methods:
                if is_dense(name):
                    plan.append((name, None, length))
        return plan

    def quality_plan(self) -> list:
        """Quality at each length asked (`quality_at.quality_plan`): `QualityItem`s in the order they run."""
        return quality_at.quality_plan(self.cfg)

    def cell_identity(self, name: str, capacity: int | None, length: int) -> dict:
        """The first fields of a cell's record, which identify it (`pystream.results.record_key`)."""
        kind = method(name)
        return {"record": "cell", "method": name, "cache_size": capacity, "length": length,
                "mode": kind.mode(self.cfg), "sinks": kind.sinks(self.cfg)}

    def quality_identity(self, item) -> dict:
        return quality_at.quality_identity(self.cfg, item)

    # ---- one cell ---------------------------------------------------------------------------------------------------
    def run_cell(self, name: str, capacity: int | None, length: int, done: list[dict]) -> dict:
        kind = method(name)
        sinks = kind.sinks(self.cfg)
        common = dict(self.cell_identity(name, capacity, length), batch=self.cfg.batch,
                      window=None if capacity is None else capacity - sinks, dtype=self.cfg.dtype,
                      device=str(self.device),
                      text_cycled=self.tokens.cycles(length + self.cfg.warmup + self.cfg.steps))
        if kind.rope_scaling:
            common["rope_scaling"] = {"type": kind.rope_scaling[0], "factor": kind.rope_scaling[1]}
        started = time.perf_counter()
        self.resumed_from_token = 0
        why = kind.unsupported(self, length + self.cfg.warmup + self.cfg.steps)
        if why is not None:
            return dict(common, status="unsupported", error=why)
        needed = kind.kv_bytes_needed(self, length, self.cfg.batch, capacity)
        if needed is not None:
            ok, message = clocks.fits(needed, self.device, reserve_bytes=min(clocks.GIB, needed))
            if not ok:
                return dict(common, status="oom", error=message, kv_bytes_needed=needed)
        try:
            with clocks.peak_memory(self.device) as memory, kind.context(self):
                result = kind.time_cell(self, capacity, length)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if not clocks.is_allocation_failure(err):
                raise
            self.free_memory()
            return dict(common, status="oom", error=clocks.oom_message(err))
        latencies = result.pop("latencies_ms")
        summary = clocks.latency_summary(latencies)
        seconds = sum(latencies) / 1e3
        kv_read = result.get("kv_bytes", 0)
        rec = dict(
            common, status="ok", latency_ms=summary, timed_steps=len(latencies),
            warmup_steps=kind.decode_steps(self.cfg)[0], tokens_per_s=self.cfg.batch * len(latencies) / seconds,
            # gpt-fast's measure: bytes that must be read per step (weights and the KV attended) over the p50 time
            achieved_bandwidth_gb_s=(self.param_bytes + kv_read) / (summary["p50"] / 1e3) / 1e9,
            wall_s=time.perf_counter() - started, **memory, **result,
        )
        if self.resumed_from_token:
            rec["resumed_from_token"] = self.resumed_from_token
        self._add_speedup(rec, done)
        self.free_memory()
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

    def free_memory(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- what the methods share -------------------------------------------------------------------------------------
    def forward(self, input_ids, **kwargs):
        """One forward of the model; split into named ranges during a profiled pass."""
        if self.profiling:
            from .profiling import split_forward

            return split_forward(self.model, input_ids, **kwargs)
        return self.model(input_ids, **kwargs).logits

    def decode(self, step_fn, start: int, label: str, warmup: int | None = None,
               steps: int | None = None) -> list[float]:
        """Warm-up, then the timed steps (default the config's); `step_fn(tokens [batch, 1])` runs one decode step."""
        warmup = self.cfg.warmup if warmup is None else warmup
        total = warmup + (self.cfg.steps if steps is None else steps)
        task = self.progress.add_task(label, total=total, unit="steps")
        latencies = []
        try:
            with torch.inference_mode():
                for i in range(total):
                    x = self.tokens.get(start + i, 1)
                    _, ms = clocks.timed(self.device, lambda: step_fn(x))
                    if i >= warmup:
                        latencies.append(ms)
                    self.progress.advance(task)
        finally:
            self.progress.remove_task(task)
        return latencies

    def compile_warmup(self, decoder, start: int, step_fn=None) -> float:
        """The first two steps of a compiled decoder (tokens `start`, `start + 1`), untimed: compiling, and on a GPU
        recording the CUDA graph. Returns the seconds they took (the record's `compile_s`)."""
        step_fn = step_fn or decoder
        with torch.inference_mode():
            for i in range(2):
                step_fn(self.tokens.get(start + i, 1))
        return decoder.compile_s

    def profile(self, step_fn, start: int, label: str, cache=None, compiled=None) -> dict:
        """A profiled pass of `profile_steps` more decode steps (after the timed ones, so that timing is clean).
        With `compiled` (the compiled step, --compile): as many more steps through it, whose op and kernel counts
        sit beside the eager ones in `compiled`."""
        from .profiling import profile_steps

        kv = getattr(cache, "kv", None)
        name = label.replace(' ', '-').replace('@', 'at').replace(',', '')
        trace = None if self.run_dir is None else self.run_dir / "traces" / f"{name}.json"
        self.profiling = True
        if kv is not None:
            kv.profile = True
        try:
            with torch.inference_mode():
                result = profile_steps(lambda i: step_fn(self.tokens.get(start + i, 1)), self.cfg.profile_steps,
                                       self.device, trace)
        finally:
            self.profiling = False
            if kv is not None:
                kv.profile = False
        if compiled is not None:
            start += self.cfg.profile_steps
            with torch.inference_mode():
                result["compiled"] = profile_steps(
                    lambda i: compiled(self.tokens.get(start + i, 1)), self.cfg.profile_steps, self.device,
                    None if trace is None else trace.with_name(f"{name}-compiled.json"))
        return result

    def _checkpoint_path(self, label: str) -> Path | None:
        if self.run_dir is None or self.cfg.mode != "stream":
            return None
        return self.run_dir / "checkpoints" / f"{label}.safetensors"

    def stream_tokens(self, cache, length: int, label: str, feed) -> None:
        """Stream tokens 0..length-1 for real through `feed(start, count)`, with a progress bar, resuming from and
        saving checkpoints (every `checkpoint_every_s`) when the run has a directory."""
        from . import checkpoint

        path = self._checkpoint_path(label.replace(" ", "-").replace("@", "at").replace(",", ""))
        start = 0
        if path is not None and path.exists():
            checkpoint.load(path, cache, self.device)
            start = cache.seen() if hasattr(cache, "seen") else cache.get_seq_length()
            # the cell's wall_s / setup_s then time only tokens start..length-1: the record says so
            self.resumed_from_token = start
        task = self.progress.add_task(f"{label}: streaming {length:,} tokens", total=length, completed=start,
                                      unit="tokens")
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
            try:  # the folder too, once no other stream's checkpoint is in it
                path.parent.rmdir()
            except OSError:
                pass

    # ---- quality ----------------------------------------------------------------------------------------------------
    def run_quality(self, item, records: list[dict]) -> dict:
        """One quality record (`quality_at.run_quality`); `records`: the run's finished ones (recompute's pair)."""
        return quality_at.run_quality(self, item, records)


__all__ = ["Bench", "BenchConfig", "METHODS", "TokenSource"]
