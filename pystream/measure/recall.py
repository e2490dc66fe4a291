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
- "far": the first copy `far_position` tokens into the stream (sink in both schemes, via the evaluator's warm-up: the
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
from .eta import CostModel, Item, Part, Plan, prior_rates
from .evaluator import warmup_start

PROBES = ("distance", "far", "placement")
PLACEMENTS = ("start", "middle", "end")
RECALL_METHODS = ("dense", "dense-pi:2", "dense-ntk:2", "dense-yarn:2", "sink", "window", "recompute")
# The defaults fit the 10 minutes on a 2-core CPU. With YaRN-scaled dense added (a quarter of the planned work,
# as much as dense) and the caches' curves to 4x their capacity, the run took 13 min 21 s here with 2 threads: the
# scaled baselines are opt-in (--recall-methods dense,dense-yarn:2,...).
DEFAULT_METHODS = ("dense", "sink", "window", "recompute")

# two-sided 95% Student t quantiles by degrees of freedom (an interval over a handful of passages)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    below = [k for k in _T95 if k <= df]
    return _T95[max(below)] if df <= 30 else statistics.NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class RecallConfig:
    passage_tokens: int = 64  # P
    distances: tuple[int, ...] = (16, 64, 256, 1024, 4096, 9216)  # x4 steps, past the 8,192 pre-training length
    passages: int = 3
    methods: tuple[str, ...] = DEFAULT_METHODS
    position_schemes: tuple[str, ...] = POSITION_SCHEMES
    cache_sizes: tuple[int, ...] = (256, 1024)
    sinks: int = 4
    probes: tuple[str, ...] = PROBES
    first_position: int = 256  # passage i's first copy sits at first_position * (i + 1)
    far_position: int = 32_768
    far_distances: tuple[int, ...] = (16, 128)
    far_cache_sizes: tuple[int, ...] | None = None  # None: the smallest cache size
    far_passages: int = 2  # each costs the evaluator's whole warm-up (layers x (window - 1) tokens)
    # sink, window and recompute: distances up to this many times their capacity (0: every distance). They have
    # forgotten by then (recall ~0 from about one capacity on), and their stream costs what its longest distance does.
    cache_reach: int = 2
    recompute_stride: int = 64  # the last token of each copy (P = 64): a context-long forward per scored token
    chunk: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class Passage:
    """One planted passage: its tokens, the text offset its stream starts from, and its first copy's position."""

    tokens: torch.Tensor
    text_offset: int
    position: int
    seed: int


def make_passages(text_ids: np.ndarray, cfg: RecallConfig, position: int | None = None,
                  count: int | None = None) -> list[Passage]:
    vocab = np.unique(text_ids)  # tokens the text uses: ordinary tokens, never special ones
    out = []
    for i in range(cfg.passages if count is None else count):
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


# ---- the time left ----------------------------------------------------------------------------------------------
# A token fed in a chunked forward that attends to `a` keys costs about (1 + a / ATTENDED_DOUBLING) times one that
# attends to none. Fitted here (SmolLM2-135M, CPU, 1 thread, process time): the evaluator at 4+252 3.65 ms a token,
# at 4+1020 4.75; dense over 1,884 tokens 4.07 ms a token, over 5,384 5.79: both give 2,300-3,200.
ATTENDED_DOUBLING = 2700


def _units(tokens: float, attended: float) -> float:
    return tokens * (1 + attended / ATTENDED_DOUBLING)


class _RecallCosts(CostModel):
    """Every kind here is a chunked forward of the same model, its attention carried by the units: until a kind is
    measured, any measured kind's rate per unit predicts it far better than a prior from the model's size."""

    def rate(self, kind: str, size: int | None = None) -> float:
        own = self.measured(kind, size)
        if own is not None:
            return own
        for other in self.by_kind:
            measured = self.measured(other)
            if measured is not None:
                return measured
        return self.priors[kind]


@dataclass(frozen=True)
class Work:
    """One setting's pass over its passages at some distances: one plan item per passage."""

    setting: Setting
    far: bool
    distances: tuple[int, ...]
    passages: tuple[Passage, ...]


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
                if m == "sink":
                    out += [Setting(m, c, cfg.sinks, s) for s in cfg.position_schemes]
                elif m == "window":
                    # no sinks: only distances within the window count, the same in both schemes; measured once
                    out.append(Setting(m, c, 0, cfg.position_schemes[0]))
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

    def curve(self, s: Setting) -> list[int]:
        """The distances of this setting's curve: every one asked, up to `cache_reach` x its capacity for sink,
        window and recompute."""
        if "distance" not in self.cfg.probes:
            return []
        reach = self.cfg.cache_reach
        if s.cache_size is None or not reach:
            return list(self.cfg.distances)
        return [d for d in self.cfg.distances if d <= reach * s.cache_size]

    def far_settings(self) -> list[Setting]:
        """Sink at the far caches, both schemes: the far probe asks whether sinks at positions long past the
        pre-training range still work (a window without sinks is the same at any position)."""
        if "far" not in self.cfg.probes:
            return []
        far_caches = self.cfg.far_cache_sizes or (min(self.cfg.cache_sizes),)
        return [s for s in self.settings() if s.method == "sink" and s.cache_size in far_caches]

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

    def parts(self, work: Work, passage: Passage) -> tuple[Part, ...]:
        """What one passage of `work` costs, in units of a chunked forward (see `_units`)."""
        s, P, D = work.setting, self.cfg.passage_tokens, work.distances
        end = passage.position + P + max(D)  # the stream fed once; each distance adds a repeat
        if s.method == "recompute":
            scored = len(range(P - 1, -1, -self.cfg.recompute_stride)) * (1 + len(D))
            return (Part("forward_token", scored * _units(s.cache_size, s.cache_size / 2), s.cache_size),)
        if s.cache_size is None:
            return (Part("dense_token", _units(end + P * len(D), end / 2)),)
        skipped = warmup_start(self.layers, s.sinks, self.window_of(s), passage.position) if work.far else 0
        fed = end - skipped + P * len(D) + (s.sinks if skipped else 0)
        return (Part("chunked_nll_token", _units(fed, s.cache_size), s.cache_size),)

    def plan(self, work: list[Work]) -> Plan:
        parameters = sum(p.numel() for p in self.model.parameters())
        device = next(self.model.parameters()).device.type
        items = [Item((w.setting, w.far, i), f"{w.setting.method} {w.setting.cache_size or ''}", self.parts(w, p))
                 for w in work for i, p in enumerate(w.passages)]
        return Plan(items, _RecallCosts(prior_rates(parameters, self.layers, device)))

    def _measure(self, s: Setting, passages, distances, far: bool, label: str, items=None, plan=None,
                 overall=None):
        cfg = self.cfg
        first, repeats = [], {d: [] for d in distances}
        task = self.progress.add_task(label, total=len(passages), unit="passages")
        try:
            for i, passage in enumerate(passages):
                if plan is not None:
                    plan.start(items[i])
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
                if plan is not None:
                    plan.finish(items[i])
                    self.progress.advance(overall)
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

    def work(self) -> list[Work]:
        """What is left to measure (all of it, or what a resumed run has not recorded), in run order."""
        cfg = self.cfg
        near = tuple(make_passages(self.ids, cfg))
        far_settings = self.far_settings()
        out = []
        for s in self.settings():
            curve, placements = self.curve(s), self._placements(s)
            wanted = {d for d in curve if not self._done(self._identity(s, "distance", d))}
            wanted |= {d for d, where in placements.items()
                       if any(not self._done(self._identity(s, "placement", d, p)) for p, _ in where)}
            if wanted:
                out.append(Work(s, False, tuple(sorted(wanted)), near))
            if s in far_settings:
                todo = [d for d in cfg.far_distances if not self._done(self._identity(s, "far", d))]
                if todo:
                    far = make_passages(self.ids, cfg, position=cfg.far_position, count=cfg.far_passages)
                    out.append(Work(s, True, tuple(todo), tuple(far)))
        return out

    def run(self) -> None:
        work = self.work()
        plan = self.plan(work)
        overall = self.progress.add_task("[bold]recall", total=len(plan.pending), plan=plan)
        items = iter(plan.items)
        for w in work:
            s, distances = w.setting, list(w.distances)
            mine = [next(items) for _ in w.passages]
            what = "recall far" if w.far else "recall"
            label = f"{what}: {s.method} {s.cache_size or ''} {s.position_scheme or ''}".rstrip()
            first, repeats = self._measure(s, list(w.passages), distances, w.far, label, mine, plan, overall)
            if w.far:
                for d in distances:
                    self.writer.append(self._record(s, "far", d, w.passages, first, repeats[d]))
                continue
            curve, placements = self.curve(s), self._placements(s)
            for d in distances:
                if d in curve and not self._done(self._identity(s, "distance", d)):
                    self.writer.append(self._record(s, "distance", d, w.passages, first, repeats[d]))
                for where, window in placements.get(d, []):
                    if not self._done(self._identity(s, "placement", d, where)):
                        self.writer.append(self._record(s, "placement", d, w.passages, first, repeats[d], where,
                                                        window))

    def _done(self, key) -> bool:
        return self.writer.done(key) is not None
