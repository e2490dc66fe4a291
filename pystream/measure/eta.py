"""How long the rest of a run will take, from measured rates rather than from counting cells.

Cells and quality passes differ by orders of magnitude in cost (a recompute step re-reads its whole context; a
cached step reads one token; a dense cell at 64k prefills 64k tokens first), so "k of n cells done" says little
about the time left. Each planned item is instead a sum of *parts*, each a count of units of one kind of work:

  kind              unit                                          where
  forward_token     one token of a chunked forward over a          recompute steps (context tokens each), the state
                    context of `size` tokens                      forward of a sink/window cell, recompute's NLL
  cached_step       one decode step of a streaming cache of        sink/window decode steps, stream-mode streaming
                    capacity `size`
  dense_step        one decode step of a dense cache at `size`     dense decode steps
  dense_token       one token of dense prefill up to `size`        dense state (prefill in chunks), dense NLL
  stream_nll_step   one token-by-token NLL step (sink and window   quality of sink/window
                    streamed together as one batch)
  chunked_nll_token one token of the exact chunked evaluator       quality, when a method is scored that way

The seconds per unit of each kind are measured as items finish (setup and decode time come apart from a cell's
record, `setup_s`). Until a kind is measured it borrows a related measured kind (a dense step from a cached step,
...), and before anything is measured it uses a conservative prior from the model's size. The remaining time is the
predicted cost of the pending items plus what is left of the running one; an item running past its prediction
raises its rate at once (its elapsed time is a lower bound of its cost), so the estimate does not sit at zero. A
quality pass whose work is known only once it ran (recompute's paired sample grows until its interval is narrow)
is measured per unit of the work it did (`Item.counted`, from its record), and the next pass of the method takes
its growth. On a cluster (`--ray`) several items run at once: the work left is shared among `Plan.slots`.

Every run logs the plan and, per finished item, what was predicted and what it took (`eta.jsonl` in the run
directory, `Plan.log`); `replan` and `replay` run a logged plan again with this version's rules on a fake clock, so
a change to the rules is checked against the durations of real runs (bench/eta_accuracy.py, tests/test_eta.py).

`CostModel` and `Plan` are plain Python (unit-tested with synthetic durations); `plan_items` maps cells and quality
passes onto parts from plain values (`PlanSpec`); `plan_bench` does it for a `Bench`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field

from .warmup import warmup_start

LOG_SCHEMA, LOG_VERSION = "pystream.eta", 1
KINDS = ("forward_token", "cached_step", "dense_step", "dense_token", "stream_nll_step", "chunked_nll_token")

# A kind not measured yet borrows a measured one, times a factor: what one unit of it costs relative to the other.
# Measured here (SmolLM2-135M, CPU, 1 thread; see tests/test_eta.py and the eta commit message): a dense decode step
# costs about a cached step; a token-by-token NLL step of the sink+window batch of two about 1.3 cached steps.
BORROW = {
    "dense_step": ("cached_step", 1.2),
    "stream_nll_step": ("cached_step", 1.5),
    "cached_step": ("stream_nll_step", 1 / 1.5),
    "dense_token": ("forward_token", 1.2),
    "forward_token": ("dense_token", 1 / 1.2),
    "chunked_nll_token": ("forward_token", 1.5),
}


# How cost grows with what is attended, so that a rate measured at one size predicts another. A token of a chunked
# forward costs 2 FLOPs per parameter plus 4 x (query width) x layers FLOPs per token it attends to (scores and the
# weighted values): its per-token cost doubles at parameters / (2 x width x layers) attended tokens (3,900 for
# SmolLM2-135M; measured here: dense prefill at 8k costs 1.4x per token what it costs at 2k, which puts the doubling
# near 7,000 on this CPU, where attention runs fused). Before the model is known, CHUNK_ATTENTION_TOKENS. A decode
# step on a CPU is mostly fixed cost (kernels, Python) with a slowly growing attention part: measured on
# SmolLM2-135M, CPU, 1 thread, a cached step costs 106 ms at capacity 256 and 151 ms at 1,024.
CHUNK_ATTENTION_TOKENS = 4096  # a chunked forward's per-token cost doubles at this mean attended length
STEP_ATTENTION_SLOTS = 1600  # a decode step's cost doubles at this many attended slots
# The paired recompute sample of a quality pass, against its pilot (--recompute-samples), before a pass has shown
# its growth. Measured on the bundled model: 230 positions from a pilot of 64 at 2k (512 tokens), 232 at 4k and 164
# at 1M (1,536 tokens); the old guess of one doubling put the first pass at 55% of what it took. 2.5 is what keeps
# the replays of the recorded runs (tests/data/eta) within 20% from a quarter of the run on; later passes take the
# growth the earlier ones showed (`Plan.scales`).
RECOMPUTE_SAMPLE_GROWTH = 2.5


def attention_tokens(parameters: int, query_width: int, layers: int) -> int:
    """The mean attended length at which a chunked forward's per-token cost doubles (see above)."""
    return max(1, round(parameters / (2 * query_width * layers)))


def chunk_units(tokens: float, mean_attended: float, doubling: float = CHUNK_ATTENTION_TOKENS) -> float:
    """Units of `tokens` fed in chunked forwards that attend to `mean_attended` tokens on average."""
    return tokens * (1 + mean_attended / doubling)


def step_units(steps: float, attended: float) -> float:
    return steps * (1 + attended / STEP_ATTENTION_SLOTS)


def prior_rates(parameters: int, layers: int, device: str = "cpu") -> dict[str, float]:
    """Seconds per unit of each kind before anything is measured: conservative (longer than any machine we ran on),
    from the model's size. A chunked forward does 2 FLOPs per parameter per token; a decode step reads every weight
    once and pays a fixed cost per layer (Python and kernel launches)."""
    flops_per_s, bytes_per_s, per_layer_s = (2e12, 5e11, 3e-4) if device == "cuda" else (1.5e10, 4e9, 1e-3)
    token_s = 2 * parameters / flops_per_s
    step_s = 4 * parameters / bytes_per_s + layers * per_layer_s  # float32 weights: 4 bytes each
    return {"forward_token": token_s, "dense_token": token_s * 1.2, "chunked_nll_token": token_s * 1.5,
            "cached_step": step_s, "dense_step": step_s * 1.2, "stream_nll_step": step_s * 1.5}


@dataclass(frozen=True)
class Part:
    kind: str
    units: float
    size: int | None = None  # capacity, context or length: rates are kept per size as well as per kind


@dataclass
class Item:
    """One cell or quality pass of the plan."""

    key: tuple
    label: str
    parts: tuple[Part, ...]
    quality: bool = False
    done: bool = False  # finished before this session (a resumed run)
    setup: int = 0  # the first `setup` parts are the state setup, timed apart (a cell record's setup_s)
    run: object = None  # what the runner is handed to measure it (plan_bench: a cell's args or a QualityItem)
    # (record field, planned count): the work of a quality pass is known only once it ran (the paired recompute
    # sample grows until its interval is narrow enough); its parts are scaled by field / planned when it finishes
    counted: tuple[str, float] | None = None

    def scale(self, rec: dict) -> float:
        """How much more (or less) work than planned the record of this item says it did."""
        if self.counted is None or not isinstance(rec.get(self.counted[0]), (int, float)) or self.counted[1] <= 0:
            return 1.0
        return rec[self.counted[0]] / self.counted[1]

    def describe(self) -> dict:
        return {"key": list(self.key), "label": self.label, "quality": self.quality, "done": self.done,
                "setup": self.setup, "parts": [[p.kind, p.units, p.size] for p in self.parts]}


@dataclass
class _Sum:
    seconds: float = 0.0
    units: float = 0.0

    def add(self, seconds: float, units: float) -> None:
        self.seconds += seconds
        self.units += units


@dataclass
class CostModel:
    """Seconds per unit of each kind: measured (summed seconds over summed units, per (kind, size) and per kind),
    else borrowed from a related measured kind, else the prior."""

    priors: dict[str, float]
    by_size: dict[tuple[str, int | None], _Sum] = field(default_factory=dict)
    by_kind: dict[str, _Sum] = field(default_factory=dict)

    def measured(self, kind: str, size: int | None = None) -> float | None:
        for sums in (self.by_size.get((kind, size)), self.by_kind.get(kind)):
            if sums is not None and sums.units > 0:
                return sums.seconds / sums.units
        return None

    def rate(self, kind: str, size: int | None = None) -> float:
        own = self.measured(kind, size)
        if own is not None:
            return own
        if kind in BORROW:
            other, factor = BORROW[kind]
            borrowed = self.measured(other, size)
            if borrowed is not None:
                return borrowed * factor
        return self.priors[kind]

    def cost(self, parts) -> float:
        return sum(p.units * self.rate(p.kind, p.size) for p in parts)

    def observe(self, parts, seconds: float) -> None:
        """Parts that took `seconds` together: shared among them in proportion to their predicted cost."""
        parts = [p for p in parts if p.units > 0]
        predicted = [p.units * self.rate(p.kind, p.size) for p in parts]
        total = sum(predicted)
        for part, cost in zip(parts, predicted):
            share = seconds * (cost / total if total > 0 else 1 / len(parts))
            self.by_size.setdefault((part.kind, part.size), _Sum()).add(share, part.units)
            self.by_kind.setdefault(part.kind, _Sum()).add(share, part.units)


class Plan:
    """The items of a run, what is finished and what is running; answers the time left and the fraction done."""

    def __init__(self, items: list[Item], model: CostModel, clock=time.perf_counter, spec: PlanSpec | None = None):
        self.items, self.model, self.clock, self.spec = items, model, clock, spec
        self.pending = [i for i in items if not i.done]
        self.finished: list[tuple[Item, float]] = []  # this session's, with their seconds
        # running items: id -> (item, started at, predicted seconds and time left when it started); one at a time
        # in a sequential run, up to `slots` at once on a cluster
        self.running: dict[int, tuple[Item, float, float, float]] = {}
        self.slots = 1  # items that run at once: the time left is the work left shared among them
        self.begun_at: float | None = None  # when this session's first item started: the bar's clock
        self.log = None  # a callable handed one dict per finished item (the run's eta.jsonl), see `header`
        # (method, record field): the work its passes did against the plan's, the plan's guess counted as one pass
        # (the sample a pass needs varies along the text: 232 positions at 4k, 164 at 1M on the bundled model)
        self.scales: dict[tuple, list[float]] = {}
        # rich draws the bar from its refresh thread while the run finishes items on the main thread
        self.lock = threading.RLock()

    # ---- counts ---------------------------------------------------------------------------------------------------
    def counts(self, quality: bool) -> tuple[int, int]:
        """(finished before this session, planned) cells or quality passes."""
        mine = [i for i in self.items if i.quality == quality]
        return sum(i.done for i in mine), len(mine)

    def resume_message(self) -> str | None:
        """'N of M cells already done' (and quality passes) when resuming; None when nothing was done."""
        (cells_done, cells), (passes_done, passes) = self.counts(False), self.counts(True)
        if not cells_done and not passes_done:
            return None
        text = f"resuming: {cells_done} of {cells} cells already done"
        if passes:
            text += f", {passes_done} of {passes} quality passes"
        todo = len(self.pending)
        return text + f"; {todo} item{'s' if todo != 1 else ''} to run"

    # ---- running --------------------------------------------------------------------------------------------------
    def header(self) -> dict:
        """The plan as logged first in eta.jsonl (one per session): what it depends on, the priors and every item."""
        return {"record": "eta_plan", "schema": LOG_SCHEMA, "schema_version": LOG_VERSION,
                "spec": self.spec.as_dict() if self.spec else None, "priors": dict(self.model.priors),
                "items": [i.describe() for i in self.items]}

    def start(self, item: Item) -> None:
        with self.lock:
            now = self.clock()
            self.running[id(item)] = (item, now, self._cost(self.model, item), self.remaining_s())
            if self.begun_at is None:
                self.begun_at = now

    def finish(self, item: Item, seconds: float | None = None, setup_s: float | None = None,
               measured: bool = True, scale: float = 1.0) -> None:
        """`item` finished after `seconds` (default: since `start`), `setup_s` of them setting up its state;
        `measured=False` for an item whose time says nothing about rates (an OOM, a result taken from another);
        `scale`: its work against the plan's (`Item.scale` of its record)."""
        with self.lock:
            self._finish(item, seconds, setup_s, measured, scale)

    def _finish(self, item, seconds, setup_s, measured, scale=1.0) -> None:
        _, started, predicted, left_before = self.running.pop(id(item), (item, None, None, None))
        if seconds is None:
            seconds = self.clock() - started if started is not None else 0.0
        parts = tuple(Part(p.kind, p.units * scale, p.size) for p in item.parts) if scale != 1.0 else item.parts
        if item.counted is not None and measured:
            self.scales.setdefault((item.key[1], item.counted[0]), [1.0]).append(scale)
        if measured:
            if item.setup and setup_s is not None:
                self.model.observe(parts[:item.setup], setup_s)
                self.model.observe(parts[item.setup:], max(0.0, seconds - setup_s))
            else:
                self.model.observe(parts, seconds)
        self.pending.remove(item)
        self.finished.append((item, seconds))
        if self.log is not None:
            now = self.clock()
            self.log({"record": "eta_item", "index": self.items.index(item), "label": item.label,
                      "parts": item.describe()["parts"], "setup": item.setup, "predicted_s": predicted,
                      "actual_s": seconds, "setup_s": setup_s, "measured": measured, "scale": scale,
                      "work": None if item.counted is None else [item.counted[0], item.counted[1] * scale],
                      "elapsed_s": now - (self.begun_at if self.begun_at is not None else now),
                      "eta_at_start_s": left_before, "eta_s": self.remaining_s(), "pending": len(self.pending)})

    def _model_now(self) -> tuple[CostModel, list[tuple[Item, float]]]:
        """The cost model with each running item's elapsed time as a lower bound of its cost, and the running items
        with their elapsed times."""
        now = self.clock()
        running = [(item, now - started) for item, started, _, _ in self.running.values()]
        model = self.model
        for item, elapsed in running:
            # a pass whose work is known only once it ran (a paired sample that grows) running long is doing more
            # work, not working slower: it raises its own cost (to its elapsed time), not the rates of the others
            if item.counted is None and elapsed > self._cost(model, item):
                if model is self.model:
                    model = CostModel(self.model.priors,
                                      {k: _Sum(v.seconds, v.units) for k, v in self.model.by_size.items()},
                                      {k: _Sum(v.seconds, v.units) for k, v in self.model.by_kind.items()})
                model.observe(item.parts, elapsed)
        return model, running

    def remaining_s(self) -> float:
        with self.lock:
            model, running = self._model_now()
            total = sum(self._cost(model, i) for i in self.pending)
            for item, elapsed in running:
                total -= elapsed
                if item.counted is not None:
                    total += max(0.0, elapsed - self._cost(model, item))
            return max(0.0, total) / max(1, min(self.slots, len(self.pending)))

    def _cost(self, model: CostModel, item: Item) -> float:
        """An item's predicted seconds; a pass whose work is counted after it ran takes the scale its family (same
        method, same record field) showed so far."""
        cost = model.cost(item.parts)
        if item.counted is not None:
            scales = self.scales.get((item.key[1], item.counted[0]), [1.0])
            cost *= sum(scales) / len(scales)
        return cost

    def fraction(self) -> float:
        """Of this session's work, the part done: seconds spent over seconds spent plus seconds left."""
        with self.lock:
            now = self.clock()
            spent = sum(s for _, s in self.finished) + sum(now - started for _, started, _, _ in self.running.values())
            left = self.remaining_s() * max(1, min(self.slots, len(self.pending)))  # in item seconds, as `spent`
        return spent / (spent + left) if spent + left > 0 else 1.0


@dataclass(frozen=True)
class PlanSpec:
    """What a run's plan depends on, as plain values: logged in the run's `eta.jsonl`, so that its plan can be built
    again (with other rules) and replayed against the durations it logged (bench/eta_accuracy.py)."""

    parameters: int
    layers: int
    device: str  # "cpu" or "cuda"
    mode: str  # "state" or "stream"
    batch: int
    steps: int  # decode steps per cell: warm-up, timed and profiled ones
    ppl_tokens: int
    recompute_exact: bool  # recompute's quality at every position rather than at a paired sample
    recompute_samples: int
    recompute_max_positions: int | None
    sinks: int  # of the sink method (window keeps none)
    attention_tokens: int = CHUNK_ATTENTION_TOKENS  # where a chunked forward's per-token cost doubles
    recompute_steps: int | None = None  # recompute's steps per cell, as `steps`; None (older logs): `steps`

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PlanSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def plan_items(spec: PlanSpec, cells, quality) -> list[Item]:
    """The items of a run: `cells` as (method, capacity or None for dense, length, fits) and `quality` passes as
    (method, capacity or None, length, scheme, fits), in run order; `fits` False for what is recorded as OOM before
    anything runs. Keys: ("cell", method, capacity, length) and ("quality", method, capacity, length, scheme)."""
    steps = spec.steps
    items = []

    def units(tokens, mean_attended):  # the run's own doubling point, from the model's shape
        return chunk_units(tokens, mean_attended, spec.attention_tokens)

    for name, capacity, length, fits in cells:
        label = f"{name} {capacity or ''} @ {length:,}"
        setup = 0
        if not fits:
            parts = ()  # recorded as OOM before anything runs
        elif name == "recompute":
            context = min(capacity, length + 1)
            forwards = spec.recompute_steps if spec.recompute_steps is not None else steps
            parts = (Part("forward_token", forwards * spec.batch * units(context, context / 2), capacity),)
        elif capacity is not None:  # sink, window
            chunk = min(capacity, length)
            streamed = length - chunk if spec.mode == "stream" else 0
            parts = (Part("forward_token", spec.batch * units(chunk, chunk / 2), capacity),
                     Part("cached_step", step_units(streamed, capacity), capacity),
                     Part("cached_step", step_units(steps, capacity), capacity))
            setup = 2
        else:  # dense and the scaled dense baselines: prefill to `length`, then steps over it
            parts = ((Part("dense_step", step_units(length, length / 2), length),) if spec.mode == "stream" else
                     (Part("dense_token", units(length, length / 2), length),))
            parts += (Part("dense_step", step_units(steps, length), length),)
            setup = 1
        items.append(Item(("cell", name, capacity, length), label, parts, setup=setup))
    # quality at each length (measure/quality_at.py): sink and window through the chunked evaluator from their
    # warm-up start, dense prefilled to the length, recompute at its paired sample of positions
    for name, capacity, length, scheme, fits in quality:
        start, end = max(1, length - spec.ppl_tokens), length  # quality_at.quality_range
        label = f"quality: {name} {capacity or ''} @ {length:,}"
        counted = None
        if not fits:
            parts = ()  # recorded with its predicted need before anything runs
        elif name in ("sink", "window"):
            sinks = spec.sinks if name == "sink" else 0
            first = warmup_start(spec.layers, sinks, capacity - sinks, start)
            fed = (sinks if first else 0) + end - 1 - first  # the record's tokens_fed
            parts = (Part("chunked_nll_token", units(fed, capacity / 2), capacity),)
            counted = ("tokens_fed", fed)
        elif name == "recompute":
            population = end - start
            # the paired sample grows from its pilot until the interval is narrow enough: RECOMPUTE_SAMPLE_GROWTH
            # times the pilot until a pass has shown how much (the next passes take its scale)
            positions = population if spec.recompute_exact else min(
                population, round(RECOMPUTE_SAMPLE_GROWTH * spec.recompute_samples),
                spec.recompute_max_positions or population)
            parts = (Part("forward_token", positions * units(capacity, capacity / 2), capacity),)
            counted = ("sample_size", positions)
        else:
            parts = (Part("dense_token", units(end, end / 2), end),)
        items.append(Item(("quality", name, capacity, length, scheme), label, parts, quality=True, counted=counted))
    return items


def bench_spec(bench) -> PlanSpec:
    cfg, config = bench.cfg, bench.config
    from .cells import method

    parameters, layers = sum(p.numel() for p in bench.model.parameters()), config.num_hidden_layers
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return PlanSpec(
        parameters=parameters, layers=layers, attention_tokens=attention_tokens(parameters, width, layers),
        device=bench.device.type, mode=cfg.mode, batch=cfg.batch,
        steps=cfg.warmup + cfg.steps + (cfg.profile_steps if cfg.profile else 0), ppl_tokens=cfg.ppl_tokens,
        recompute_exact=cfg.recompute_ppl == "all" or (cfg.recompute_ppl == "auto" and bench.device.type != "cpu"),
        recompute_samples=cfg.recompute_samples, recompute_max_positions=cfg.recompute_max_positions,
        sinks=method("sink").sinks(cfg),
        recompute_steps=sum(method("recompute").decode_steps(cfg)) + (cfg.profile_steps if cfg.profile else 0))


def plan_bench(bench, cells, quality, is_done) -> Plan:
    """The plan of a `Bench` run: its cells and quality passes (as `Bench.cells()` and `Bench.quality_plan()` give
    them) as parts; `is_done(kind, args)` says whether an item was finished before (a resumed run). Each item's
    `run` is what to hand `Bench.run_cell` / `Bench.run_quality`."""
    from . import clocks
    from .cells import method
    from .quality_at import quality_range

    def fits(name, tokens, streams):
        needed = method(name).kv_bytes_needed(bench, tokens, streams)
        return needed is None or clocks.fits(needed, bench.device)[0]

    spec = bench_spec(bench)
    cell_rows = [(name, capacity, length, fits(name, length, bench.cfg.batch)) for name, capacity, length in cells]
    quality_rows = [(q.method, q.capacity, q.length, q.scheme,
                     q.capacity is not None or fits(q.method, quality_range(q.length, bench.cfg.ppl_tokens)[1], 1))
                    for q in quality]
    items = plan_items(spec, cell_rows, quality_rows)
    for item, args in zip(items, list(cells) + list(quality)):
        if item.quality:
            item.run, item.done = args, is_done("quality", (args,))
        else:
            item.run, item.done = tuple(args), is_done("cell", tuple(args))
    return Plan(items, CostModel(prior_rates(spec.parameters, spec.layers, spec.device)), spec=spec)


def read_log(path) -> list[dict]:
    """The sessions of an eta.jsonl (a resumed run appends one per session): [{"header": eta_plan record, "items":
    [eta_item records in the order they finished]}]. A torn last line (a run killed mid-write) is left out."""
    sessions = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("record") == "eta_plan":
                if entry.get("schema_version", 0) > LOG_VERSION:
                    raise ValueError(f"{path}: written by a newer pystream (schema_version "
                                     f"{entry['schema_version']})")
                sessions.append({"header": entry, "items": []})
            elif entry.get("record") == "eta_item" and sessions:
                sessions[-1]["items"].append(entry)
    return sessions


def replan(header: dict) -> list[Item]:
    """A logged plan's items built again by this version's `plan_items` from its spec (what was done before the
    session stays done)."""
    spec = PlanSpec.from_dict(header["spec"])
    cells, quality = [], []
    for row in header["items"]:
        key, fits = row["key"], bool(row["parts"])
        (cells if key[0] == "cell" else quality).append((*key[1:], fits))
    items = plan_items(spec, cells, quality)
    by_key = {tuple(i.key): i for i in items}
    ordered = [by_key[tuple(row["key"])] for row in header["items"]]
    for item, row in zip(ordered, header["items"]):
        item.done = row["done"]
    return ordered


def logged_items(header: dict) -> list[Item]:
    """A logged plan's items with the parts they were logged with."""
    return [Item(tuple(row["key"]), row["label"], tuple(Part(k, u, z) for k, u, z in row["parts"]),
                 quality=row["quality"], done=row["done"], setup=row["setup"]) for row in header["items"]]


def _replayed_scale(item: Item, entry: dict) -> float:
    """The logged work of a counted pass against this plan's count for it (the logged scale was against the logged
    plan's)."""
    work = entry.get("work")
    if item.counted is not None and work and work[0] == item.counted[0] and item.counted[1] > 0:
        return work[1] / item.counted[1]
    return entry.get("scale", 1.0)


def replay_items(items: list[Item], finished: list[dict], priors: dict[str, float]) -> list[dict]:
    """Each finished item's predicted seconds when it started, replayed with this version's cost model, beside the
    seconds it took: [{label, predicted_s, actual_s}]."""
    items = [dataclasses.replace(i) for i in items]
    ran = {e["index"] for e in finished}
    for index, item in enumerate(items):
        item.done = index not in ran
    now = [0.0]
    plan = Plan(items, CostModel(dict(priors)), clock=lambda: now[0])
    out = []
    for entry in finished:
        item = items[entry["index"]]
        plan.start(item)
        out.append({"label": item.label, "predicted_s": plan.running[id(item)][2], "actual_s": entry["actual_s"]})
        now[0] += entry["actual_s"]
        plan.finish(item, entry["actual_s"], entry.get("setup_s"), entry.get("measured", True),
                    _replayed_scale(item, entry))
    return out


def replay(items: list[Item], finished: list[dict], priors: dict[str, float],
           shares=(0.25, 0.5, 0.75)) -> list[dict]:
    """Run `items` again on a fake clock, each finished item (eta_item records, in the order they finished) taking
    the seconds it took, and read the ETA a bar would have shown at each share of the session's time. Items that
    did not finish in the session are left out. [{share, elapsed_s, actual_left_s, eta_s, error}]."""
    items = [dataclasses.replace(i) for i in items]
    ran = {e["index"] for e in finished}
    for index, item in enumerate(items):
        item.done = index not in ran
    total = sum(e["actual_s"] for e in finished)
    out = []
    for share in shares:
        at = share * total
        now = [0.0]
        plan = Plan(items, CostModel(dict(priors)), clock=lambda: now[0])
        for entry in finished:
            item = items[entry["index"]]
            plan.start(item)
            if now[0] + entry["actual_s"] > at:
                now[0] = at
                break
            now[0] += entry["actual_s"]
            plan.finish(item, entry["actual_s"], entry.get("setup_s"), entry.get("measured", True),
                        _replayed_scale(item, entry))
        eta, left = plan.remaining_s(), total - at
        out.append({"share": share, "elapsed_s": at, "actual_left_s": left, "eta_s": eta,
                    "error": (eta - left) / left if left > 0 else 0.0})
    return out


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


__all__ = ["BORROW", "CostModel", "Item", "KINDS", "Part", "Plan", "PlanSpec", "format_seconds", "plan_bench",
           "plan_items", "prior_rates", "read_log", "replan", "replay", "replay_items"]
