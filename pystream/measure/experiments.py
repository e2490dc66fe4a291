"""`pystream-bench --experiment paper`: the paper's five findings, reproduced on the bundled model and text.

1. "ppl": perplexity against token position past the pre-training window, for dense, window, recompute and sink at
   one cache size, over 65,536 tokens (the paper's Figure 3 and Table 1): sink and window exact through the chunked
   evaluator, dense in exact chunks, recompute at a random sample of positions paired with sink's NLL at the same
   tokens, the sample grown until the 95% interval of sink PPL / recompute PPL is within 3%.
2. "sinks": the number of sinks at a fixed total cache: 0, 1, 2, 4, 8 (Table 2), over the same tokens (the 0- and
   4-sink streams are part 1's window and sink).
3. "cache": the cache size at 4 sinks: 256 to 2048 (Table 6).
4. "attention": where attention goes: the share each layer and head gives to the first token, and average attention
   maps of a few layers, from real forwards on the text (Figure 2).
5. "stability": perplexity per 65,536-token chunk over a long sink stream (default 1,048,576 tokens; the paper's
   Figure 5), exact through the chunked evaluator; it continues part 1's sink stream when both run in one process.

Sink and window streams go through the chunked evaluator (`evaluator.stream_nll`); ALiBi models, which it cannot
serve, stream token by token as one batch (`StreamBatch`). Every part writes its records to the run directory as it
finishes; long streams checkpoint (the stability stream after each unit, token-by-token batches every few minutes),
so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache.batch import StreamBatch
from ..cache.chunked_attention import ChunkedStream
from ..cache.hf import dense_length_limit, eager_attention, streaming_cache, uses_alibi
from ..inputs.paper import PAPER_SINKS, SINK_COUNTS
from . import clocks
from .evaluator import StreamNLL, dense_nll, paired_recompute, recompute_nll_at, stream_nll
from .quality import stream_batch_nll_step, summarise
from .quality_at import pair_of, paired_fields

PARTS = ("ppl", "sinks", "cache", "attention", "stability")

@dataclass(frozen=True)
class PaperConfig:
    parts: tuple[str, ...] = PARTS
    tokens: int = 65_536  # parts 1 and 2: Table 1's 65K tokens, 8x the bundled model's 8,192-token pre-training
    cache: int = 256  # capacity (sinks + window) for parts 1, 2 and 5
    sink_counts: tuple[int, ...] = SINK_COUNTS  # part 2: the sink counts compared at that capacity (Table 2)
    cache_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # part 3: capacities at PAPER_SINKS sinks (Table 6)
    cache_tokens: int = 4_096  # part 3
    recompute_samples: int = 96  # part 1: recompute's first (pilot) sample of positions
    recompute_target: float = 0.03  # ...grown until sink PPL / recompute PPL is known within 3% (95% interval)
    recompute_max_positions: int | None = 4_096  # ...or this many positions (the time bound)
    attention_segments: int = 16
    attention_tokens: int = 64
    stability_tokens: int = 1 << 20  # part 5: a sink stream of 1,048,576 tokens
    stability_chunk: int = 65_536  # part 5: PPL per chunk of this many tokens (Figure 5)
    stability_unit: int = 131_072  # ...evaluated this many tokens at a time, with a checkpoint after each
    stability_keep_nll: int = 65_536  # longer streams keep the chunk PPLs only (a million NLLs would be 10 MB of JSON)
    chunk: int = 1_024  # parts 1-3: PPL per bucket of this many tokens (perplexity against position)
    seed: int = 0
    checkpoint_every_s: float = 120.0  # token-by-token batches (ALiBi models)


def _remove_checkpoints(folder: Path | None) -> None:
    """A finished stream's checkpoints go, and checkpoints/ with the last of them (as in pystream-bench runs)."""
    if folder is None or not folder.exists():
        return
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    with contextlib.suppress(OSError):  # other streams' checkpoints are still there
        folder.parent.rmdir()


class PaperExperiment:
    def __init__(self, cfg: PaperConfig, model, ids: np.ndarray, writer, progress, device, run_dir: Path | None):
        self.cfg, self.model, self.writer, self.progress = cfg, model, writer, progress
        self.device = torch.device(device)
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.run_dir = run_dir
        self.pretraining = getattr(model.config, "max_position_embeddings", None)
        # the chunked evaluator serves RoPE models; ALiBi ones stream token by token, as one batch
        self.chunked = not uses_alibi(model)
        self._sink_run: tuple[StreamNLL, ChunkedStream] | None = None  # part 1's sink stream, for parts 1 and 5

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def text(self, count: int, offset: int = 0) -> torch.Tensor:
        index = (torch.arange(count) + offset) % len(self.ids)
        return self.ids[index]

    def _done(self, key) -> bool:
        return self.writer.done(key) is not None

    @staticmethod
    def _identity(method, cache_size, sinks, tokens, experiment, kind="quality") -> dict:
        """The first fields of a record, which identify it (`pystream.results.record_key`)."""
        return {"record": kind, "method": method, "cache_size": cache_size, "sinks": sinks or 0, "length": tokens,
                "mode": f"experiment:{experiment}"}

    def _quality(self, method, cache_size, sinks, nll, experiments, **extra) -> dict:
        sampled = extra.pop("sampled", False)
        tokens = len(nll) + 1
        return {**self._identity(method, cache_size, sinks, tokens, experiments[0]), "status": "ok",
                "tokens": tokens, "sampled": sampled, "experiments": experiments,
                **summarise(nll, sampled=sampled, bucket_tokens=self.cfg.chunk),
                "pretraining_length": self.pretraining, **extra}

    def _stream_batch(self, name: str, caches: list, tokens: int) -> np.ndarray:
        """Stream `tokens` tokens of the text through every cache as one batch; per-token NLL `[rows, tokens-1]`.
        Checkpoints every `checkpoint_every_s` and resumes from the last one."""
        from . import checkpoint

        rows = len(caches)
        nll = np.full((rows, tokens - 1), np.nan)
        start = 0
        folder = None if self.run_dir is None else self.run_dir / "checkpoints" / name
        if folder is not None and (folder / "nll.npy").exists():
            saved = np.load(folder / "nll.npy")
            for i, cache in enumerate(caches):
                checkpoint.load(folder / f"cache{i}.safetensors", cache, self.device)
            start = caches[0].seen()
            nll[:, :start] = saved[:, :start]
        batch = StreamBatch(caches)
        x_all = self.text(tokens).to(self.device)
        task = self.progress.add_task(f"{name}: {rows} stream(s) x {tokens:,} tokens", total=tokens, completed=start,
                                      unit="tokens")
        last_save = time.monotonic()
        try:
            with torch.inference_mode():
                for t in range(start, tokens - 1):
                    nll[:, t] = stream_batch_nll_step(self.model, batch, x_all[t], x_all[t + 1])
                    self.progress.advance(task)
                    if folder is not None and time.monotonic() - last_save > self.cfg.checkpoint_every_s:
                        folder.mkdir(parents=True, exist_ok=True)
                        for i, cache in enumerate(caches):
                            checkpoint.save(folder / f"cache{i}.safetensors", cache)
                        np.save(folder / "nll.npy", nll)
                        last_save = time.monotonic()
        finally:
            self.progress.remove_task(task)
        _remove_checkpoints(folder)
        return nll

    # ---- parts -----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        if "ppl" in cfg.parts or "sinks" in cfg.parts:
            self.part_stream()
        if "ppl" in cfg.parts:
            self.part_baselines()
        if "cache" in cfg.parts:
            self.part_cache()
        if "attention" in cfg.parts:
            self.part_attention()
        if "stability" in cfg.parts:
            self.part_stability()

    def _stream_caches(self, sinks: list[int], capacity: int):
        return [streaming_cache(capacity, s, self.model.config, device=self.device) for s in sinks]

    def _evaluate(self, sinks: int, capacity: int, tokens: int, label: str,
                  stream: ChunkedStream | None = None) -> tuple[StreamNLL, ChunkedStream]:
        """One sink (or window, 0 sinks) stream over the text's first `tokens` tokens, exact through the chunked
        evaluator, with a progress bar (tokens/s, ETA); the `ChunkedStream` is returned so that it can continue."""
        stream = stream or ChunkedStream(self.model, sinks, capacity - sinks)
        task = self.progress.add_task(f"{label}: {sinks}+{capacity - sinks} over {tokens:,} tokens (exact, chunked)",
                                      total=tokens - 1, unit="tokens")
        try:
            result = stream_nll(self.model, self.text(tokens).to(self.device), num_sinks=sinks,
                                window=capacity - sinks, end=tokens, stream=stream,
                                on_progress=lambda done, total: self.progress.update(task, completed=done))
        finally:
            self.progress.remove_task(task)
        return result, stream

    def _stream_key(self, sinks: int, capacity: int, tokens: int, experiment: str) -> dict:
        scheme = {"position_scheme": "in-cache"} if self.chunked else {}  # part of a record's identity
        return {**self._identity("sink" if sinks else "window", capacity, sinks, tokens, experiment), **scheme}

    def _stream_record(self, key: dict, nll: np.ndarray, experiments: list[str], wall_s: float,
                       result: StreamNLL | None = None) -> dict:
        rec = {**self._quality(key["method"], key["cache_size"], key["sinks"], nll, experiments), **key,
               "window": key["cache_size"] - key["sinks"], "start": 1, "end": len(nll) + 1, "wall_s": wall_s}
        if result is not None:
            rec.update(evaluator="chunked", streamed_from=result.streamed_from, tokens_fed=result.tokens_fed)
        else:
            rec.update(evaluator="token-by-token")
        return rec

    def part_stream(self) -> None:
        """Parts 1 and 2: every sink count at the same total cache, over the same tokens."""
        cfg = self.cfg
        sinks = list(cfg.sink_counts) if "sinks" in cfg.parts else [0, PAPER_SINKS]
        for required in (0, PAPER_SINKS):
            if required not in sinks:
                sinks.append(required)
        sinks.sort(key=lambda s: s != PAPER_SINKS)  # part 1's sink stream first: recompute and stability use it

        def experiments(s):
            return (["stream"] + (["ppl"] if s in (0, PAPER_SINKS) else [])
                    + (["sinks"] if s in cfg.sink_counts else []))

        keys = {s: self._stream_key(s, cfg.cache, cfg.tokens, "stream") for s in sinks}
        todo = [s for s in sinks if not self._done(keys[s])]
        if not todo:
            return
        if not self.chunked:
            started = time.perf_counter()
            nll = self._stream_batch("sinks-and-window", self._stream_caches(todo, cfg.cache), cfg.tokens)
            wall_s = (time.perf_counter() - started) / len(todo)  # one batch: its time shared by its streams
            for row, s in enumerate(todo):
                self.writer.append(self._stream_record(keys[s], nll[row], experiments(s), wall_s))
            return
        for s in todo:
            started = time.perf_counter()
            result, stream = self._evaluate(s, cfg.cache, cfg.tokens, "sink" if s else "window")
            if s == PAPER_SINKS:
                self._sink_run = (result, stream)
            self.writer.append(self._stream_record(keys[s], result.nll, experiments(s),
                                                   time.perf_counter() - started, result))

    def _sink_result(self) -> StreamNLL | None:
        """Part 1's sink stream: from this process, or as its record has it (a resumed run)."""
        if self._sink_run is not None:
            return self._sink_run[0]
        return pair_of(self.writer.records, "sink", self.cfg.cache, self.cfg.tokens, "in-cache")

    def part_baselines(self) -> None:
        """Part 1's dense and recompute over the same tokens."""
        cfg = self.cfg
        x = self.text(cfg.tokens).to(self.device)
        key = self._identity("dense", None, 0, cfg.tokens, "ppl")
        if not self._done(key):
            self.writer.append(self._dense(key, x))
        key = self._identity("recompute", cfg.cache, 0, cfg.tokens, "ppl")
        if not self._done(key):
            self.writer.append(self._recompute(key, x))

    def _dense(self, key: dict, x: torch.Tensor) -> dict:
        """Dense over the whole stream in exact chunks (its KV grows to every token: predicted first, refused when it
        does not fit, as in pystream-bench)."""
        tokens = x.numel()
        base = {**key, "tokens": tokens, "experiments": ["ppl"], "pretraining_length": self.pretraining}
        limit = dense_length_limit(self.model)
        if limit is not None and tokens > limit[0]:
            return {**base, "status": "unsupported", "error": limit[1]}
        needed = tokens * clocks.kv_bytes_per_token(self.model.config, self.model.dtype)
        ok, message = clocks.fits(needed, self.device)
        if not ok:
            return {**base, "status": "oom", "error": message, "kv_bytes_needed": needed}
        started = time.perf_counter()
        task = self.progress.add_task(f"dense over {tokens:,} tokens (exact chunks)", total=tokens - 1,
                                      unit="tokens")
        try:
            result = dense_nll(self.model, x, end=tokens,
                               on_progress=lambda done, total: self.progress.update(task, completed=done))
        except (torch.OutOfMemoryError, MemoryError) as err:
            return {**base, "status": "oom", "error": f"OOM: {str(err).splitlines()[0] if str(err) else err!r}",
                    "kv_bytes_needed": needed}
        finally:
            self.progress.remove_task(task)
        return {**self._quality("dense", None, 0, result.nll, ["ppl"]), **key, "start": 1, "end": tokens,
                "evaluator": "chunked", "tokens_fed": result.tokens_fed, "wall_s": time.perf_counter() - started}

    def _recompute(self, key: dict, x: torch.Tensor) -> dict:
        """Sliding window with re-computation at a random sample of positions, paired with sink's NLL at the same
        tokens: the sample grows until sink PPL / recompute PPL is known within `recompute_target` (95%)."""
        cfg = self.cfg
        started = time.perf_counter()
        against = self._sink_result()
        if against is None:  # no sink stream to pair with (it failed): recompute alone at the pilot sample
            rng = random.Random(cfg.seed)
            positions = np.array(sorted(rng.sample(range(1, cfg.tokens), min(cfg.recompute_samples,
                                                                                cfg.tokens - 1))))
            task = self.progress.add_task(f"recompute at {len(positions)} sampled positions", total=None)
            try:
                nll = np.full(cfg.tokens - 1, np.nan)
                nll[positions - 1] = recompute_nll_at(self.model, x, positions, cfg.cache)
            finally:
                self.progress.remove_task(task)
            return {**self._quality("recompute", cfg.cache, 0, nll, ["ppl"], sampled=True,
                                    sample_size=len(positions)), **key, "wall_s": time.perf_counter() - started}
        task = self.progress.add_task(f"recompute {cfg.cache}, paired with sink: positions until the ratio is known "
                                      f"within {cfg.recompute_target:.0%}", total=None, unit="positions")
        try:
            paired = paired_recompute(
                self.model, x, against, context=cfg.cache, target_rel_half_width=cfg.recompute_target,
                pilot_positions=cfg.recompute_samples, max_positions=cfg.recompute_max_positions, seed=cfg.seed,
                on_progress=lambda done, total: self.progress.update(task, completed=done, total=total))
        finally:
            self.progress.remove_task(task)
        return {**key, "status": "ok", "tokens": cfg.tokens, "experiments": ["ppl"],
                "pretraining_length": self.pretraining, "start": against.start, "end": against.end,
                **paired_fields(paired, against, cfg.chunk), "wall_s": time.perf_counter() - started}

    def part_cache(self) -> None:
        """Part 3: the cache size at 4 sinks, every size over the same tokens."""
        cfg = self.cfg
        keys = {c: self._stream_key(PAPER_SINKS, c, cfg.cache_tokens, "cache") for c in cfg.cache_sizes}
        sizes = [c for c in cfg.cache_sizes if not self._done(keys[c])]
        if not sizes:
            return
        if not self.chunked:
            started = time.perf_counter()
            caches = [streaming_cache(c, PAPER_SINKS, self.model.config, device=self.device) for c in sizes]
            nll = self._stream_batch("cache-sizes", caches, cfg.cache_tokens)
            wall_s = (time.perf_counter() - started) / len(sizes)
            for row, size in enumerate(sizes):
                self.writer.append(self._stream_record(keys[size], nll[row], ["cache"], wall_s))
            return
        for size in sizes:
            started = time.perf_counter()
            result, _ = self._evaluate(PAPER_SINKS, size, cfg.cache_tokens, "cache size")
            self.writer.append(self._stream_record(keys[size], result.nll, ["cache"], time.perf_counter() - started,
                                                   result))

    def part_attention(self) -> None:
        """Part 4: attention of real forwards on the text (eager attention, which returns the weights)."""
        cfg = self.cfg
        key = self._identity("dense", None, 0, cfg.attention_tokens, "attention", kind="attention")
        if self._done(key):
            return
        n, segments = cfg.attention_tokens, cfg.attention_segments
        stride = max(n, len(self.ids) // segments)
        batch = torch.stack([self.text(n, offset=i * stride) for i in range(segments)]).to(self.device)
        with eager_attention(self.model), torch.inference_mode():
            out = self.model(batch, output_attentions=True, use_cache=False)
        attentions = [a.float().mean(0).cpu() for a in out.attentions]  # per layer [heads, n, n], over segments
        skip = min(8, n // 4)  # the first queries can only look at the first tokens: leave them out of the share
        share_first = [[float(layer[h, skip:, 0].mean()) for h in range(layer.shape[0])] for layer in attentions]
        share_first4 = [[float(layer[h, skip:, :4].sum(-1).mean()) for h in range(layer.shape[0])]
                        for layer in attentions]
        count = len(attentions)
        shown = sorted({0, 1, count // 2, count - 1})
        maps = {str(i): attentions[i].mean(0).tolist() for i in shown}
        self.writer.append(dict(
            key, status="ok", tokens=n, segments=segments, layers=count, heads=attentions[0].shape[0],
            share_first_token=share_first, share_first_4_tokens=share_first4, skipped_queries=skip,
            maps=maps, uniform_share=float(np.mean([1.0 / (q + 1) for q in range(skip, n)]))))

    def part_stability(self) -> None:
        """Part 5 on a long sink stream (in-cache positions), exact through the chunked evaluator, in units of
        `stability_unit` predicted tokens with a checkpoint (the NLL so far) after each. Within one process the units,
        and part 1's sink stream before them, are one continuing stream; a resumed run starts its first unit from
        the warm-up start with the sinks in front (exact: a token's state depends only on the sinks and the previous
        layers x (W - 1) tokens)."""
        cfg = self.cfg
        tokens = cfg.stability_tokens
        key = {**self._identity("sink", cfg.cache, PAPER_SINKS, tokens, "stability"),
               "position_scheme": "in-cache"}  # part of a record's identity (record_key)
        if self._done(key):
            return
        base = {**key, "tokens": tokens, "sampled": False, "experiments": ["stability"],
                "pretraining_length": self.pretraining}
        if not self.chunked:
            self.writer.append({**base, "status": "unsupported", "evaluator": "token-by-token",
                                "error": f"{self.model.config.model_type} (ALiBi) streams token by token only, too "
                                         "slow for the stability stream: see part 1's perplexity per position"})
            return
        ids = self.text(tokens).to(self.device)
        nll = np.full(tokens - 1, np.nan)
        folder = None if self.run_dir is None else self.run_dir / "checkpoints" / "stability"
        start, stream = 1, None
        if folder is not None and (folder / "nll.npy").exists():
            saved = np.load(folder / "nll.npy")
            start = int(saved.shape[0] - np.isnan(saved[::-1]).argmin()) + 1 if not np.isnan(saved).all() else 1
            nll[:start - 1] = saved[:start - 1]
        elif self._sink_run is not None and self._sink_run[0].end <= tokens:
            first, stream = self._sink_run  # part 1 streamed these tokens already: continue its stream
            nll[:first.end - 1] = first.nll
            start = first.end
        task = self.progress.add_task(f"stability: sink {PAPER_SINKS}+{cfg.cache - PAPER_SINKS} over {tokens:,} "
                                      "tokens (exact, chunked)", total=tokens - 1, completed=start - 1,
                                      unit="tokens")
        started = time.perf_counter()
        fed = 0
        try:
            for a in range(start, tokens, cfg.stability_unit):
                b = min(a + cfg.stability_unit, tokens)
                stream = stream or ChunkedStream(self.model, PAPER_SINKS, cfg.cache - PAPER_SINKS)

                # a unit's warm-up counts as part of it, for an even ETA; its last forward reports b - 1. Only ever
                # forward: a step back then an advance would read as a unit's tokens in an instant to the bar's rate
                def progress(done, total, a=a, b=b):
                    self.progress.update(task, completed=a - 1 + (b - a) * done / total)

                part = stream_nll(self.model, ids, num_sinks=PAPER_SINKS, window=cfg.cache - PAPER_SINKS, start=a,
                                  end=b, stream=stream, on_progress=progress)
                nll[a - 1:b - 1] = part.nll
                fed += part.tokens_fed
                if folder is not None and b < tokens:  # the unit is done: a killed run keeps it
                    folder.mkdir(parents=True, exist_ok=True)
                    np.save(folder / "nll.npy", nll)
        finally:
            self.progress.remove_task(task)
        _remove_checkpoints(folder)
        wall_s = time.perf_counter() - started
        rec = {**base, "status": "ok", "evaluator": "chunked", "start": 1, "end": tokens, "window": cfg.cache - PAPER_SINKS,
               **summarise(nll, sampled=False, bucket_tokens=cfg.stability_chunk),
               # this process's share: the tokens it fed and its time (part 1's stream, when continued, is in its
               # own record)
               "tokens_fed": fed, "wall_s": wall_s, "timed_from_token": start}
        if tokens - 1 > cfg.stability_keep_nll:
            rec["nll"] = None
        self.writer.append(rec)
