"""`pystream-bench --experiment recall`: what each method still remembers, as recall against distance (issue 14).

The probe: a passage of P random tokens (drawn with a fixed seed from the tokens of the text) is planted in the text
stream at position p, d tokens of ordinary text follow, then the passage again:

    ids = text[:p] + passage + text[p:p + d] + passage
          first copy at [p, p + P), repeat at [p + P + d, p + 2P + d)

A model that still sees the first copy predicts the repeat almost perfectly (induction heads copy it); one that does
not sees random tokens. recall = 1 - NLL(repeat) / NLL(first copy), both the mean per-token NLL under the same method,
per passage; a record holds the mean over passages (each its own seed, text offset and stream position) and a 95%
Student-t interval over them.

Cheap because every distance of one passage shares one stream: the text after the first copy is the same whatever d
is, and the repeat only changes what comes after it (causality). So each method feeds the stream once, and at every
distance branches off: remember the state, feed the repeat, go back (`DynamicCache.crop` for dense,
`ChunkedStream.snapshot/restore` for sink and window). Recompute has no state: it re-reads `context` tokens for every
predicted token, at every `recompute_stride`-th token of both copies (the same tokens in both).

Three probes, one record kind ("recall"):
- "distance": recall against d for every method, cache size and position scheme;
- "far": the first copy `far_position` tokens into the stream (sink and window, via the evaluator's warm-up: the
  exact state of a long stream from its last `layers x (window - 1)` tokens), where "original" positions have long
  left the pre-training range;
- "placement": where in what the cache holds the first copy sits when the repeat starts: at its start (d = W - P, the
  oldest tokens the window holds), its middle (d = (W - P) / 2) or its end (d = 0): the "lost in the middle" question.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from ..cache.chunked_attention import POSITION_SCHEMES, ChunkedStream
from ..cache.hf import dense_cache, dense_truncate, rope_scaled
from .baselines import recompute_logits
from .cells import SCALED_DENSE
from .evaluator import warmup_start

PROBES = ("distance", "far", "placement")
PLACEMENTS = ("start", "middle", "end")
RECALL_METHODS = ("dense", "dense-pi:2", "dense-ntk:2", "dense-yarn:2", "sink", "window", "recompute")

# two-sided 95% Student t quantiles by degrees of freedom (an interval over a handful of passages)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    below = [k for k in _T95 if k <= df]
    return _T95[max(below)] if df <= 30 else statistics.NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class RecallConfig:
    passage_tokens: int = 64  # P
    distances: tuple[int, ...] = (16, 64, 256, 1024, 4096, 10240)
    passages: int = 3
    methods: tuple[str, ...] = RECALL_METHODS
    position_schemes: tuple[str, ...] = POSITION_SCHEMES
    cache_sizes: tuple[int, ...] = (256, 1024)
    sinks: int = 4
    probes: tuple[str, ...] = PROBES
    first_position: int = 512  # passage i's first copy sits at first_position * (i + 1)
    far_position: int = 32_768
    far_distances: tuple[int, ...] = (16, 128)
    far_cache_sizes: tuple[int, ...] | None = None  # None: the smallest cache size
    recompute_stride: int = 4
    chunk: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class Passage:
    """One planted passage: its tokens, the text offset its stream starts from, and its first copy's position."""

    tokens: torch.Tensor
    text_offset: int
    position: int
    seed: int


def make_passages(text_ids: np.ndarray, cfg: RecallConfig, position: int | None = None) -> list[Passage]:
    vocab = np.unique(text_ids)  # tokens the text uses: ordinary tokens, never special ones
    out = []
    for i in range(cfg.passages):
        rng = np.random.default_rng([cfg.seed, i])
        tokens = torch.from_numpy(rng.choice(vocab, size=cfg.passage_tokens).astype(np.int64))
        offset = int(rng.integers(0, len(text_ids)))
        out.append(Passage(tokens, offset, cfg.first_position * (i + 1) if position is None else position,
                           cfg.seed * 1000 + i))
    return out


def text_tokens(text_ids: np.ndarray, offset: int, count: int) -> torch.Tensor:
    """`count` tokens of the text from `offset`, cycled."""
    index = (np.arange(count) + offset) % len(text_ids)
    return torch.from_numpy(np.asarray(text_ids)[index].astype(np.int64))


def probe_stream(text_ids: np.ndarray, passage: Passage, distance: int) -> torch.Tensor:
    """The probe's token ids: text, first copy at `passage.position`, `distance` tokens of text, repeat."""
    p = passage.position
    text = text_tokens(text_ids, passage.text_offset, p + distance)
    return torch.cat((text[:p], passage.tokens, text[p:], passage.tokens))


def copies(passage: Passage, distance: int) -> tuple[range, range]:
    """Stream indices of the first copy and of the repeat."""
    p, P = passage.position, passage.tokens.numel()
    return range(p, p + P), range(p + P + distance, p + 2 * P + distance)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").double().cpu().numpy()


# ---- one stream, every distance: feed once, branch off at each distance ----------------------------------------------
class _DenseFeeder:
    def __init__(self, model):
        self.model, self.cache = model, dense_cache(model.config)
        self.device = next(model.parameters()).device

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device).view(1, -1), cache=self.cache, use_cache=True).logits[0]

    def mark(self):
        return self.cache.get_seq_length()

    def back(self, mark) -> None:
        dense_truncate(self.cache, mark)


class _StreamFeeder:
    def __init__(self, model, sinks: int, window: int, scheme: str):
        self.stream = ChunkedStream(model, sinks, window, position_scheme=scheme)
        self.device = next(model.parameters()).device
        self.at = 0

    def feed(self, ids: torch.Tensor, first_token: int | None = None) -> torch.Tensor:
        first = self.at if first_token is None else first_token
        logits = self.stream.forward(ids.to(self.device), first_token=first)
        self.at = first + ids.numel()
        return logits

    def mark(self):
        return self.at, self.stream.snapshot()

    def back(self, mark) -> None:
        self.at, state = mark
        self.stream.restore(state)


@torch.inference_mode()
def branch_nll(feeder, text_ids: np.ndarray, passage: Passage, distances, *, chunk: int, skip_to: int = 0,
               sinks: int = 0) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per-token NLL of the first copy `[P]` and of the repeat at each distance `{d: [P]}`, one pass. `skip_to` > 0
    streams the `sinks` first tokens, then jumps to token `skip_to` (the warm-up: exact from there on)."""
    p, P = passage.position, passage.tokens.numel()
    distances = sorted(set(int(d) for d in distances))
    base = probe_stream(text_ids, passage, distances[-1])[:p + P + distances[-1]]
    first_nll = np.empty(P)
    repeats = {}
    last_row = None  # the logits of the token before the next one fed

    def run(a, b):
        nonlocal last_row
        for lo in range(a, b, chunk):
            hi = min(b, lo + chunk)
            logits = feeder.feed(base[lo:hi]) if not (skip_to and lo == a == skip_to) else \
                feeder.feed(base[lo:hi], first_token=skip_to)
            # rows predicting the first copy's tokens p .. p+P-1 (row r predicts token lo + r + 1)
            a_row, b_row = max(lo, p - 1), min(hi, p + P - 1)
            if a_row < b_row:
                first_nll[a_row - p + 1:b_row - p + 1] = _nll(logits[a_row - lo:b_row - lo],
                                                              base[a_row + 1:b_row + 1].to(logits.device))
            last_row = logits[-1:]
    position = 0
    if skip_to and sinks:
        feeder.feed(base[:sinks], first_token=0)
    if skip_to:
        position = skip_to
    if p - 1 < position:
        raise ValueError(f"the first copy at {p} starts before the stream is exact (token {position})")
    for d in distances:
        end = p + P + d
        run(position, end)
        position = end
        mark = feeder.mark()
        logits = feeder.feed(passage.tokens)
        rows = torch.cat((last_row, logits[:-1]))
        repeats[d] = _nll(rows, passage.tokens.to(rows.device))
        feeder.back(mark)
    return first_nll, repeats


@torch.inference_mode()
def recompute_probe(model, text_ids, passage: Passage, distances, context: int, stride: int,
                    batch_windows: int = 8) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Recompute's NLL at every `stride`-th token of both copies (the last token always in)."""
    device = next(model.parameters()).device
    P = passage.tokens.numel()
    picks = np.arange(P - 1, -1, -stride)[::-1]

    def at(ids, positions):
        out = np.empty(len(positions))
        with torch.inference_mode():
            for g in range(0, len(positions), batch_windows):
                group = positions[g:g + batch_windows]
                lengths = {min(k, context) for k in group}
                if len(lengths) == 1:
                    windows = torch.stack([ids[k - min(k, context):k] for k in group]).to(device)
                    out[g:g + len(group)] = _nll(recompute_logits(model, windows, context),
                                                 ids[group].to(device))
                else:
                    for i, k in enumerate(group):
                        logits = recompute_logits(model, ids[max(0, k - context):k].to(device).view(1, -1), context)
                        out[g + i] = _nll(logits, ids[k:k + 1].to(device))[0]
        return out

    distances = sorted(set(int(d) for d in distances))
    ids = probe_stream(text_ids, passage, distances[0])
    first, _ = copies(passage, distances[0])
    first_nll = at(ids, [first[j] for j in picks])
    repeats = {}
    for d in distances:
        ids = probe_stream(text_ids, passage, d)
        repeat = copies(passage, d)[1]
        repeats[d] = at(ids, [repeat[j] for j in picks])
    return first_nll, repeats


# ---- the experiment ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One curve: a method at a capacity (None for dense) with a position scheme (None but for sink and window)."""

    method: str
    cache_size: int | None
    sinks: int
    position_scheme: str | None


def summarise(first: list[np.ndarray], repeat: list[np.ndarray]) -> dict:
    """Per passage: mean NLL of each copy and recall = 1 - repeat / first; their mean and a 95% t interval."""
    first_mean = [float(np.mean(f)) for f in first]
    repeat_mean = [float(np.mean(r)) for r in repeat]
    per = [1.0 - r / f for f, r in zip(first_mean, repeat_mean)]
    mean = float(np.mean(per))
    if len(per) > 1:
        half = t95(len(per) - 1) * float(np.std(per, ddof=1)) / math.sqrt(len(per))
        ci = [mean - half, mean + half]
    else:
        ci = None
    return {"first_nll": first_mean, "repeat_nll": repeat_mean, "recall_per_passage": per, "recall": mean,
            "ci95": ci, "first_nll_mean": float(np.mean(first_mean)), "repeat_nll_mean": float(np.mean(repeat_mean))}


def placement_distance(where: str, window: int, passage_tokens: int) -> int:
    """d putting the first copy at the start, middle or end of the window when the repeat begins (the query then
    sees the last `window` tokens: the first copy starts the window at d = window - P)."""
    span = max(0, window - passage_tokens)
    return {"start": span, "middle": span // 2, "end": 0}[where]


class RecallExperiment:
    def __init__(self, cfg: RecallConfig, model, ids: np.ndarray, writer, progress):
        self.cfg, self.model, self.writer, self.progress = cfg, model, writer, progress
        self.ids = np.asarray(ids)
        self.layers = model.config.num_hidden_layers
        self.pretraining = getattr(model.config, "max_position_embeddings", None)

    def settings(self) -> list[Setting]:
        cfg, out = self.cfg, []
        for m in cfg.methods:
            if m == "dense" or SCALED_DENSE.fullmatch(m):
                out.append(Setting(m, None, 0, None))
            for c in cfg.cache_sizes:
                if m in ("sink", "window"):
                    out += [Setting(m, c, cfg.sinks if m == "sink" else 0, s) for s in cfg.position_schemes]
                elif m == "recompute":
                    out.append(Setting(m, c, 0, None))
        return out

    @staticmethod
    def window_of(s: Setting) -> int:
        return s.cache_size - s.sinks

    def _identity(self, s: Setting, probe: str, distance: int, placement: str | None = None) -> dict:
        mode = f"recall-{probe}" + (f":{placement}" if placement else "") + f"/{s.position_scheme or '-'}"
        return {"record": "recall", "method": s.method, "cache_size": s.cache_size, "sinks": s.sinks,
                "length": distance, "mode": mode, "position_scheme": s.position_scheme}

    def _placements(self, s: Setting) -> dict[int, list[str]]:
        """{distance: [placement, ...]} for this setting: its own window, or every cache size's for dense."""
        if "placement" not in self.cfg.probes:
            return {}
        P = self.cfg.passage_tokens
        windows = [self.window_of(s)] if s.cache_size else \
            sorted({c - self.cfg.sinks for c in self.cfg.cache_sizes})
        out: dict[int, list] = {}
        for w in windows:
            for where in PLACEMENTS:
                out.setdefault(placement_distance(where, w, P), []).append((where, w))
        return out

    def _measure(self, s: Setting, passages: list[Passage], distances, far: bool, label: str):
        cfg = self.cfg
        first, repeats = [], {d: [] for d in distances}
        task = self.progress.add_task(label, total=len(passages))
        try:
            for passage in passages:
                if s.method == "recompute":
                    f, r = recompute_probe(self.model, self.ids, passage, distances, s.cache_size,
                                           cfg.recompute_stride)
                elif s.cache_size is None:
                    scaling = SCALED_DENSE.fullmatch(s.method)
                    with torch.inference_mode():
                        if scaling:
                            with rope_scaled(self.model, scaling.group(1), float(scaling.group(2))):
                                f, r = branch_nll(_DenseFeeder(self.model), self.ids, passage, distances,
                                                  chunk=cfg.chunk)
                        else:
                            f, r = branch_nll(_DenseFeeder(self.model), self.ids, passage, distances, chunk=cfg.chunk)
                else:
                    window = self.window_of(s)
                    skip = warmup_start(self.layers, s.sinks, window, passage.position) if far else 0
                    with torch.inference_mode():
                        f, r = branch_nll(_StreamFeeder(self.model, s.sinks, window, s.position_scheme), self.ids,
                                          passage, distances, chunk=max(cfg.chunk, window), skip_to=skip,
                                          sinks=s.sinks)
                first.append(f)
                for d in distances:
                    repeats[d].append(r[d])
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)
        return first, repeats

    def _record(self, s: Setting, probe: str, d: int, passages, first, repeat, placement=None, window=None) -> dict:
        P = self.cfg.passage_tokens
        rec = {**self._identity(s, probe, d, placement), "status": "ok", "probe": probe, "distance": d, "passage_tokens": P,
               "passages": len(passages), "positions": [p.position for p in passages],
               "text_offsets": [p.text_offset for p in passages], "passage_seeds": [p.seed for p in passages],
               "layout": {"first_copy": "[position, position + P)",
                          "repeat": "[position + P + distance, position + 2P + distance)"},
               "tokens_scored": len(first[0]), "recompute_stride": self.cfg.recompute_stride
               if s.method == "recompute" else None, "pretraining_length": self.pretraining,
               **summarise(first, repeat)}
        scaling = SCALED_DENSE.fullmatch(s.method)
        if scaling:
            rec["rope_scaling"] = {"type": scaling.group(1), "factor": float(scaling.group(2))}
        if placement:
            rec["placement"], rec["placement_window"] = placement, window
        return rec

    def run(self) -> None:
        cfg = self.cfg
        near = make_passages(self.ids, cfg)
        far_caches = cfg.far_cache_sizes or (min(cfg.cache_sizes),)
        for s in self.settings():
            curve = list(cfg.distances) if "distance" in cfg.probes else []
            placements = self._placements(s)
            wanted = {d for d in curve if not self._done(self._identity(s, "distance", d))}
            wanted |= {d for d, where in placements.items()
                       if any(not self._done(self._identity(s, "placement", d, p)) for p, _ in where)}
            if wanted:
                distances = sorted(wanted)
                label = f"recall: {s.method} {s.cache_size or ''} {s.position_scheme or ''}".rstrip()
                first, repeats = self._measure(s, near, distances, False, label)
                for d in distances:
                    if d in curve and not self._done(self._identity(s, "distance", d)):
                        self.writer.append(self._record(s, "distance", d, near, first, repeats[d]))
                    for where, window in placements.get(d, []):
                        if not self._done(self._identity(s, "placement", d, where)):
                            self.writer.append(self._record(s, "placement", d, near, first, repeats[d], where,
                                                            window))
            if "far" in cfg.probes and s.method in ("sink", "window") and s.cache_size in far_caches:
                todo = [d for d in cfg.far_distances if not self._done(self._identity(s, "far", d))]
                if todo:
                    far = make_passages(self.ids, cfg, position=cfg.far_position)
                    first, repeats = self._measure(s, far, todo, True, f"recall far: {s.method} {s.cache_size} "
                                                                       f"{s.position_scheme}")
                    for d in todo:
                        self.writer.append(self._record(s, "far", d, far, first, repeats[d]))

    def _done(self, key) -> bool:
        return self.writer.done(key) is not None
