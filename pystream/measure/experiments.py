"""`pystream-bench --experiment paper`: the paper's five findings, reproduced on the bundled model and text.

1. "ppl": perplexity against token position past the pre-training window, for dense, window, recompute and sink at
   one cache size (the paper's Figure 3 and Table 1).
2. "sinks": the number of sinks at a fixed total cache: 0, 1, 2, 4, 8 (Table 2). Streamed together with part 1
   (the 0- and 4-sink streams are part 1's window and sink) as one batch of five streams, one forward per token.
3. "cache": the cache size at 4 sinks: 256 to 2048 (Table 6), the sizes as one batch.
4. "attention": where attention goes: the share each layer and head gives to the first token, and average attention
   maps of a few layers, from real forwards on the text (Figure 2).
5. "stability": perplexity per chunk over a long stream: part 1's sink stream, or with --stability-tokens (1M, 4M,
   ...) a separate one, exact through the chunked evaluator, as PPL per 65,536-token chunk (the paper's Figure 5).

Every part writes its records to the run directory as it finishes; long streams checkpoint every few minutes, so a
killed run resumes where it stopped.
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
from ..cache.hf import eager_attention, streaming_cache
from ..inputs.paper import PAPER_SINKS, SINK_COUNTS
from .evaluator import stream_nll
from .quality import nll_dense, nll_recompute, stream_batch_nll_step, summarise

PARTS = ("ppl", "sinks", "cache", "attention", "stability")

@dataclass(frozen=True)
class PaperConfig:
    parts: tuple[str, ...] = PARTS
    tokens: int = 12_288  # parts 1 and 2: past the bundled model's 8,192-token pre-training window
    cache: int = 256  # capacity (sinks + window) for parts 1, 2 and 5
    sink_counts: tuple[int, ...] = SINK_COUNTS  # part 2: the sink counts compared at that capacity (Table 2)
    cache_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # part 3: capacities at PAPER_SINKS sinks (Table 6)
    cache_tokens: int = 4_096  # part 3
    recompute_samples: int = 96
    attention_segments: int = 16
    attention_tokens: int = 64
    stability_tokens: int | None = None  # None: analyse part 1's sink stream
    stability_chunk: int = 65_536  # part 5 with stability_tokens: PPL per chunk of this many tokens (Figure 5)
    stability_unit: int = 131_072  # ...evaluated this many tokens at a time, each with its warm-up; a checkpoint after each
    stability_keep_nll: int = 65_536  # longer streams keep the chunk PPLs only (a million NLLs would be 10 MB of JSON)
    chunk: int = 1_024
    seed: int = 0
    checkpoint_every_s: float = 120.0


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
        task = self.progress.add_task(f"{name}: {rows} stream(s) x {tokens:,} tokens", total=tokens, completed=start)
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
        if "stability" in cfg.parts and cfg.stability_tokens:
            self.part_stability()

    def _stream_caches(self, sinks: list[int], capacity: int):
        return [streaming_cache(capacity, s, self.model.config, device=self.device) for s in sinks]

    def part_stream(self) -> None:
        """Parts 1 and 2 in one batch: every sink count at the same total cache, over the same tokens."""
        cfg = self.cfg
        sinks = list(cfg.sink_counts) if "sinks" in cfg.parts else [0, PAPER_SINKS]
        for required in (0, PAPER_SINKS):
            if required not in sinks:
                sinks.append(required)
        keys = {s: self._identity("sink" if s else "window", cfg.cache, s, cfg.tokens, "stream") for s in sinks}
        todo = [s for s in sinks if not self._done(keys[s])]
        if not todo:
            return
        nll = self._stream_batch("sinks-and-window", self._stream_caches(todo, cfg.cache), cfg.tokens)
        for row, s in enumerate(todo):
            experiments = ["stream"] + (["ppl"] if s in (0, PAPER_SINKS) else [])
            experiments += (["sinks"] if s in cfg.sink_counts else []) + (["stability"] if s == PAPER_SINKS else [])
            self.writer.append(self._quality("sink" if s else "window", cfg.cache, s, nll[row], experiments))

    def part_baselines(self) -> None:
        """Part 1's dense and recompute over the same tokens."""
        cfg = self.cfg
        x = self.text(cfg.tokens).to(self.device)
        key = self._identity("dense", None, 0, cfg.tokens, "ppl")
        if not self._done(key):
            task = self.progress.add_task(f"dense over {cfg.tokens:,} tokens", total=cfg.tokens - 1)
            try:
                nll = nll_dense(self.model, x, on_step=lambda i: self.progress.update(task, completed=i + 1))
            finally:
                self.progress.remove_task(task)
            self.writer.append(self._quality("dense", None, 0, nll, ["ppl"]))
        key = self._identity("recompute", cfg.cache, 0, cfg.tokens, "ppl")
        if not self._done(key):
            rng = random.Random(cfg.seed)
            positions = sorted(rng.sample(range(cfg.tokens - 1), min(cfg.recompute_samples, cfg.tokens - 1)))
            task = self.progress.add_task(f"recompute at {len(positions)} sampled positions", total=len(positions))
            try:
                nll = nll_recompute(self.model, x, cfg.cache, positions, on_step=lambda i: self.progress.advance(task))
            finally:
                self.progress.remove_task(task)
            self.writer.append(self._quality("recompute", cfg.cache, 0, nll, ["ppl"], sampled=True,
                                             sample_size=len(positions)))

    def part_cache(self) -> None:
        """Part 3: the cache size at 4 sinks, every size over the same tokens, as one batch."""
        cfg = self.cfg
        sizes = [c for c in cfg.cache_sizes
                 if not self._done(self._identity("sink", c, PAPER_SINKS, cfg.cache_tokens, "cache"))]
        if not sizes:
            return
        caches = [streaming_cache(c, PAPER_SINKS, self.model.config, device=self.device) for c in sizes]
        nll = self._stream_batch("cache-sizes", caches, cfg.cache_tokens)
        for row, size in enumerate(sizes):
            self.writer.append(self._quality("sink", size, PAPER_SINKS, nll[row], ["cache"]))

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
        """Part 5 on its own longer stream (sink cache, in-cache positions), exact through the chunked evaluator
        (`evaluator.stream_nll`): units of `stability_unit` predicted tokens, each streamed from its warm-up start with
        the sinks in front (exact: a token's state depends only on the sinks and the previous layers x (W - 1)
        tokens), so a killed run resumes from the last finished unit."""
        cfg = self.cfg
        key = {**self._identity("sink", cfg.cache, PAPER_SINKS, cfg.stability_tokens, "stability"),
               "position_scheme": "in-cache"}  # part of a record's identity (record_key)
        if self._done(key):
            return
        tokens = cfg.stability_tokens
        ids = self.text(tokens)
        nll = np.full(tokens - 1, np.nan)
        folder = None if self.run_dir is None else self.run_dir / "checkpoints" / "stability"
        start = 1
        if folder is not None and (folder / "nll.npy").exists():
            saved = np.load(folder / "nll.npy")
            start = int(saved.shape[0] - np.isnan(saved[::-1]).argmin()) + 1 if not np.isnan(saved).all() else 1
            nll[:start - 1] = saved[:start - 1]
        task = self.progress.add_task(f"stability: sink {PAPER_SINKS}+{cfg.cache - PAPER_SINKS} over {tokens:,} "
                                      "tokens (exact, chunked)", total=tokens - 1, completed=start - 1)
        try:
            for a in range(start, tokens, cfg.stability_unit):
                b = min(a + cfg.stability_unit, tokens)
                part = stream_nll(self.model, ids, num_sinks=PAPER_SINKS, window=cfg.cache - PAPER_SINKS, start=a,
                                  end=b)
                nll[a - 1:b - 1] = part.nll
                if folder is not None and b < tokens:
                    folder.mkdir(parents=True, exist_ok=True)
                    np.save(folder / "nll.npy", nll)
                self.progress.advance(task, b - a)
        finally:
            self.progress.remove_task(task)
        _remove_checkpoints(folder)
        rec = {**key, "status": "ok", "tokens": tokens, "sampled": False, "experiments": ["stability"],
               "evaluator": "chunked", "start": 1, "end": tokens,
               **summarise(nll, sampled=False, bucket_tokens=cfg.stability_chunk),
               "pretraining_length": self.pretraining}
        if tokens - 1 > cfg.stability_keep_nll:
            rec["nll"] = None
        self.writer.append(rec)
