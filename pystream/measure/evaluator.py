"""Exact per-token NLL of a stream at any position, at chunk speed: sink and window caches (any S, W), dense and the
RoPE-scaled dense baselines, and sliding window with re-computation paired with them at sampled positions.

Conventions (shared by every function here):
- `ids`: the stream's token ids, `[n]` or `[1, n]` int64 (batch 1: one stream per call). A stream longer than a text
  is the text cycled, built by the caller; only `ids[:num_sinks]` and the tokens from the warm-up start on are read.
- `start`, `end`: the predicted tokens, 0-based half-open: `nll[i] = -log p(ids[start + i] | what the method keeps of
  ids[:start + i])`, natural log, float64, `1 <= start < end <= n`.
- `on_progress(done, total)`: called after each forward with the tokens fed so far and in all (for a bar with
  tokens/s and ETA).

How sink and window quality stays cheap at any position (issue 13, fact 2): a token's hidden state at layer l depends
only on the sinks and the previous l x (W - 1) tokens. So the exact state before `start` is reached by streaming,
chunked, from `start - 1 - num_hidden_layers x (W - 1)` with the sinks in front: PPL at position 1M costs what it
costs at 64k. The chunked forwards are `pystream.cache.chunked_attention.ChunkedStream` (exact against token-by-token
`SinkCache` / `WindowCache` streaming; tests/test_evaluator.py). ALiBi models (BLOOM, MPT) are token-by-token only.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pystream.measure.baselines import recompute_logits
from pystream.cache.chunked_attention import POSITION_SCHEMES, ChunkedStream, check_chunkable
from pystream.cache.hf import dense_cache, rope_scaled
from pystream.measure.warmup import warmup_start

__all__ = ["StreamNLL", "PairedRecompute", "stream_nll", "dense_nll", "recompute_nll_at", "paired_recompute",
           "warmup_start", "POSITION_SCHEMES"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StreamNLL:
    """Per-token NLL of the predicted tokens `[start, end)` of one stream under one method.

    `nll`: `[end - start]` float64. `method`: "sink", "window", "dense" or "dense-<pi|ntk|yarn>:<factor>".
    `position_scheme`: "in-cache" or "original" for sink and window, None for dense. `streamed_from`: the first
    token after the sinks that was actually fed (0: the whole stream; else the warm-up start). `tokens_fed`: tokens
    run through the model in all."""

    nll: np.ndarray
    start: int
    end: int
    method: str
    num_sinks: int | None = None
    window: int | None = None
    position_scheme: str | None = None
    streamed_from: int = 0
    tokens_fed: int = 0

    @property
    def ppl(self) -> float:
        return float(math.exp(self.nll.mean()))

    def at(self, positions: np.ndarray) -> np.ndarray:
        """NLL of the predicted tokens `positions` (stream indices in `[start, end)`)."""
        return self.nll[np.asarray(positions) - self.start]


@dataclass(frozen=True)
class PairedRecompute:
    """Sliding window with re-computation (span `context`) at `positions` (sorted predicted-token indices, a
    uniform sample without replacement of the `population` tokens `[start, end)`), paired with another method's NLL
    at the same tokens.

    `ratio` = that method's PPL / recompute's PPL over the sampled tokens = exp(mean(d)), d = method NLL - recompute
    NLL per token; `ratio_ci` its `confidence` interval, exp(mean(d) -/+ z se), se with the finite-population
    correction (so sampling every token gives a zero-width, exact interval). `rel_half_width` = exp(z se) - 1.
    `recompute_ppl` / `recompute_ppl_ci`: recompute's own PPL over the sample, unpaired interval."""

    context: int
    method: str
    start: int
    end: int
    positions: np.ndarray
    recompute_nll: np.ndarray
    method_nll: np.ndarray
    ratio: float
    ratio_ci: tuple[float, float]
    rel_half_width: float
    recompute_ppl: float
    recompute_ppl_ci: tuple[float, float]
    confidence: float
    target_rel_half_width: float
    rounds: list = field(default_factory=list)  # (positions, rel_half_width) after each round, for the record

    @property
    def population(self) -> int:
        return self.end - self.start

    @property
    def met_target(self) -> bool:
        return self.rel_half_width <= self.target_rel_half_width


def _as_stream(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("ids must be an integer tensor [n] or [1, n]")
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"ids must be one stream, [n] or [1, n]; got shape {tuple(ids.shape)} (batch 1 only)")
    return ids


def _range(ids: torch.Tensor, start: int, end: int | None) -> tuple[int, int]:
    end = ids.numel() if end is None else int(end)
    if not 1 <= start < end <= ids.numel():
        raise ValueError(f"need 1 <= start < end <= {ids.numel()} tokens, got start={start}, end={end}")
    return int(start), end


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").double().cpu().numpy()


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def stream_nll(model, ids: torch.Tensor, *, num_sinks: int, window: int, position_scheme: str = "in-cache",
               start: int = 1, end: int | None = None, chunk_tokens: int | None = None, warmup: bool = True,
               warmup_tokens: int | None = None, on_progress: Progress | None = None,
               stream: ChunkedStream | None = None) -> StreamNLL:
    """Per-token NLL of `ids[start:end]` under a sink (`num_sinks` > 0) or window (`num_sinks` == 0) cache of
    `num_sinks + window` slots (the window counts the query), in chunked forwards (exact; batch 1).

    `warmup`: stream from `warmup_start(...)` with the sinks in front instead of from token 0 (exact: fact 2);
    `warmup_tokens` overrides the warm-up length (tests use it to show a short one is wrong). `chunk_tokens`: tokens
    per forward (default `max(512, window)`); memory is O(chunk x (chunk + window)) per head plus the chunk's logits.

    `stream`: a `ChunkedStream` of the same cache to run through. A fresh one (at token 0) starts as above; one that
    an earlier call left at token `start - 1` (its `end` was this `start`) just continues, with no warm-up: a long
    stream evaluated piece by piece costs what it costs in one call.
    """
    check_chunkable(model)
    ids = _as_stream(ids)
    start, end = _range(ids, start, end)
    chunk = int(chunk_tokens) if chunk_tokens else max(512, window)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    layers = model.config.num_hidden_layers
    if stream is None:
        stream = ChunkedStream(model, num_sinks, window, position_scheme=position_scheme)
    elif (stream.model is not model or (stream.num_sinks, stream.window, stream.position_scheme)
          != (num_sinks, window, position_scheme)):
        raise ValueError("the stream to continue was made for another model, cache or position scheme")
    elif stream.next_token not in (0, start - 1):
        raise ValueError(f"the stream to continue is at token {stream.next_token}; it can start token 0 or continue "
                         f"at token {start - 1} (start={start})")
    if stream.next_token:
        first = start - 1  # continuing: the stream already holds everything before
    elif not warmup:
        first = 0
    elif warmup_tokens is not None:
        first = start - 1 - int(warmup_tokens)
        first = first if first > num_sinks else 0
    else:
        first = warmup_start(layers, num_sinks, window, start)
    continuing = stream.next_token > 0
    device = _device(model)
    last_logit = end - 2  # the logits of token end - 2 predict the last token wanted
    total = (num_sinks if first and not continuing else 0) + (last_logit + 1 - first)
    nll = np.empty(end - start, dtype=np.float64)
    done = 0
    if first and num_sinks and not continuing:  # a window cache (no sinks) starts straight at the warm-up start
        stream.forward(ids[:num_sinks].to(device), first_token=0)
        done += num_sinks
        if on_progress is not None:
            on_progress(done, total)
    for a in range(first, last_logit + 1, chunk):
        b = min(a + chunk, last_logit + 1)
        logits = stream.forward(ids[a:b].to(device), first_token=a)
        lo = max(a, start - 1)  # rows whose predictions are wanted: tokens lo..b-1 predict lo+1..b
        if lo < b:
            nll[lo + 1 - start:b + 1 - start] = _token_nll(logits[lo - a:], ids[lo + 1:b + 1].to(device))
        done += b - a
        if on_progress is not None:
            on_progress(done, total)
    return StreamNLL(nll=nll, start=start, end=end, method="sink" if num_sinks else "window", num_sinks=num_sinks,
                     window=window, position_scheme=position_scheme, streamed_from=first, tokens_fed=done)


@torch.inference_mode()
def dense_nll(model, ids: torch.Tensor, *, start: int = 1, end: int | None = None, chunk_tokens: int = 1024,
              rope_scaling: tuple[str, float] | None = None, on_progress: Progress | None = None) -> StreamNLL:
    """Per-token NLL of `ids[start:end]` under dense attention (transformers' DynamicCache, every token from 0),
    in chunks of `chunk_tokens` (exact: a chunk attends to everything before it). `rope_scaling=("pi"|"ntk"|"yarn",
    factor)` runs the context-extension baselines (`pystream.hf.rope_scaled`; dynamic NTK's frequencies depend on the
    longest position seen, so with it chunking is not exactly one full forward, as in any cached decode). Memory
    grows with `end`: the caller checks it fits."""
    ids = _as_stream(ids)
    start, end = _range(ids, start, end)
    if rope_scaling is None:
        return _dense(model, ids, start, end, chunk_tokens, on_progress, "dense")
    kind, factor = rope_scaling
    with rope_scaled(model, kind, factor):
        return _dense(model, ids, start, end, chunk_tokens, on_progress, f"dense-{kind}:{factor:g}")


def _dense(model, ids, start, end, chunk_tokens, on_progress, method) -> StreamNLL:
    device = _device(model)
    cache = dense_cache(model.config)
    nll = np.empty(end - start, dtype=np.float64)
    last_logit = end - 2
    for a in range(0, last_logit + 1, chunk_tokens):
        b = min(a + chunk_tokens, last_logit + 1)
        logits = model(ids[a:b].to(device).view(1, -1), cache=cache, use_cache=True).logits[0]
        lo = max(a, start - 1)
        if lo < b:
            nll[lo + 1 - start:b + 1 - start] = _token_nll(logits[lo - a:], ids[lo + 1:b + 1].to(device))
        if on_progress is not None:
            on_progress(b, last_logit + 1)
    return StreamNLL(nll=nll, start=start, end=end, method=method, tokens_fed=last_logit + 1)


@torch.inference_mode()
def recompute_nll_at(model, ids: torch.Tensor, positions, context: int, *, batch_windows: int = 8) -> np.ndarray:
    """Sliding window with re-computation: for each predicted token k in `positions`, the NLL of `ids[k]` from a
    fresh forward over its `context` preceding tokens at positions 0..context-1 (`pystream.baselines.
    recompute_logits`). Windows of full length go `batch_windows` per forward. Returns `[len(positions)]` float64."""
    ids = _as_stream(ids)
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 1 or positions.max() >= ids.numel()):
        raise ValueError("positions must be predicted-token indices in [1, n)")
    device = _device(model)
    out = np.empty(positions.size, dtype=np.float64)
    full = [i for i, k in enumerate(positions) if k >= context]
    for i, k in enumerate(positions):  # near the start: shorter windows, one by one
        if k < context:
            logits = recompute_logits(model, ids[:k].to(device).view(1, -1), context)
            out[i] = _token_nll(logits, ids[k:k + 1].to(device))[0]
    for g in range(0, len(full), batch_windows):
        rows = full[g:g + batch_windows]
        windows = torch.stack([ids[positions[i] - context:positions[i]] for i in rows]).to(device)
        logits = recompute_logits(model, windows, context)
        targets = torch.stack([ids[positions[i]] for i in rows]).to(device)
        out[rows] = _token_nll(logits, targets)
    return out


def paired_recompute(model, ids: torch.Tensor, against: StreamNLL, *, context: int,
                     target_rel_half_width: float = 0.05, confidence: float = 0.95, pilot_positions: int = 48,
                     max_positions: int | None = None, batch_windows: int = 8, seed: int = 0,
                     on_progress: Progress | None = None) -> PairedRecompute:
    """Recompute's NLL at a uniform random sample of `against`'s predicted tokens, and the paired ratio
    `against` PPL / recompute PPL over them with its `confidence` interval.

    The sample grows until the interval's relative half-width is at most `target_rel_half_width` (0.03 for the paper
    experiment, 0.05 by default), every token is sampled, or `max_positions` is reached: a pilot of
    `pilot_positions`, then rounds sized from the observed spread of the per-token differences (plus 10%). Growing
    the sample on the observed spread is a sequential design: its coverage is close to, not exactly, `confidence`.
    """
    ids = _as_stream(ids)
    if not (target_rel_half_width > 0 and 0 < confidence < 1):
        raise ValueError("need target_rel_half_width > 0 and 0 < confidence < 1")
    population = against.end - against.start
    cap = population if max_positions is None else max(2, min(population, int(max_positions)))
    order = against.start + np.random.default_rng(seed).permutation(population)
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    n = min(cap, max(2, pilot_positions))
    rec = recompute_nll_at(model, ids, order[:n], context, batch_windows=batch_windows)
    rounds = []
    while True:
        diff = against.at(order[:n]) - rec
        sd = float(diff.std(ddof=1)) if n > 1 else 0.0
        fpc = math.sqrt(max(0.0, (population - n) / (population - 1))) if population > 1 else 0.0
        half = z * sd / math.sqrt(n) * fpc
        rounds.append((n, math.expm1(half)))
        if on_progress is not None:
            on_progress(n, cap)
        if math.expm1(half) <= target_rel_half_width or n >= cap:
            break
        # n needed for z sd / sqrt(n) <= log(1 + target), with the finite-population correction
        n0 = (z * sd / math.log1p(target_rel_half_width)) ** 2
        needed = math.ceil(1.1 * n0 / (1 + (n0 - 1) / population))
        grow = min(cap, max(n + batch_windows, needed))
        rec = np.concatenate((rec, recompute_nll_at(model, ids, order[n:grow], context, batch_windows=batch_windows)))
        n = grow
    sample = order[:n]
    keep = np.argsort(sample)
    positions, rec, mine = sample[keep], rec[keep], against.at(sample[keep])
    mean = float((mine - rec).mean())
    rec_mean = float(rec.mean())
    rec_half = z * float(rec.std(ddof=1)) / math.sqrt(n) * fpc if n > 1 else 0.0
    return PairedRecompute(
        context=context, method=against.method, start=against.start, end=against.end, positions=positions,
        recompute_nll=rec, method_nll=mine, ratio=math.exp(mean), ratio_ci=(math.exp(mean - half),
                                                                             math.exp(mean + half)),
        rel_half_width=math.expm1(half), recompute_ppl=math.exp(rec_mean),
        recompute_ppl_ci=(math.exp(rec_mean - rec_half), math.exp(rec_mean + rec_half)), confidence=confidence,
        target_rel_half_width=target_rel_half_width, rounds=rounds)
