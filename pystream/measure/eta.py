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
raises its rate at once (its elapsed time is a lower bound of its cost), so the estimate does not sit at zero.

`CostModel` and `Plan` are plain Python (unit-tested with synthetic durations); `plan_bench` maps a `Bench`'s cells
and quality passes onto parts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

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


# How cost grows with what is attended, so that a rate measured at one size predicts another (measured here on
# SmolLM2-135M, CPU, 1 thread: a chunked forward costs 4.7 ms/token at 256 tokens and 7.8 at 1,024; a cached step
# 106 ms at capacity 256 and 151 ms at 1,024). Units of chunked forwards and decode steps carry these factors; a
# rate measured at the same size replaces them.
CHUNK_ATTENTION_TOKENS = 512  # a chunked forward's per-token cost doubles at this mean attended length
STEP_ATTENTION_SLOTS = 1600  # a decode step's cost doubles at this many attended slots


def chunk_units(tokens: float, mean_attended: float) -> float:
    """Units of `tokens` fed in chunked forwards that attend to `mean_attended` tokens on average."""
    return tokens * (1 + mean_attended / CHUNK_ATTENTION_TOKENS)


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

    def __init__(self, items: list[Item], model: CostModel, clock=time.perf_counter):
        self.items, self.model, self.clock = items, model, clock
        self.pending = [i for i in items if not i.done]
        self.finished: list[tuple[Item, float]] = []  # this session's, with their seconds
        self.current: Item | None = None
        self.started_at = 0.0
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
    def start(self, item: Item) -> None:
        with self.lock:
            self.current, self.started_at = item, self.clock()

    def finish(self, item: Item, seconds: float | None = None, setup_s: float | None = None,
               measured: bool = True) -> None:
        """`item` finished after `seconds` (default: since `start`), `setup_s` of them setting up its state;
        `measured=False` for an item whose time says nothing about rates (an OOM, a result taken from another)."""
        with self.lock:
            self._finish(item, seconds, setup_s, measured)

    def _finish(self, item, seconds, setup_s, measured) -> None:
        if seconds is None:
            seconds = self.clock() - self.started_at
        if measured:
            if item.setup and setup_s is not None:
                self.model.observe(item.parts[:item.setup], setup_s)
                self.model.observe(item.parts[item.setup:], max(0.0, seconds - setup_s))
            else:
                self.model.observe(item.parts, seconds)
        self.pending.remove(item)
        self.finished.append((item, seconds))
        if self.current is item:
            self.current = None

    def _model_now(self) -> tuple[CostModel, float]:
        """The cost model with the running item's elapsed time as a lower bound of its cost, and that time."""
        if self.current is None:
            return self.model, 0.0
        elapsed = self.clock() - self.started_at
        if elapsed <= self.model.cost(self.current.parts):
            return self.model, elapsed
        bound = CostModel(self.model.priors, {k: _Sum(v.seconds, v.units) for k, v in self.model.by_size.items()},
                          {k: _Sum(v.seconds, v.units) for k, v in self.model.by_kind.items()})
        bound.observe(self.current.parts, elapsed)
        return bound, elapsed

    def remaining_s(self) -> float:
        with self.lock:
            model, elapsed = self._model_now()
            total = sum(model.cost(i.parts) for i in self.pending)
            return max(0.0, total - elapsed)

    def fraction(self) -> float:
        """Of this session's work, the part done: seconds spent over seconds spent plus seconds left."""
        with self.lock:
            spent = sum(s for _, s in self.finished)
            if self.current is not None:
                spent += self.clock() - self.started_at
            left = self.remaining_s()
        return spent / (spent + left) if spent + left > 0 else 1.0


def plan_bench(bench, cells, quality, is_done) -> Plan:
    """The plan of a `Bench` run: its cells and quality passes (as `Bench.cells()` and `Bench.quality_plan()` give
    them) as parts; `is_done(kind, args)` says whether an item was finished before (a resumed run)."""
    from . import clocks
    from .cells import method
    from .evaluator import warmup_start
    from .quality_at import quality_range

    cfg = bench.cfg
    config = bench.config
    steps = cfg.warmup + cfg.steps + (cfg.profile_steps if cfg.profile else 0)
    parameters = sum(p.numel() for p in bench.model.parameters())
    model = CostModel(prior_rates(parameters, config.num_hidden_layers, bench.device.type))

    def fits(name, tokens, streams):
        needed = method(name).kv_bytes_needed(bench, tokens, streams)
        return needed is None or clocks.fits(needed, bench.device)[0]

    items = []
    for name, capacity, length in cells:
        label = f"{name} {capacity or ''} @ {length:,}"
        setup = 0
        if not fits(name, length, cfg.batch):
            parts = ()  # recorded as OOM before anything runs
        elif name == "recompute":
            context = min(capacity, length + 1)
            parts = (Part("forward_token", steps * cfg.batch * chunk_units(context, context / 2), capacity),)
        elif method(name).has_capacity:  # sink, window
            chunk = min(capacity, length)
            streamed = length - chunk if cfg.mode == "stream" else 0
            parts = (Part("forward_token", cfg.batch * chunk_units(chunk, chunk / 2), capacity),
                     Part("cached_step", step_units(streamed, capacity), capacity),
                     Part("cached_step", step_units(steps, capacity), capacity))
            setup = 2
        else:  # dense and the scaled dense baselines: prefill to `length`, then steps over it
            parts = ((Part("dense_step", step_units(length, length / 2), length),) if cfg.mode == "stream" else
                     (Part("dense_token", chunk_units(length, length / 2), length),))
            parts += (Part("dense_step", step_units(steps, length), length),)
            setup = 1
        items.append(Item(("cell", name, capacity, length), label, parts,
                          done=is_done("cell", (name, capacity, length)), setup=setup))
    # quality at each length (measure/quality_at.py): sink and window through the chunked evaluator from their
    # warm-up start, dense prefilled to the length, recompute at its paired sample of positions
    exact = cfg.recompute_ppl == "all" or (cfg.recompute_ppl == "auto" and bench.device.type != "cpu")
    for item in quality:
        name, capacity = item.method, item.capacity
        start, end = quality_range(item.length, cfg.ppl_tokens)
        label = f"quality: {name} {capacity or ''} @ {item.length:,}"
        if capacity is None and not fits(name, end, 1):
            parts = ()  # recorded with its predicted need before anything runs
        elif name in ("sink", "window"):
            sinks = method(name).sinks(cfg)
            fed = end - warmup_start(config.num_hidden_layers, sinks, capacity - sinks, start) + sinks
            parts = (Part("chunked_nll_token", chunk_units(fed, capacity / 2), capacity),)
        elif name == "recompute":
            population = end - start
            # the paired sample grows from its pilot until the interval is narrow enough: assume one doubling
            positions = population if exact else min(population, 2 * cfg.recompute_samples,
                                                      cfg.recompute_max_positions or population)
            parts = (Part("forward_token", positions * chunk_units(capacity, capacity / 2), capacity),)
        else:
            parts = (Part("dense_token", chunk_units(end, end / 2), end),)
        items.append(Item(("quality", item), label, parts, quality=True, done=is_done("quality", (item,))))
    return Plan(items, model)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


__all__ = ["BORROW", "CostModel", "Item", "KINDS", "Part", "Plan", "format_seconds", "plan_bench", "prior_rates"]
