"""pystream-report: an HTML report from saved results alone (no model is loaded; this package imports only
`pystream.results`, never torch, transformers or the C++ extension).

One self-contained file: plotly.js embedded once, nothing fetched, opens offline. Given several run directories it
shows them side by side with the ratio per cell (a regression view between commits or machines).

Every string that comes from the user or the data (model name, paths, command lines, notes) is escaped: a
`<script>` in a model name shows as text. Figure data goes into the page as JSON with <, > and & escaped, so no
string can close the script element it sits in.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..results import ResultsError, Run, cache_label, load_run, peak_bytes, write_atomic
from ..results.paper import paper_table
from ..results.summary import latency_unit, quality_note, quality_range_text, ratio_text

MIB = 1024**2
# One colour per method across every figure; methods not named here get the next free colour of _EXTRA_COLORS.
METHOD_COLORS = {
    "sink": "#1f77b4",
    "window": "#ff7f0e",
    "recompute": "#2ca02c",
    "dense": "#d62728",
}
_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
METHOD_ORDER = ["dense", "recompute", "sink", "window"]
# Dash and marker by cache size (and run, in a comparison), so that both caches of a method read apart.
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "triangle-down", "star", "hexagon", "cross"]
RUN_SYMBOL_VARIANTS = ["", "-open", "-dot", "-open-dot"]
PATTERNS = ["", "/", ".", "x", "-", "|", "+"]
# The "original" position scheme (keys keep the positions they were computed at) beside the paper's in-cache one: its
# own marker shapes (none of SYMBOLS) and a fine dash, so the two schemes of one method and cache read apart.
ORIGINAL_SYMBOLS = ["pentagon", "hourglass", "bowtie", "triangle-left", "triangle-right", "octagon"]
ROLLING_TOKENS = 64
MAX_POINTS = 2500  # per line in the perplexity-by-position figure
MIN_LINE_POINTS = 3  # fewer points than this are drawn as points (with error bars where the data has a spread)


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    base = method.split(":")[0]
    if base in METHOD_COLORS:
        return METHOD_COLORS[base]
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def series_name(rec: dict) -> str:
    label = cache_label(rec)
    scheme = " (original positions)" if rec.get("position_scheme") == "original" else ""
    return f"{rec['method']} {label}".strip() + scheme


class Styles:
    """The visual identity of every (method, cache size, run) of a report, the same in every figure and legend:
    colour by method, dash and marker symbol by cache size (dash by cache size and run in a comparison). Line width
    and marker size shrink with the method's place in METHOD_ORDER and traces are drawn in that order, so a series
    lying exactly on another (sink's KV bytes under window's) still shows as a rim around it."""

    def __init__(self, runs):
        records = [r for _, run in runs for r in run.records if r.get("record") in ("cell", "quality", "recall")]
        present = {r["method"] for r in records if r.get("method")}
        others = sorted(m for m in present if m not in METHOD_ORDER)
        self.methods = [m for m in METHOD_ORDER if m in present] + others
        self.colors = dict(METHOD_COLORS)
        free = [c for c in _EXTRA_COLORS if c not in self.colors.values()]
        for index, method in enumerate(others):
            self.colors[method] = free[index % len(free)]
        self.caches = sorted({r["cache_size"] for r in records if r.get("cache_size")})
        self.runs = [label for label, _ in runs]

    def rank(self, method: str) -> int:
        return self.methods.index(method) if method in self.methods else len(self.methods)

    def color(self, method: str) -> str:
        return self.colors.get(method) or method_color(method)

    def _cache_rank(self, cache_size) -> int:
        return self.caches.index(cache_size) if cache_size in self.caches else 0  # dense has none: solid

    def dash(self, cache_size, run_label=None) -> str:
        run = self.runs.index(run_label) if run_label in self.runs else 0
        index = self._cache_rank(cache_size) * len(self.runs) + run
        return DASHES[index] if index < len(DASHES) else f"{index + 2}px,3px,1px,3px"

    def symbol(self, cache_size, run_label=None) -> str:
        """The shape by cache size; in a comparison, filled for the first run, open (or dotted) for the others."""
        run = self.runs.index(run_label) if run_label in self.runs else 0
        variant = RUN_SYMBOL_VARIANTS[run % len(RUN_SYMBOL_VARIANTS)]
        return SYMBOLS[self._cache_rank(cache_size) % len(SYMBOLS)] + variant

    def scheme_dash(self, cache_size, run_label=None, scheme=None) -> str:
        """The dash of a quality series: the cache's, or a fine dotted one of its own under original positions."""
        if scheme != "original":
            return self.dash(cache_size, run_label)
        run = self.runs.index(run_label) if run_label in self.runs else 0
        return f"{2 + self._cache_rank(cache_size)}px,{2 + run}px"

    def scheme_symbol(self, cache_size, run_label=None, scheme=None) -> str:
        if scheme != "original":
            return self.symbol(cache_size, run_label)
        run = self.runs.index(run_label) if run_label in self.runs else 0
        return (ORIGINAL_SYMBOLS[self._cache_rank(cache_size) % len(ORIGINAL_SYMBOLS)]
                + RUN_SYMBOL_VARIANTS[run % len(RUN_SYMBOL_VARIANTS)])

    def pattern(self, run_label) -> str:
        """Bars of one method in a comparison: the run is the fill pattern."""
        run = self.runs.index(run_label) if run_label in self.runs else 0
        return PATTERNS[run % len(PATTERNS)]

    def _above(self, method: str) -> int:
        return max(0, len(self.methods) - 1 - self.rank(method))

    def width(self, method: str) -> float:
        return 1.5 + self._above(method) * min(1.5, 6 / max(1, len(self.methods) - 1))

    def size(self, method: str) -> float:
        return 7 + self._above(method) * min(5, 20 / max(1, len(self.methods) - 1))


def series_trace(styles: Styles, *, method, cache_size, run_label, x, y, name, derived, hovertemplate,
                 error_y=None, error_x=None, symbols=None, **extra):
    """One series as a Scatter in its identity. `derived` names how y comes from the records (Plotly's `meta`;
    the report's tests recompute every y from it). Fewer than MIN_LINE_POINTS points are drawn as points: a line
    through two points would read as a trend."""
    import plotly.graph_objects as go

    points = sum(v is not None for v in y)
    mode = "markers" if points < MIN_LINE_POINTS else "lines+markers"
    if extra.get("text") is not None:
        mode += "+text"
    color = styles.color(method)
    return go.Scatter(
        x=x, y=y, mode=mode, name=esc(name), meta=derived if isinstance(derived, dict) else {"y": derived},
        line=dict(color=color, dash=styles.dash(cache_size, run_label), width=styles.width(method)),
        marker=dict(color=color, symbol=symbols or styles.symbol(cache_size, run_label), size=styles.size(method),
                    line=dict(width=0)),
        error_y=error_y, error_x=error_x, hovertemplate=hovertemplate, **extra)


# ---- figures ----------------------------------------------------------------------------------------------------------
# Each returns a plotly Figure, or None when the runs hold nothing for it. `runs` is a list of (label, Run).

def _cells(run: Run, status=None):
    return [r for r in run.records if r.get("record") == "cell" and (status is None or r.get("status") == status)]


def _run_suffix(runs, label):
    return f" [{label}]" if len(runs) > 1 else ""


def _all_cells(runs, status=None):
    return [c for _, run in runs for c in _cells(run, status)]


def _log_ticks(values) -> dict:
    """A log axis whose ticks are exactly the values measured, spelled out (4,096 rather than 4k or 4.096e3), with
    room at both ends for the markers."""
    values = sorted(set(values))
    low, high = math.log10(values[0]), math.log10(values[-1])
    pad = max(0.08, (high - low) * 0.06)
    return dict(type="log", tickvals=values, ticktext=[f"{v:,}" for v in values], range=[low - pad, high + pad])


def _latency_error(cells):
    return dict(type="data", symmetric=False, array=[c["latency_ms"]["p90"] - c["latency_ms"]["p50"] for c in cells],
                arrayminus=[c["latency_ms"]["p50"] - c["latency_ms"]["min"] for c in cells])


def _status_text(cell) -> str:
    return f"{cell['method']} @ {cell['length']:,}: {cell.get('error') or cell.get('status')}"


def fig_latency_vs_cache(runs):
    from plotly.subplots import make_subplots

    styles = Styles(runs)
    ok = _all_cells(runs, "ok")
    lengths = sorted({c["length"] for c in ok if c.get("cache_size")})
    if not lengths:
        return None
    lengths = lengths[-4:]
    per = latency_unit(_all_cells(runs))
    fig = make_subplots(rows=1, cols=len(lengths), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"stream length {n:,}" for n in lengths])
    caches = sorted({c["cache_size"] for c in ok if c.get("cache_size") and c["length"] in lengths})
    for col, length in enumerate(lengths, start=1):
        suffix = "" if col == 1 else str(col)
        levels = []  # methods without a cache size: a level across the panel, named in the panel
        for label, run in runs:
            cells = [c for c in _cells(run) if c["length"] == length]
            for method in sorted({c["method"] for c in cells}, key=styles.rank):
                pts = sorted((c for c in cells if c["method"] == method and c.get("cache_size")
                              and c.get("status") == "ok"), key=lambda c: c["cache_size"])
                if pts:
                    speed = [c.get("speedup_vs_recompute") for c in pts]
                    # the paper's Figure 10 labels StreamingLLM's speedup; the other speedups are in the hover
                    text = [f"×{s:.1f}" if isinstance(s, (int, float)) and method == "sink" else "" for s in speed]
                    name = method + _run_suffix(runs, label)
                    fig.add_trace(series_trace(
                        styles, method=method, cache_size=None, run_label=label, x=[c["cache_size"] for c in pts],
                        y=[c["latency_ms"]["p50"] for c in pts], name=name, derived="cell.latency_ms.p50",
                        symbols=[styles.symbol(c["cache_size"], label) for c in pts], error_y=_latency_error(pts),
                        text=text, textposition="bottom center", legendgroup=name, showlegend=col == 1,
                        customdata=[[c["latency_ms"]["p90"], c["latency_ms"]["p99"], cache_label(c),
                                     f"{s:.1f}" if isinstance(s, (int, float)) else "–"] for c, s in zip(pts, speed)],
                        hovertemplate="cache %{customdata[2]}<br>p50 %{y:.3f} ms<br>p90 %{customdata[0]:.3f} ms"
                                      "<br>p99 %{customdata[1]:.3f} ms<br>×%{customdata[3]} vs recompute<extra>"
                                      + esc(name) + "</extra>"), row=1, col=col)
                for c in cells:
                    if c["method"] == method and not c.get("cache_size"):
                        if c.get("status") == "ok":
                            p50 = c["latency_ms"]["p50"]
                            fig.add_hline(y=p50, row=1, col=col, exclude_empty_subplots=False,
                                          line=dict(color=styles.color(method), dash="dot",
                                                    width=min(3.0, styles.width(method))))
                            levels.append(f"<span style='color:{styles.color(method)}'>{esc(method)}"
                                          f"{esc(_run_suffix(runs, label))}: {p50:,.1f} ms (holds all "
                                          f"{length:,} tokens; dotted)</span>")
                        else:
                            levels.append(f"<span style='color:{styles.color(method)}'>"
                                          f"{esc(_status_text(c))}{esc(_run_suffix(runs, label))}</span>")
        if levels:
            fig.add_annotation(xref=f"x{suffix} domain", yref=f"y{suffix} domain", x=0.02, y=0.98, showarrow=False,
                               xanchor="left", yanchor="top", align="left", text="<br>".join(levels),
                               bgcolor="rgba(255,255,255,0.8)", font=dict(size=11))
    fig.update_xaxes(title_text="cache size (tokens, sinks included; marker: cache size)", **_log_ticks(caches))
    fig.update_yaxes(type="log", showticklabels=True)
    fig.update_yaxes(title_text=f"decode latency per {per}, p50 (ms)", col=1)
    fig.update_layout(title=f"Latency per {per} against cache size (error bars: fastest step to p90; labels: "
                            "StreamingLLM's speedup over sliding window with re-computation; the paper's Figure 10)")
    return fig


def _by_length_figure(runs, value, title, y_title, derived, log_y=True, error=None, zero_note=None):
    """One series per (method, cache size, run) against stream length. A cell that did not run (OOM) is a note at
    its length, not a point: no value was measured there."""
    styles = Styles(runs)
    import plotly.graph_objects as go

    fig = go.Figure()
    lengths, notes, zero = set(), [], []
    for label, run in runs:
        cells = _cells(run)
        keys = sorted({(c["method"], c.get("cache_size") or 0) for c in cells},
                      key=lambda k: (styles.rank(k[0]), k[1]))
        for method, cache_size in keys:
            pts = sorted((c for c in cells if c["method"] == method and (c.get("cache_size") or 0) == cache_size),
                         key=lambda c: c["length"])
            lengths.update(c["length"] for c in pts)
            name = series_name(pts[0]) + _run_suffix(runs, label)
            ok = [c for c in pts if c.get("status") == "ok"]
            notes += [(c, label) for c in pts if c.get("status") != "ok"]
            if log_y and ok and all(value(c) == 0 for c in ok):
                zero.append(name)  # nothing to draw on a log axis: said in the figure instead
            ok = [c for c in ok if value(c) is not None and not (log_y and value(c) <= 0)]
            if not ok:
                continue
            fig.add_trace(series_trace(
                styles, method=method, cache_size=cache_size or None, run_label=label, x=[c["length"] for c in ok],
                y=[value(c) for c in ok], name=name, derived=derived, error_y=error(ok) if error else None,
                hovertemplate="length %{x:,}<br>%{y:,.2f}<extra>" + esc(name) + "</extra>"))
    if not fig.data:
        return None
    for index, (cell, label) in enumerate(notes):
        # a note with an arrow down to its length on the axis: no value was measured, so nothing is plotted
        right = cell["length"] == max(lengths)
        fig.add_annotation(x=math.log10(cell["length"]), yref="y domain", y=0, showarrow=True, arrowhead=2,
                           arrowcolor=styles.color(cell["method"]), ax=-40 if right else 40, ay=-40 - 22 * index,
                           xanchor="right" if right else "left", align="left",
                           text="✕ " + esc(_status_text(cell) + _run_suffix(runs, label)),
                           font=dict(color=styles.color(cell["method"])), bgcolor="rgba(255,255,255,0.85)")
    if zero:
        fig.add_annotation(xref="paper", yref="paper", x=0, y=-0.2, showarrow=False, xanchor="left", align="left",
                           text=esc(f"{', '.join(zero)}: {zero_note or 'zero, not drawn on a log scale'}"))
    fig.update_xaxes(title_text="stream length (tokens)", **_log_ticks(lengths))
    fig.update_yaxes(type="log" if log_y else "linear", title_text=y_title, rangemode="tozero")
    fig.update_layout(title=title)
    return fig


def fig_throughput_vs_length(runs):
    def spread(cells):
        # the rate of the p90 step and of the fastest one, around the run's mean rate
        rates = [(c.get("batch") or 1) * 1000 / np.array([c["latency_ms"]["p90"], c["latency_ms"]["min"]])
                 for c in cells]
        return dict(type="data", symmetric=False,
                    array=[max(0.0, r[1] - c["tokens_per_s"]) for r, c in zip(rates, cells)],
                    arrayminus=[max(0.0, c["tokens_per_s"] - r[0]) for r, c in zip(rates, cells)])

    return _by_length_figure(runs, lambda c: c.get("tokens_per_s"), "Decode throughput against stream length "
                             "(error bars: the rate of the p90 step to that of the fastest; ✕: did not run)",
                             "tokens per second (all streams)", "cell.tokens_per_s", error=spread)


def fig_memory_vs_length(runs):
    def peak(c):
        value = peak_bytes(c)
        return value / MIB if value else None

    return _by_length_figure(runs, peak, "Peak memory against stream length (process RSS on CPU, torch max "
                             "allocated on GPU; one reading per cell; ✕: did not run)", "peak memory (MiB)",
                             "cell.peak_bytes / MiB", log_y=False)


def fig_kv_vs_length(runs):
    return _by_length_figure(runs, lambda c: None if c.get("kv_bytes") is None else c["kv_bytes"] / MIB,
                             "Bytes held by the KV cache against stream length (✕: did not run)", "KV cache (MiB)",
                             "cell.kv_bytes / MiB", zero_note="keep no KV cache (0 bytes; not drawn on the log scale)")


def _quality(run: Run, experiment: str | None = None):
    """Quality records: the bench's own (experiment None) and the paper experiment's ppl part, or one part."""
    # a perplexity too large to store is null (JSON has no infinity): the tables say so; a log axis cannot draw it
    recs = [r for r in run.records if r.get("record") == "quality" and r.get("status") == "ok"
            and r.get("ppl") is not None]
    if experiment is None:
        return [r for r in recs if not r.get("experiments") or "ppl" in r["experiments"]]
    return [r for r in recs if experiment in (r.get("experiments") or [])]


def _first(rec) -> int:
    """The stream index `nll[0]` predicts: `start`, or 1 for records before quality at a length existed."""
    return rec.get("start") or 1


def _shortest(recs):
    """Quality at several lengths: the shortest length's records (the per-token view; the longer ones are points of
    the perplexity-by-length figure). Records without a length range (older runs, the paper experiment) all stay."""
    lengths = [r["length"] for r in recs if r.get("start") is not None]
    return [r for r in recs if r.get("start") is None or r["length"] == min(lengths)]


def fig_ppl_by_position(runs):
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    pretraining, caches, bin_widths = set(), set(), set()
    ends = []
    for label, run in runs:
        recs = _shortest(_quality(run))
        for rec in sorted(recs, key=lambda r: (styles.rank(r["method"]), r.get("cache_size") or 0,
                                               r.get("position_scheme") or "")):
            if not rec.get("nll"):  # a long stream that kept its chunk perplexities only: nothing per token
                continue
            name = series_name(rec) + _run_suffix(runs, label)
            method, cache_size = rec["method"], rec.get("cache_size")
            first = _first(rec)
            ends.append(first + len(rec["nll"]))
            nll = np.array([np.nan if v is None else v for v in rec["nll"]], dtype=float)
            if rec.get("pretraining_length"):
                pretraining.add(rec["pretraining_length"])
            if cache_size:
                caches.add(cache_size)
            if rec.get("sampled"):
                # a handful of samples per bin: each bin is a point at its mean with the 95% interval of that mean
                # (and the bin's extent), never a line through two or three far-apart means
                width = max(1024, len(nll) // 12)
                bin_widths.add(width)
                bins = []
                for start in range(0, len(nll), width):
                    part = nll[start:start + width]
                    part = part[~np.isnan(part)]
                    if part.size:
                        half = 1.96 * float(part.std(ddof=1)) / math.sqrt(part.size) if part.size > 1 else 0.0
                        span = min(width, len(nll) - start)
                        bins.append((start + span / 2 + first, float(part.mean()), part.size, half))
                fig.add_trace(series_trace(
                    styles, method=method, cache_size=cache_size, run_label=label, x=[b[0] for b in bins],
                    y=[b[1] for b in bins],
                    name=name + f" (sampled, {rec['sample_size']} positions)",
                    derived={"y": "quality.nll bin mean", "width": width},
                    error_y=dict(type="data", array=[b[3] for b in bins]), customdata=[b[2] for b in bins],
                    hovertemplate=f"the {width:,}-token bin around %{{x:,.0f}}<br>mean NLL %{{y:.3f}} ± "
                                  "%{error_y.array:.3f} (95%, %{customdata} samples)<extra></extra>"))
                continue
            window = min(ROLLING_TOKENS, max(1, len(nll) // 4))
            kernel = np.ones(window) / window
            rolling = np.convolve(np.nan_to_num(nll), kernel, mode="valid")
            # A point every few tokens is all a screen shows; it keeps a 20k-token report small.
            stride = max(1, len(rolling) // MAX_POINTS)
            fig.add_trace(go.Scatter(x0=window + first, dx=stride, y=np.round(rolling[::stride], 4), mode="lines",
                                     name=esc(name), meta={"y": "quality.nll rolling mean", "window": window,
                                                           "stride": stride, "decimals": 4},
                                     line=dict(color=styles.color(method),
                                               dash=styles.scheme_dash(cache_size, label, rec.get("position_scheme")),
                                               width=styles.width(method) / 2 + 0.75),
                                     hovertemplate="token %{x:,}<br>log PPL %{y:.3f}<extra>" + esc(name)
                                                   + "</extra>"))
    if not fig.data:
        return None
    longest = max(ends)
    beyond = []
    for length in sorted(pretraining):
        if length <= 2 * longest:
            fig.add_vline(x=length, line=dict(color="#555", dash="dash"),
                          annotation_text=f"pre-training length {length:,}")
        else:
            beyond.append(length)
    for cache in sorted(caches):
        fig.add_vline(x=cache, line=dict(color="#aaa", dash="dot"), annotation_text=f"cache {cache} full",
                      annotation_position="bottom right")
    fig.update_xaxes(title_text="token position")
    fig.update_yaxes(title_text=f"log perplexity (rolling mean of NLL over {ROLLING_TOKENS} tokens)")
    notes = [f"the model's pre-training length, {beyond[0]:,}, lies beyond these tokens"] if beyond else []
    if bin_widths:
        notes.append(f"points: a sampled method's mean NLL per {', '.join(f'{w:,}' for w in sorted(bin_widths))}-token "
                     "bin, with its 95% interval")
    fig.update_layout(title="Log perplexity against token position (the paper's Figure 3)"
                            + (f"<br><sup>{esc('; '.join(notes))}</sup>" if notes else ""))
    return fig


def fig_ppl_bars(runs):
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    for label, run in runs:
        recs = sorted(_quality(run), key=lambda r: (r.get("length") if r.get("start") is not None else 0,
                                                    styles.rank(r["method"]), r.get("cache_size") or 0))
        if not recs:
            continue
        names = [series_name(r) + (f" @ {r['length']:,}" if r.get("start") is not None else "") for r in recs]
        ppl = [r["ppl"] for r in recs]
        whole = [r.get("ppl_ci95") if r.get("ppl_ci95") and None not in r["ppl_ci95"] else None for r in recs]
        upper = [(ci[1] - r["ppl"]) if ci else 0 for ci, r in zip(whole, recs)]
        lower = [(r["ppl"] - ci[0]) if ci else 0 for ci, r in zip(whole, recs)]
        fig.add_trace(go.Bar(
            x=[esc(n) for n in names], y=ppl, name=esc(label) if len(runs) > 1 else "PPL", meta={"y": "quality.ppl"},
            marker=dict(color=[styles.color(r["method"]) for r in recs], pattern_shape=styles.pattern(label)),
            error_y=dict(type="data", symmetric=False, array=upper, arrayminus=lower),
            text=[f"{p:.2f}" + (" (sampled)" if r.get("sampled") else "") for p, r in zip(ppl, recs)],
            textposition="outside",
            hovertemplate="%{x}<br>PPL %{y:.3f}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_yaxes(type="log", title_text="perplexity (95% CI where sampled)")
    fig.update_xaxes(title_text="method")
    fig.update_layout(title="Perplexity per method over the first tokens of the text", barmode="group",
                      showlegend=len(runs) > 1)
    return fig


def fig_ppl_at_length(runs):
    """Quality at each length asked: a method's PPL over the tokens ending at L against L, on a log axis out to the
    longest stream, per method, cache and position scheme; a sampled method with its 95% interval. A record that
    did not run (dense past memory) is a note, not a point."""
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    lengths, notes, pretraining = set(), [], set()
    for label, run in runs:
        recs = [r for r in run.records if r.get("record") == "quality" and r.get("start") is not None
                and not r.get("experiments")]
        for r in recs:
            if r.get("status") != "ok":
                notes.append(f"{series_name(r)} @ {r['length']:,}: {r.get('error') or r.get('status')}"
                             + _run_suffix(runs, label))
        series = {}
        for r in recs:
            if r.get("status") == "ok":
                series.setdefault((r["method"], r.get("cache_size"), r.get("position_scheme")), []).append(r)
        for (method, cache_size, scheme), group in sorted(
                series.items(), key=lambda kv: (styles.rank(kv[0][0]), kv[0][1] or 0, kv[0][2] or "")):
            group = sorted(group, key=lambda r: r["length"])
            lengths.update(r["length"] for r in group)
            pretraining.update(r["pretraining_length"] for r in group if r.get("pretraining_length"))
            ys = [r["ppl"] for r in group]
            up = [(r["ppl_ci95"][1] - r["ppl"]) if r.get("ppl_ci95") else 0 for r in group]
            down = [(r["ppl"] - r["ppl_ci95"][0]) if r.get("ppl_ci95") else 0 for r in group]
            trace = series_trace(
                styles, method=method, cache_size=cache_size, run_label=label, x=[r["length"] for r in group], y=ys,
                name=series_name(group[0]) + _run_suffix(runs, label), derived="quality.ppl",
                symbols=styles.scheme_symbol(cache_size, label, scheme),
                error_y=dict(type="data", symmetric=False, array=up, arrayminus=down) if any(up) else None,
                customdata=[[quality_range_text(r), quality_note(r)] for r in group],
                hovertemplate="tokens %{customdata[0]} of the stream<br>PPL %{y:.3f} (%{customdata[1]})<extra>"
                              + esc(series_name(group[0])) + "</extra>")
            trace.line.dash = styles.scheme_dash(cache_size, label, scheme)
            fig.add_trace(trace)
    if not fig.data:
        return None
    for length in sorted(pretraining):
        if min(lengths) / 2 <= length <= 2 * max(lengths):
            fig.add_vline(x=length, line=dict(color="#555", dash="dash"),
                          annotation_text=f"pre-training length {length:,}")
    fig.update_xaxes(title_text="stream length L (PPL of the tokens ending at L)", **_log_ticks(lengths))
    fig.update_yaxes(type="log", title_text="perplexity")
    subtitle = "; ".join(notes)
    fig.update_layout(title="Perplexity at each stream length (exact for sink and window at any length)"
                            + (f"<br><sup>{esc(subtitle)}</sup>" if subtitle else ""))
    return fig


def fig_sinks(runs):
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    for label, run in runs:
        recs = sorted(_quality(run, "sinks"), key=lambda r: r.get("sinks") or 0)
        if not recs:
            continue
        fig.add_trace(go.Bar(
            x=[f"{r.get('sinks') or 0}+{r['cache_size'] - (r.get('sinks') or 0)}" for r in recs],
            y=[r["ppl"] for r in recs], name=esc(label), text=[f"{r['ppl']:.2f}" for r in recs],
            meta={"y": "quality.ppl"},
            textposition="outside", marker=dict(color=[styles.color(r["method"]) for r in recs],
                                                pattern_shape=styles.pattern(label)),
            hovertemplate="%{x}<br>PPL %{y:.3f}<extra></extra>"))
    if not fig.data:
        return None
    tokens = _quality(runs[0][1], "sinks")[0]["tokens"] if _quality(runs[0][1], "sinks") else 0
    fig.update_yaxes(type="log", title_text="perplexity")
    fig.update_xaxes(title_text="sinks + window (fixed total cache)")
    fig.update_layout(title=f"The number of sinks at a fixed total cache, over {tokens:,} tokens (the paper's "
                            "Table 2)", showlegend=len(runs) > 1)
    return fig


def fig_cache_sizes(runs):
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    sizes = set()
    for label, run in runs:
        recs = sorted((r for r in _quality(run, "cache") if r.get("cache_size") is not None),
                      key=lambda r: r["cache_size"])
        if not recs:
            continue
        sizes.update(r["cache_size"] for r in recs)
        fig.add_trace(series_trace(
            styles, method=recs[0]["method"], cache_size=None, run_label=label, x=[r["cache_size"] for r in recs],
            y=[r["ppl"] for r in recs], name=label, derived="quality.ppl", text=[f"{r['ppl']:.2f}" for r in recs],
            symbols=[styles.symbol(r["cache_size"], label) for r in recs], textposition="top center",
            # x is the capacity; the hover reads sinks+window ("4+252" for 256), like the tables
            customdata=[cache_label(r) for r in recs],
            hovertemplate="cache %{customdata}<br>PPL %{y:.3f}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_xaxes(title_text="total cache size (tokens, 4 of them sinks)", **_log_ticks(sizes))
    fig.update_yaxes(title_text="perplexity")
    fig.update_layout(title="The cache size at 4 sinks (the paper's Table 6)", showlegend=len(runs) > 1)
    return fig


def fig_stability(runs):
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    for label, run in runs:
        recs = _quality(run, "stability") + [r for r in _quality(run, "ppl") if r["method"] in ("window", "dense")]
        for r in sorted(recs, key=lambda r: styles.rank(r["method"])):
            buckets = [b for b in r["buckets"] if b.get("ppl")]
            name = series_name(r) + _run_suffix(runs, label)
            fig.add_trace(series_trace(
                styles, method=r["method"], cache_size=r.get("cache_size"), run_label=label,
                x=[b["end"] - 1 for b in buckets], y=[b["ppl"] for b in buckets], derived="quality.buckets.ppl",
                name=name + (f" ({r['tokens']:,} tokens)" if "stability" in (r.get("experiments") or []) else ""),
                hovertemplate="tokens up to %{x:,}<br>chunk PPL %{y:.3f}<extra></extra>"))
    if not fig.data:
        return None
    pretraining = next((r.get("pretraining_length") for _, run in runs for r in _quality(run, "stability")), None)
    if pretraining:
        fig.add_vline(x=pretraining, line=dict(color="#555", dash="dash"),
                      annotation_text=f"pre-training length {pretraining:,}")
    fig.update_xaxes(title_text="stream position (end of chunk)")
    fig.update_yaxes(type="log", title_text="perplexity of the chunk")
    fig.update_layout(title="Long-stream stability: perplexity per chunk, streamed for real")
    return fig


def fig_attention_share(runs):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    recs = [(label, r) for label, run in runs for r in run.records if r.get("record") == "attention"]
    if not recs:
        return None
    label, rec = recs[0]
    share = np.array(rec["share_first_token"])
    maps = rec["maps"]
    fig = make_subplots(rows=1, cols=1 + len(maps), column_widths=[0.4] + [0.6 / len(maps)] * len(maps),
                        subplot_titles=["share of attention on the first token"]
                        + [f"layer {k}: mean attention" for k in maps])
    fig.add_trace(go.Heatmap(z=share, x=[f"h{h}" for h in range(share.shape[1])], y=list(range(share.shape[0])),
                             colorscale="Viridis", zmin=0, zmax=1,
                             colorbar=dict(x=-0.12, thickness=12, title="share"),
                             hovertemplate="layer %{y}, head %{x}<br>%{z:.3f} of the attention<extra></extra>"),
                  row=1, col=1)
    for col, (layer, grid) in enumerate(maps.items(), start=2):
        values = np.log10(np.clip(np.array(grid), 1e-4, 1))
        fig.add_trace(go.Heatmap(z=values, colorscale="Blues", showscale=col == 1 + len(maps), zmin=-4, zmax=0,
                                 colorbar=dict(title="log10"),
                                 hovertemplate="query %{y}, key %{x}<br>log10 weight %{z:.2f}<extra></extra>"),
                      row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="head", row=1, col=1)
    fig.update_layout(title=f"Where attention goes: {rec['segments']} segments of {rec['tokens']} tokens of the text "
                            f"(queries {rec['skipped_queries']}+; uniform attention would give the first token "
                            f"{rec['uniform_share']:.3f}; the paper's Figure 2)", height=520)
    return fig


def paper_table_html(runs) -> str:
    rows = paper_table(runs[0][1].records) if runs else []
    if not rows:
        return ""
    cells = []
    for r in rows:
        digits = r.get("digits", 2)
        paper = "–" if r["paper"] is None else f"{r['paper']:.{digits}f}"
        cells.append(f"<tr><td>{esc(r['finding'])}</td><td>{esc(r['setting'])}</td><td>{r['ours']:.{digits}f}</td>"
                     f"<td>{paper}</td><td>{esc(r['paper_setting'])}</td></tr>")
    body = "".join(cells)
    return ("<h2>The paper's findings: ours beside the paper's</h2><p>Compare patterns, not values: a 135M model on "
            "the King James Bible with its own tokenizer against Llama-2 on PG19.</p><table class='paper'><thead><tr>"
            "<th>finding</th><th>our setting</th><th>ours</th><th>paper</th><th>paper's setting</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


PROFILE_PARTS = [("model_ms", "model forward (attention, MLP, norms)", "#8c8c8c"),
                 ("cache_update_ms", "cache update", "#1f77b4"),
                 ("bookkeeping_ms", "C++ bookkeeping", "#9467bd"),
                 ("rerotate_ms", "position re-rotation", "#ff7f0e"),
                 ("logits_ms", "logits (LM head)", "#2ca02c"),
                 ("other_ms", "other (positions, masks, driver)", "#d9d9d9")]


def _ms_per_step(cell) -> dict | None:
    profile = cell.get("profile")
    parts = profile.get("ms_per_step") if isinstance(profile, dict) else None
    if not isinstance(parts, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) for v in parts.values()):
        return None
    return parts


def fig_profile(runs):
    import plotly.graph_objects as go

    # a profile without a per-step breakdown of numbers (a hand-edited or foreign record) has nothing to stack
    cells = [(label, c) for label, run in runs for c in _cells(run, "ok") if _ms_per_step(c) is not None]
    if not cells:
        return None
    names = [esc(f"{series_name(c)} @ {c['length']:,}" + _run_suffix(runs, label)) for label, c in cells]
    fig = go.Figure()
    for key, title, color in PROFILE_PARTS:
        values = [c["profile"]["ms_per_step"].get(key, 0.0) for _, c in cells]
        fig.add_trace(go.Bar(x=names, y=values, name=title, marker_color=color,
                             meta={"y": f"cell.profile.ms_per_step.{key}"},
                             hovertemplate="%{x}<br>" + title + ": %{y:.3f} ms per step<extra></extra>"))
    fig.update_layout(barmode="stack", title="Where a decode step goes (torch.profiler ranges, --profile; profiler "
                      "overhead included)")
    fig.update_yaxes(title_text="milliseconds per decode step")
    fig.update_xaxes(title_text="cell")
    return fig


# Nodes of a run that spans several (records say where they ran: `ran_on`, written by pystream-bench --ray).
NODE_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def node_label(cell) -> str | None:
    where = cell.get("ran_on")
    return where.get("node") or where.get("node_id") if isinstance(where, dict) else None


def _node_keys(cells) -> dict:
    """node id (or name) -> label; names alone when they tell the nodes apart, else name and a short node id."""
    ids = {}
    for c in cells:
        where = c.get("ran_on") if isinstance(c.get("ran_on"), dict) else None
        if where:
            ids[where.get("node_id") or where.get("node")] = where.get("node") or str(where.get("node_id"))
    unique = len(set(ids.values())) == len(ids)
    return {k: name if unique else f"{name} ({str(k)[:8]})" for k, name in ids.items()}


def fig_nodes(runs):
    """When a run's cells ran on several nodes: each cell's p50 latency coloured by the node it ran on, so that a
    slow node stands out."""
    import plotly.graph_objects as go

    fig, drawn = go.Figure(), False
    for label, run in runs:
        cells = _cells(run, "ok")
        nodes = _node_keys(cells)
        if len(nodes) < 2:
            continue
        order = [f"{series_name(c)} @ {c['length']:,}" + _run_suffix(runs, label) for c in cells]
        for index, (key, name) in enumerate(sorted(nodes.items(), key=lambda kv: kv[1])):
            mine = [c for c in cells if (c["ran_on"].get("node_id") or c["ran_on"].get("node")) == key]
            fig.add_trace(go.Scatter(
                x=[f"{series_name(c)} @ {c['length']:,}" + _run_suffix(runs, label) for c in mine],
                y=[c["latency_ms"]["p50"] for c in mine], mode="markers",
                name=esc(f"node {name}" + _run_suffix(runs, label)), meta={"y": "cell.latency_ms.p50"},
                marker=dict(color=NODE_COLORS[index % len(NODE_COLORS)], size=11,
                            symbol=SYMBOLS[index % len(SYMBOLS)]),
                hovertemplate="%{x}<br>p50 %{y:.2f} ms<extra>" + esc(name) + "</extra>"))
            drawn = True
        fig.update_xaxes(categoryorder="array", categoryarray=order)
    if not drawn:
        return None
    fig.update_layout(title="Where each cell ran: p50 latency per decode step, by node (pystream-bench --ray)")
    fig.update_yaxes(title_text="p50 ms per decode step", type="log")
    fig.update_xaxes(title_text="cell")
    return fig


def fig_recall(runs):
    """Recall of a planted passage against the distance to its repeat (`--experiment recall`), one line per method,
    cache and position scheme, the cache size marked where each line's window ends."""
    import plotly.graph_objects as go

    styles = Styles(runs)
    fig = go.Figure()
    marked = set()
    for label, run in runs:
        recs = [r for r in run.records if r.get("record") == "recall" and r.get("probe") == "distance"
                and r.get("status") == "ok"]
        curves = {}
        for r in recs:
            curves.setdefault((r["method"], r.get("cache_size"), r.get("sinks") or 0, r.get("position_scheme")),
                              []).append(r)
        order = sorted(curves, key=lambda k: (styles.rank(k[0]), k[1] or 0, k[3] or ""))
        for method, cache_size, sinks, scheme in order:
            points = sorted(curves[(method, cache_size, sinks, scheme)], key=lambda r: r["distance"])
            name = series_name(points[0]) + _run_suffix(runs, label)  # names "(original positions)" itself
            lows = [r["recall"] - r["ci95"][0] if r.get("ci95") else 0 for r in points]
            highs = [r["ci95"][1] - r["recall"] if r.get("ci95") else 0 for r in points]
            trace = series_trace(
                styles, method=method, cache_size=cache_size, run_label=label, x=[r["distance"] for r in points],
                y=[r["recall"] for r in points], name=name, derived="recall.recall",
                error_y=dict(type="data", symmetric=False, array=highs, arrayminus=lows, thickness=1),
                hovertemplate="d = %{x:,} tokens<br>recall %{y:.3f}<extra></extra>")
            if scheme == "original":  # the second scheme of one cache: the same colour, marks of its own
                trace.line.dash = styles.scheme_dash(cache_size, label, scheme)
                trace.marker.symbol = styles.scheme_symbol(cache_size, label, scheme)
            fig.add_trace(trace)
            if cache_size and cache_size not in marked:  # once per cache size (4+252 and 256 sit 4 apart)
                marked.add(cache_size)
                _log_x_line(fig, max(1, cache_size - sinks - points[0]["passage_tokens"]), f"cache {cache_size:,}",
                            dict(color="#999", dash=styles.dash(cache_size)), y=1.0, yanchor="bottom")
    if not fig.data:
        return None
    distances = sorted({x for t in fig.data for x in t.x})
    fig.update_xaxes(type="log", title_text="distance d: tokens of text between the passage and its repeat",
                     tickvals=distances, ticktext=[f"{d:,}" for d in distances])
    fig.update_yaxes(title_text="recall = 1 - NLL(repeat) / NLL(first copy)", range=[-0.15, 1.05])
    pretraining = next((r.get("pretraining_length") for _, run in runs for r in run.records
                        if r.get("record") == "recall"), None)
    if pretraining:
        _log_x_line(fig, pretraining, f"pre-training length {pretraining:,}", dict(color="#555", dash="dash"),
                    y=0.06, yanchor="bottom", xanchor="right")
    fig.add_annotation(xref="paper", yref="paper", x=0, y=-0.4, showarrow=False, xanchor="left", align="left",
                       text="A random passage is planted, d tokens of text follow, then it is repeated: recall near 1 "
                            "means the method still sees it, near 0 that it is gone.<br>Sink and window caches "
                            "remember up to their window (the marked line: d = window - passage) and nothing beyond; "
                            "dense remembers<br>until its positions leave what the model was trained on.")
    fig.update_layout(title="What each method remembers: recall against distance (bars: 95% interval over "
                            "passages)", margin=dict(b=170))
    return fig


def _log_x_line(fig, x: float, text: str, line: dict, y: float, yanchor: str, xanchor: str = "center") -> None:
    """A vertical line at data value `x` on a log x axis, labelled: a shape takes the data value, an annotation its
    log10 (plotly's convention for each; `add_vline` gives both the same number, so one of them lands wrong)."""
    fig.add_shape(type="line", x0=x, x1=x, xref="x", y0=0, y1=1, yref="paper", line=line)
    fig.add_annotation(x=math.log10(x), xref="x", y=y, yref="paper", yanchor=yanchor, xanchor=xanchor, text=text,
                       showarrow=False, font=dict(size=11))


PLACEMENTS = ("start", "middle", "end")


def _placement_panels(rec, windows: dict) -> list[tuple[int, int]]:
    """The (cache, window) panels a placement record is drawn in: its own cache; for dense (no cache), the cache
    whose window set its distance (`windows`: dense's window -> cache), and every one of them for "end" (d = 0 ends
    every window, so a run records it once)."""
    if rec.get("cache_size"):
        return [(rec["cache_size"], rec["placement_window"])]
    if rec.get("placement") == "end":
        return sorted((cache, window) for window, cache in windows.items())
    window = rec.get("placement_window")
    return [(windows.get(window, window), window)]


def fig_recall_placement(runs):
    """Recall when the first copy sits at the start (oldest), middle or end (newest) of what each cache holds as the
    repeat begins (`"probe": "placement"`): one panel per cache, one line per method and position scheme; dense at
    the same distances beside them."""
    from plotly.subplots import make_subplots

    styles = Styles(runs)
    recs = [(label, r) for label, run in runs for r in run.records
            if r.get("record") == "recall" and r.get("probe") == "placement" and r.get("status") == "ok"
            and r.get("placement") in PLACEMENTS]
    # a window belongs to the cache that holds it: sink 4+252's 252, window 256's 256; dense's distances were set
    # from the windows its run's caches have (sink's where there are sinks)
    held = {r["placement_window"]: r["cache_size"] for _, r in recs if r.get("cache_size")}
    windows = {w: held.get(w, w) for w in {r["placement_window"] for _, r in recs if not r.get("cache_size")}}
    panels = {(label, id(r)): _placement_panels(r, windows) for label, r in recs}
    caches = sorted({c for found in panels.values() for c, _ in found})
    if not caches:
        return None
    fig = make_subplots(rows=1, cols=len(caches), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"cache {c:,}" for c in caches])
    shown = set()
    for col, cache in enumerate(caches, start=1):
        curves = {}
        for label, r in recs:
            for panel, window in panels[(label, id(r))]:
                if panel == cache:
                    curves.setdefault((label, r["method"], r.get("position_scheme"), window), []).append(r)
        order = sorted(curves, key=lambda k: (styles.rank(k[1]), k[2] or "", k[3] or 0, k[0]))
        for key in order:
            label, method, scheme, window = key
            points = sorted(curves[key], key=lambda r: PLACEMENTS.index(r["placement"]))
            name = series_name(points[0]) + _run_suffix(runs, label)
            if not points[0].get("cache_size"):
                name += f" (distances of window {window:,})"
            trace = series_trace(
                styles, method=method, cache_size=points[0].get("cache_size"), run_label=label,
                x=[r["placement"] for r in points], y=[r["recall"] for r in points], name=name,
                derived="recall.recall", legendgroup=name, showlegend=name not in shown,
                error_y=dict(type="data", symmetric=False, thickness=1,
                             array=[r["ci95"][1] - r["recall"] if r.get("ci95") else 0 for r in points],
                             arrayminus=[r["recall"] - r["ci95"][0] if r.get("ci95") else 0 for r in points]),
                customdata=[[r["distance"], r["placement_window"] if r.get("cache_size") else window]
                            for r in points],
                hovertemplate="first copy at the %{x} of the window (%{customdata[1]:,} tokens)<br>d = "
                              "%{customdata[0]:,} tokens<br>recall %{y:.3f}<extra>" + esc(name) + "</extra>")
            if scheme == "original":  # the second scheme of one cache: the same colour, marks of its own
                trace.line.dash = styles.scheme_dash(points[0].get("cache_size"), label, scheme)
                trace.marker.symbol = styles.scheme_symbol(points[0].get("cache_size"), label, scheme)
            shown.add(name)
            fig.add_trace(trace, row=1, col=col)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(PLACEMENTS),
                     title_text="where the first copy sits in the window when the repeat begins")
    fig.update_yaxes(range=[-0.15, 1.05], showticklabels=True)
    fig.update_yaxes(title_text="recall = 1 - NLL(repeat) / NLL(first copy)", col=1)
    fig.add_annotation(xref="paper", yref="paper", x=0, y=-0.38, showarrow=False, xanchor="left", align="left",
                       text="The same probe with the first copy at the start (the oldest tokens the window holds: "
                            "d = window - passage), the middle,<br>or the end (d = 0) of the window as the repeat "
                            "begins: the \"lost in the middle\" question. A flat line remembers the whole window "
                            "alike;<br>dense at the same distances is the reference.")
    fig.update_layout(title="Where in the window a passage is remembered (bars: 95% interval over passages)",
                      margin=dict(b=160))
    return fig


FIGURES = [
    ("latency", fig_latency_vs_cache),
    ("throughput", fig_throughput_vs_length),
    ("memory", fig_memory_vs_length),
    ("kv", fig_kv_vs_length),
    ("ppl-length", fig_ppl_at_length),
    ("ppl-position", fig_ppl_by_position),
    ("ppl", fig_ppl_bars),
    ("profile", fig_profile),
    ("nodes", fig_nodes),
    ("sinks", fig_sinks),
    ("cache-sizes", fig_cache_sizes),
    ("stability", fig_stability),
    ("attention", fig_attention_share),
    ("recall", fig_recall),
    ("recall-placement", fig_recall_placement),
]


# ---- tables -----------------------------------------------------------------------------------------------------------

def _num(value, spec="{:,.2f}"):
    return "–" if value is None else spec.format(value)


def _ppl(value) -> str:
    """A perplexity of a finished quality record: null means it overflowed (stored as null, JSON has no infinity)."""
    return "∞ (overflowed)" if value is None else f"{value:.3f}"


def cells_table(runs) -> str:
    cells = _all_cells(runs)
    per = latency_unit(cells)
    head = ("<tr><th>run</th><th>method</th><th>cache</th><th>length</th><th>mode</th><th>batch</th>"
            f"<th>p50 ms/{per}</th><th>p90 ms/{per}</th><th>p99 ms/{per}</th><th>tokens/s</th><th>peak MiB</th>"
            "<th>KV MiB</th><th>× recompute</th><th>note</th></tr>")
    rows = []
    for label, run in runs:
        several = len(_node_keys(_cells(run))) > 1
        for c in _cells(run):
            note = "text cycled" if c.get("text_cycled") else ""
            if several:  # where it ran, when a run spans several nodes
                note = ", ".join(n for n in (note, f"node {node_label(c)}") if n)
            first = (f"<td>{esc(label)}</td><td>{esc(c['method'])}</td><td>{esc(cache_label(c))}</td>"
                     f"<td>{c['length']:,}</td><td>{esc(c.get('mode'))}</td><td>{c.get('batch') or 1}</td>")
            if c.get("status") != "ok":
                rows.append(f"<tr class='oom'>{first}<td colspan='7'>{esc(c.get('error', c.get('status')))}</td>"
                            f"<td>{esc(note)}</td></tr>")
                continue
            lat = c["latency_ms"]
            speed = c.get("speedup_vs_recompute")
            if isinstance(speed, dict):
                speed = ", ".join(f"{v:.1f} @ {k}" for k, v in speed.items())
            elif speed is not None:
                speed = f"{speed:.1f}"
            peak = peak_bytes(c)
            rows.append(
                f"<tr>{first}<td>{_num(lat['p50'])}</td>"
                f"<td>{_num(lat['p90'])}</td><td>{_num(lat['p99'])}</td><td>{_num(c.get('tokens_per_s'))}</td>"
                f"<td>{_num(peak / MIB if peak else None, '{:,.0f}')}</td>"
                f"<td>{_num((c.get('kv_bytes') or 0) / MIB)}</td><td>{esc(speed or '–')}</td>"
                f"<td>{esc(note)}</td></tr>")
    if not rows:
        return ""
    if per == "token":
        intro = "Latency per decode step; at batch 1 a step decodes one token, so it is the latency per token."
    else:
        intro = ("Latency per decode step: a step decodes one token in each of the batch's streams, so the time per "
                 "token of one stream is the step's; tokens/s counts the tokens of every stream.")
    return (f"<h2>Cells</h2><p>{intro}</p>"
            f"<table class='cells'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")


def quality_table(runs) -> str:
    rows = []
    for label, run in runs:
        for q in run.records:
            if q.get("record") != "quality":
                continue
            first = (f"<td>{esc(label)}</td><td>{esc(q['method'])}</td><td>{esc(cache_label(q))}</td>"
                     f"<td>{'–' if q.get('start') is None else format(q['length'], ',')}</td>"
                     f"<td>{esc(quality_range_text(q))}</td><td>{esc(q.get('position_scheme') or '–')}</td>")
            if q.get("status") != "ok":
                rows.append(f"<tr class='oom'>{first}<td colspan='4'>{esc(q.get('error'))}</td></tr>")
                continue
            ci = q.get("ppl_ci95")
            interval = f"{_ppl(ci[0])} – {_ppl(ci[1])}" if ci else "–"
            rows.append(f"<tr>{first}<td>{esc(_ppl(q['ppl']))}</td><td>{esc(interval)}</td>"
                        f"<td>{esc(ratio_text(q) or '–')}</td><td>{esc(quality_note(q))}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Perplexity</h2><p>Per-token NLL of each method as PPL, over the predicted tokens [start, end) of the "
            "stream (at a length L: the tokens ending at L; runs before that: the text's first tokens). The interval "
            "is the 95% confidence interval where positions were sampled; the paired ratio is sink's PPL over "
            "recompute's at the same sampled tokens, with its 95% interval.</p>"
            "<table class='quality'><thead><tr><th>run</th><th>method</th><th>cache</th><th>length</th>"
            "<th>tokens</th><th>positions</th><th>PPL</th><th>95% CI</th><th>paired ratio</th><th>note</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>")


def _cell_key(c) -> tuple:
    """What makes two runs' cells comparable: the same measurement, batch included (a step of 4 streams is not a
    step of 1)."""
    return (c["method"], c.get("cache_size"), c["length"], c.get("mode"), c.get("batch") or 1)


def _key_text(c) -> str:
    batch = c.get("batch") or 1
    return (f"{c['method']} {cache_label(c)}".strip() + f" @ {c['length']:,} ({c.get('mode')}"
            + (f", batch {batch}" if batch > 1 else "") + ")")


def ratio_table(runs) -> str:
    """Every cell of every run, p50 per run and the ratio to the first; a run with no cell in common with the first
    is said to have none, in words, above the table."""
    if len(runs) < 2:
        return ""
    base_label, base = runs[0]
    by_run = [{_cell_key(c): c for c in _cells(run, "ok")} for _, run in runs]
    keys = list(dict.fromkeys(k for cells in by_run for k in cells))  # the first run's cells first, then the others'
    notes = []
    for (label, _), cells in zip(runs[1:], by_run[1:]):
        if not set(cells) & set(by_run[0]):
            def listing(run_cells):
                return "; ".join(esc(_key_text(c)) for c in run_cells.values()) or "no finished cell"

            notes.append(f"<p class='warn'><b>{esc(base_label)} and {esc(label)} have no cell in common</b> (same "
                         f"method, cache, length, mode and batch), so there is no ratio to show. {esc(base_label)} "
                         f"measured: {listing(by_run[0])}. {esc(label)} measured: {listing(cells)}.</p>")
    head = "<tr><th>method</th><th>cache</th><th>length</th><th>mode</th><th>batch</th><th>" + esc(base_label)
    head += " p50 ms</th>" + "".join(f"<th>{esc(label)} p50 ms</th><th>ratio</th>" for label, _ in runs[1:]) + "</tr>"
    rows = []
    for key in keys:
        cell = next(cells[key] for cells in by_run if key in cells)
        base_cell = by_run[0].get(key)
        cols = []
        for cells in by_run[1:]:
            if key in cells and base_cell is not None:
                ratio = cells[key]["latency_ms"]["p50"] / base_cell["latency_ms"]["p50"]
                cls = "slower" if ratio > 1.1 else "faster" if ratio < 0.9 else ""
                cols.append(f"<td>{_num(cells[key]['latency_ms']['p50'])}</td><td class='{cls}'>{ratio:.3f}</td>")
            elif key in cells:
                cols.append(f"<td>{_num(cells[key]['latency_ms']['p50'])}</td><td>–</td>")
            else:
                cols.append("<td>–</td><td>–</td>")
        rows.append(f"<tr><td>{esc(key[0])}</td><td>{esc(cache_label(cell))}</td><td>{key[2]:,}</td>"
                    f"<td>{esc(key[3])}</td><td>{key[4]}</td>"
                    f"<td>{_num(base_cell['latency_ms']['p50']) if base_cell else '–'}</td>{''.join(cols)}</tr>")
    return ("<h2>Side by side: latency ratio to " + esc(base_label) + "</h2>" + "".join(notes)
            + "<table class='ratios'><thead>" + head + "</thead><tbody>" + "".join(rows) + "</tbody></table>")


def header(runs) -> str:
    parts = []
    for label, run in runs:
        meta = run.meta
        cfg = meta.get("config", {})
        model, text, device = meta.get("model", {}), meta.get("text", {}), meta.get("device", {})
        versions = meta.get("versions", {})
        items = [
            ("model", f"{model.get('name')} ({model.get('kind')}, {model.get('model_type')}, "
                      f"{model.get('layers')} layers, pre-training length {model.get('max_position_embeddings')})"),
            ("text", f"{text.get('name')} ({text.get('tokens', 0):,} tokens)"),
            ("device", f"{device.get('name')} ({device.get('kind')}), {device.get('threads')} thread(s)"),
            ("dtype / mode / batch", f"{cfg.get('dtype')} / {cfg.get('mode')} / {cfg.get('batch')}"),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
            ("git commit", meta.get("git_commit") or "–"),
            ("date", meta.get("started")),
            ("reproduce", meta.get("command")),
        ]
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{'<code>' + esc(v) + '</code>' if k == 'reproduce' else esc(v)}"
                       f"</td></tr>" for k, v in items)
        parts.append(f"<div class='run'><h3>{esc(label)}</h3><table class='meta'>{rows}</table></div>")
    return "<div class='runs'>" + "".join(parts) + "</div>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{margin-bottom:4px} .runs{display:flex;gap:24px;flex-wrap:wrap} .run{flex:1;min-width:420px}
table{border-collapse:collapse;margin:8px 0 24px;font-size:13px} th,td{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4;text-align:left} td{text-align:right} table.meta td{text-align:left}
table td:nth-child(2),table td:nth-child(1){text-align:left} tr.oom td{color:#b00}
td.slower{background:#fdd} td.faster{background:#dfd} code{font-size:12px;word-break:break-all}
p.warn{color:#8a4b00;background:#fff6e0;padding:8px}
.figure{width:100%;height:520px;margin:12px 0 28px}
"""


def _safe_json(value) -> str:
    text = json.dumps(value, allow_nan=False, default=_default)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _figure_json(fig) -> dict:
    # plotly's own serialiser handles its types; we re-encode it with our escaping
    return json.loads(fig.to_json())


def enforce_reading_rules(fig) -> None:
    """Rules every figure keeps, whichever function drew it: an axis that matches another (a shared axis) has its
    type (a linear axis matched to a log one puts its points on another scale) and shows its own ticks; a scatter
    series of fewer than MIN_LINE_POINTS points is drawn as points, not a line."""
    layout = fig.layout
    for name in layout.to_plotly_json():
        if re.fullmatch(r"[xy]axis\d*", name) and layout[name].matches:
            target = layout[name].matches
            layout[name].type = layout[target[0] + "axis" + target[1:]].type
            layout[name].showticklabels = True
    for trace in fig.data:
        if trace.type == "scatter" and trace.mode and "lines" in trace.mode and trace.y is not None:
            if sum(v is not None for v in trace.y) < MIN_LINE_POINTS:
                trace.mode = "+".join(part for part in trace.mode.split("+") if part != "lines") or "markers"
                if "markers" not in trace.mode:
                    trace.mode = "markers+" + trace.mode


def _log_tick_values(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten between low and high, or every digit where that gives fewer than three."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for digits in ((1, 2, 5), range(1, 10)):
        ticks = [d * 10.0**k for k in decades for d in digits if low <= d * 10.0**k <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks


def readable_log_axes(fig) -> None:
    """Log y axes labelled with whole values (50, 100, 200 rather than a 100 among bare digits 2 3 4), ranged over
    every value drawn on them: points, error bars and level lines."""
    layout = fig.layout
    groups = {}
    for name in layout.to_plotly_json():
        if re.fullmatch(r"yaxis\d*", name) and layout[name].type == "log":
            ref = "y" + name[5:]
            groups.setdefault(layout[name].matches or ref, set()).add(ref)
    for root, refs in groups.items():
        refs = refs | {root}
        values = []
        for trace in fig.data:
            if trace.type not in ("scatter", "bar") or (trace.yaxis or "y") not in refs or trace.y is None:
                continue
            ys = np.array([np.nan if v is None else v for v in trace.y], dtype=float)
            values += list(ys)
            err = trace.error_y
            if err is not None and err.array is not None:
                up = np.array(err.array, dtype=float)
                down = np.array(err.array if err.symmetric in (None, True) or err.arrayminus is None
                                else err.arrayminus, dtype=float)
                values += list(ys + up) + list(ys - down)
        values += [s.y0 for s in layout.shapes if s.type == "line" and s.y0 == s.y1 and (s.yref or "y") in refs]
        values = [v for v in values if v is not None and np.isfinite(v) and v > 0]
        if not values:
            continue
        low, high = min(values), max(values)
        span = math.log10(high) - math.log10(low)
        pad = max(0.06, 0.08 * span)
        ticks = _log_tick_values(low / 10**pad, high * 10**pad)
        for ref in refs:
            fig.layout["yaxis" + ref[1:]].update(
                tickvals=ticks, ticktext=[f"{v:,.0f}" if v >= 1 else f"{v:g}" for v in ticks],
                range=[math.log10(low) - pad, math.log10(high) + pad])


def build_report(runs: list[tuple[str, Run]]) -> str:
    from plotly.offline import get_plotlyjs

    figures = []
    for name, make in FIGURES:
        fig = make(runs)
        if fig is not None:
            enforce_reading_rules(fig)
            readable_log_axes(fig)
            fig.update_layout(template="plotly_white", legend=dict(orientation="v"))
            figures.append((name, _figure_json(fig)))
    divs = "\n".join(f"<div class='figure' id='fig-{esc(name)}' data-figure='{esc(name)}'></div>"
                     for name, _ in figures)
    payload = _safe_json([{"id": f"fig-{name}", "data": fig["data"], "layout": fig["layout"]}
                          for name, fig in figures])
    title = "pystream report" + (f": {runs[0][1].meta.get('model', {}).get('name')}" if runs else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="generator" content="pystream-report">
<style>{STYLE}</style>
<script>{get_plotlyjs()}</script>
</head><body>
<h1>{esc(title)}</h1>
<p>StreamingLLM (attention sinks) against window attention, sliding window with re-computation and dense attention.
Generated {esc(time.strftime('%Y-%m-%d %H:%M'))} from {len(runs)} run(s); figures are interactive (hover for exact
values).</p>
{header(runs)}
{cells_table(runs)}
{quality_table(runs)}
{paper_table_html(runs)}
{ratio_table(runs)}
<h2>Figures</h2>
{divs}
<script>
const figures = {payload};
for (const f of figures) {{
  Plotly.newPlot(f.id, f.data, f.layout, {{responsive: true, displaylogo: false}});
}}
</script>
</body></html>
"""


def _labels(paths: list[Path]) -> list[str]:
    names = [p.resolve().name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{chr(65 + i) if i < 26 else i}: {p}" for i, p in enumerate(paths)]


def write_report(run_dirs: list, out: Path) -> Path:
    """Build the report of `run_dirs` into `out` (written atomically). Raises ResultsError on a bad run dir."""
    paths = [Path(p) for p in run_dirs]
    runs = [(label, load_run(path)) for label, path in zip(_labels(paths), paths)]
    text = build_report(runs)
    out = Path(out)
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pystream-report",
        description="Build the HTML report of one or more pystream-bench run directories, from their saved\n"
                    "results alone. With two or more runs, shows them side by side with the latency ratio per cell.",
        epilog="examples:\n  pystream-report runs/20261128-101500 -o report.html\n"
               "  pystream-report runs/main runs/my-branch -o compare.html",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a directory written by pystream-bench (its run.json and results.jsonl); the first is "
                             "the baseline of the ratios")
    parser.add_argument("-o", "--output", default=None, help="HTML file (default: RUN_DIR/report.html for one run, "
                                                             "compare.html for several)")
    args = parser.parse_args(argv)
    out = Path(args.output) if args.output else (
        Path(args.run_dirs[0]) / "report.html" if len(args.run_dirs) == 1 else Path("compare.html"))
    try:
        path = write_report(args.run_dirs, out)
    except ResultsError as err:
        print(f"pystream-report: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"pystream-report: error: {out}: {err.strerror}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
