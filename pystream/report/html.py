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
import sys
import time
from pathlib import Path

import numpy as np

from ..results import ResultsError, Run, cache_label, load_run, peak_bytes, write_atomic
from ..results.paper import paper_table

MIB = 1024**2
# One colour per method across every figure.
METHOD_COLORS = {
    "sink": "#1f77b4",
    "window": "#ff7f0e",
    "recompute": "#2ca02c",
    "dense": "#d62728",
}
_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
RUN_DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
ROLLING_TOKENS = 64
MAX_POINTS = 2500  # per line in the perplexity-by-position figure


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
    return f"{rec['method']} {label}".strip()


# ---- figures ----------------------------------------------------------------------------------------------------------
# Each returns a plotly Figure, or None when the runs hold nothing for it. `runs` is a list of (label, Run).

def _cells(run: Run, status=None):
    return [r for r in run.records if r.get("record") == "cell" and (status is None or r.get("status") == status)]


def _run_suffix(runs, label):
    return f" [{label}]" if len(runs) > 1 else ""


def fig_latency_vs_cache(runs):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    lengths = sorted({c["length"] for _, run in runs for c in _cells(run, "ok") if c.get("cache_size")})
    if not lengths:
        return None
    lengths = lengths[-4:]
    fig = make_subplots(rows=1, cols=len(lengths), shared_yaxes=True,
                        subplot_titles=[f"stream length {n:,}" for n in lengths])
    for r_index, (label, run) in enumerate(runs):
        cells = _cells(run, "ok")
        for col, length in enumerate(lengths, start=1):
            for method in sorted({c["method"] for c in cells if c.get("cache_size")}):
                pts = sorted((c for c in cells if c["method"] == method and c["length"] == length
                              and c.get("cache_size")), key=lambda c: c["cache_size"])
                if not pts:
                    continue
                p50 = [c["latency_ms"]["p50"] for c in pts]
                speed = [c.get("speedup_vs_recompute") for c in pts]
                # the paper's Figure 10 labels StreamingLLM's speedup; the other speedups are in the hover
                text = [f"×{s:.1f}" if isinstance(s, (int, float)) and method == "sink" else "" for s in speed]
                fig.add_trace(go.Scatter(
                    x=[c["cache_size"] for c in pts], y=p50, mode="lines+markers+text", text=text,
                    textposition="bottom center", name=esc(method + _run_suffix(runs, label)),
                    legendgroup=method + label, showlegend=col == 1,
                    line=dict(color=method_color(method), dash=RUN_DASHES[r_index % len(RUN_DASHES)]),
                    error_y=dict(type="data", symmetric=False,
                                 array=[c["latency_ms"]["p90"] - c["latency_ms"]["p50"] for c in pts],
                                 arrayminus=[c["latency_ms"]["p50"] - c["latency_ms"]["min"] for c in pts]),
                    customdata=[[c["latency_ms"]["p90"], c["latency_ms"]["p99"], cache_label(c),
                                 f"{s:.1f}" if isinstance(s, (int, float)) else "–"] for c, s in zip(pts, speed)],
                    hovertemplate="cache %{customdata[2]}<br>p50 %{y:.3f} ms<br>p90 %{customdata[0]:.3f} ms"
                                  "<br>p99 %{customdata[1]:.3f} ms<br>×%{customdata[3]} vs recompute<extra>"
                                  + esc(method) + "</extra>",
                ), row=1, col=col)
            dense = [c for c in cells if c["method"] == "dense" and c["length"] == length]
            sizes = [c["cache_size"] for c in cells if c.get("cache_size") and c["length"] == length]
            if dense and sizes:  # dense has no cache size: a level across the figure
                p50 = dense[0]["latency_ms"]["p50"]
                fig.add_trace(go.Scatter(
                    x=[min(sizes), max(sizes)], y=[p50, p50], mode="lines+text", text=["", f"dense {p50:.1f} ms"],
                    textposition="top left", name=esc("dense" + _run_suffix(runs, label)),
                    legendgroup="dense" + label, showlegend=col == 1,
                    line=dict(color=METHOD_COLORS["dense"], dash="dot"),
                    hovertemplate=f"dense p50 {p50:.3f} ms<extra></extra>"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="cache size (tokens)")
    fig.update_yaxes(type="log", title_text="per-token decode latency, p50 (ms)", col=1)
    fig.update_layout(title="Per-token latency against cache size (error bars: min to p90; labels: speedup over "
                            "sliding window with re-computation; the paper's Figure 10)")
    return fig


def _by_length_figure(runs, value, title, y_title, log_y=True):
    import plotly.graph_objects as go

    fig = go.Figure()
    have = False
    oom_y = None
    for r_index, (label, run) in enumerate(runs):
        cells = _cells(run)
        keys = sorted({(c["method"], c.get("cache_size") or 0, c.get("sinks") or 0) for c in cells})
        for method, cache_size, sinks in keys:
            pts = sorted((c for c in cells if c["method"] == method and (c.get("cache_size") or 0) == cache_size),
                         key=lambda c: c["length"])
            ok = [c for c in pts if c.get("status") == "ok" and value(c) is not None]
            bad = [c for c in pts if c.get("status") != "ok"]
            name = series_name(pts[0]) + _run_suffix(runs, label)
            dash = RUN_DASHES[r_index % len(RUN_DASHES)]
            if ok:
                have = True
                ys = [value(c) for c in ok]
                oom_y = min(ys + ([oom_y] if oom_y else []))
                fig.add_trace(go.Scatter(x=[c["length"] for c in ok], y=ys, mode="lines+markers", name=esc(name),
                                         line=dict(color=method_color(method), dash=dash),
                                         hovertemplate="length %{x:,}<br>%{y:,.2f}<extra>" + esc(name) + "</extra>"))
            if bad:
                fig.add_trace(go.Scatter(
                    x=[c["length"] for c in bad], y=[None] * len(bad), mode="markers", name=esc(name + " OOM"),
                    marker=dict(symbol="x", size=14, color=method_color(method)),
                    customdata=[esc(c.get("error", c.get("status"))) for c in bad],
                    hovertemplate="length %{x:,}<br>%{customdata}<extra>" + esc(name) + "</extra>",
                    meta="oom"))
    if not have:
        return None
    floor = (oom_y or 1) / 2
    for trace in fig.data:
        if trace.meta == "oom":
            trace.y = [floor] * len(trace.x)
            for x, why in zip(trace.x, trace.customdata):
                fig.add_annotation(x=math.log10(x), y=math.log10(floor) if log_y else floor, text=why,
                                   showarrow=True, arrowhead=2, ay=-30, font=dict(color="#b00", size=11))
    fig.update_xaxes(type="log", title_text="stream length (tokens)")
    fig.update_yaxes(type="log" if log_y else "linear", title_text=y_title)
    fig.update_layout(title=title)
    return fig


def fig_throughput_vs_length(runs):
    return _by_length_figure(runs, lambda c: c.get("tokens_per_s"), "Decode throughput against stream length "
                             "(✕: did not fit in memory)", "tokens per second")


def fig_memory_vs_length(runs):
    def peak(c):
        value = peak_bytes(c)
        return value / MIB if value else None

    return _by_length_figure(runs, peak, "Peak memory against stream length (process RSS on CPU, torch max "
                             "allocated on GPU; ✕: did not fit)", "peak memory (MiB)")


def fig_kv_vs_length(runs):
    return _by_length_figure(runs, lambda c: (c.get("kv_bytes") or 0) / MIB or None,
                             "Bytes held by the KV cache against stream length", "KV cache (MiB)")


def _quality(run: Run, experiment: str | None = None):
    """Quality records: the bench's own (experiment None) and the paper experiment's ppl part, or one part."""
    recs = [r for r in run.records if r.get("record") == "quality" and r.get("status") == "ok"]
    if experiment is None:
        return [r for r in recs if not r.get("experiments") or "ppl" in r["experiments"]]
    return [r for r in recs if experiment in (r.get("experiments") or [])]


def fig_ppl_by_position(runs):
    import plotly.graph_objects as go

    fig = go.Figure()
    pretraining, caches = set(), set()
    for r_index, (label, run) in enumerate(runs):
        for rec in _quality(run):
            name = series_name(rec) + _run_suffix(runs, label)
            dash = RUN_DASHES[r_index % len(RUN_DASHES)]
            nll = np.array([np.nan if v is None else v for v in rec["nll"]], dtype=float)
            if rec.get("pretraining_length"):
                pretraining.add(rec["pretraining_length"])
            if rec.get("cache_size"):
                caches.add(rec["cache_size"])
            if rec.get("sampled"):  # a handful of samples per bin: wide bins, with their sample counts
                width = max(1024, len(nll) // 12)
                bins = []
                for start in range(0, len(nll), width):
                    part = nll[start:start + width]
                    part = part[~np.isnan(part)]
                    if part.size:
                        bins.append((start + min(width, len(nll) - start) / 2 + 1, float(part.mean()), part.size))
                fig.add_trace(go.Scatter(
                    x=[b[0] for b in bins], y=[b[1] for b in bins], mode="markers+lines",
                    name=esc(name + f" (sampled, {rec['sample_size']} positions)"),
                    line=dict(color=method_color(rec["method"]), dash="dot"), customdata=[b[2] for b in bins],
                    hovertemplate=f"tokens in a {width:,}-token bin around %{{x:,.0f}}<br>log PPL %{{y:.3f}} "
                                  "(%{customdata} samples)<extra></extra>"))
                continue
            window = min(ROLLING_TOKENS, max(1, len(nll) // 4))
            kernel = np.ones(window) / window
            rolling = np.convolve(np.nan_to_num(nll), kernel, mode="valid")
            # A point every few tokens is all a screen shows; it keeps a 20k-token report small.
            stride = max(1, len(rolling) // MAX_POINTS)
            fig.add_trace(go.Scatter(x0=window + 1, dx=stride, y=np.round(rolling[::stride], 4), mode="lines",
                                     name=esc(name),
                                     line=dict(color=method_color(rec["method"]), dash=dash),
                                     hovertemplate="token %{x:,}<br>log PPL %{y:.3f}<extra>" + esc(name)
                                                   + "</extra>"))
    if not fig.data:
        return None
    longest = max(len(r["nll"]) for _, run in runs for r in _quality(run)) + 1
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
    note = f" (the model's pre-training length, {beyond[0]:,}, lies beyond these tokens)" if beyond else ""
    fig.update_layout(title="Log perplexity against token position (the paper's Figure 3)" + note)
    return fig


def fig_ppl_bars(runs):
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, run in runs:
        recs = _quality(run)
        if not recs:
            continue
        names = [series_name(r) for r in recs]
        ppl = [r["ppl"] for r in recs]
        upper = [(r["ppl_ci95"][1] - r["ppl"]) if r.get("ppl_ci95") else 0 for r in recs]
        lower = [(r["ppl"] - r["ppl_ci95"][0]) if r.get("ppl_ci95") else 0 for r in recs]
        fig.add_trace(go.Bar(
            x=[esc(n) for n in names], y=ppl, name=esc(label) if len(runs) > 1 else "PPL",
            marker_color=[method_color(r["method"]) for r in recs],
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


def fig_sinks(runs):
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, run in runs:
        recs = sorted(_quality(run, "sinks"), key=lambda r: r.get("sinks") or 0)
        if not recs:
            continue
        fig.add_trace(go.Bar(
            x=[f"{r.get('sinks') or 0}+{r['cache_size'] - (r.get('sinks') or 0)}" for r in recs],
            y=[r["ppl"] for r in recs], name=esc(label), text=[f"{r['ppl']:.2f}" for r in recs],
            textposition="outside", marker_color=[method_color("sink" if r.get("sinks") else "window") for r in recs],
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

    fig = go.Figure()
    for label, run in runs:
        recs = sorted(_quality(run, "cache"), key=lambda r: r["cache_size"])
        if not recs:
            continue
        fig.add_trace(go.Scatter(x=[r["cache_size"] for r in recs], y=[r["ppl"] for r in recs],
                                 mode="lines+markers+text", text=[f"{r['ppl']:.2f}" for r in recs],
                                 textposition="top center", name=esc(label), line=dict(color=METHOD_COLORS["sink"]),
                                 # x is the capacity; the label is sinks+window ("4+252" for 256), like the tables
                                 customdata=[cache_label(r) for r in recs],
                                 hovertemplate="cache %{customdata}<br>PPL %{y:.3f}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_xaxes(type="log", title_text="total cache size (tokens, 4 of them sinks)")
    fig.update_yaxes(title_text="perplexity")
    fig.update_layout(title="The cache size at 4 sinks (the paper's Table 6)", showlegend=len(runs) > 1)
    return fig


def fig_stability(runs):
    import plotly.graph_objects as go

    fig = go.Figure()
    for r_index, (label, run) in enumerate(runs):
        recs = _quality(run, "stability") + [r for r in _quality(run, "ppl") if r["method"] in ("window", "dense")]
        for r in recs:
            buckets = [b for b in r["buckets"] if b.get("ppl")]
            name = series_name(r) + _run_suffix(runs, label)
            fig.add_trace(go.Scatter(
                x=[b["end"] - 1 for b in buckets], y=[b["ppl"] for b in buckets], mode="lines+markers",
                name=esc(name + (f" ({r['tokens']:,} tokens)" if "stability" in r.get("experiments", []) else "")),
                line=dict(color=method_color(r["method"]), dash=RUN_DASHES[r_index % len(RUN_DASHES)]),
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
        paper = "–" if r["paper"] is None else f"{r['paper']:.2f}"
        cells.append(f"<tr><td>{esc(r['finding'])}</td><td>{esc(r['setting'])}</td><td>{r['ours']:.2f}</td>"
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


def fig_profile(runs):
    import plotly.graph_objects as go

    cells = [(label, c) for label, run in runs for c in _cells(run, "ok") if c.get("profile")]
    if not cells:
        return None
    names = [esc(f"{series_name(c)} @ {c['length']:,}" + _run_suffix(runs, label)) for label, c in cells]
    fig = go.Figure()
    for key, title, color in PROFILE_PARTS:
        values = [c["profile"]["ms_per_step"].get(key, 0.0) for _, c in cells]
        fig.add_trace(go.Bar(x=names, y=values, name=title, marker_color=color,
                             hovertemplate="%{x}<br>" + title + ": %{y:.3f} ms per step<extra></extra>"))
    fig.update_layout(barmode="stack", title="Where a decode step goes (torch.profiler ranges, --profile; profiler "
                      "overhead included)")
    fig.update_yaxes(title_text="milliseconds per decode step")
    fig.update_xaxes(title_text="cell")
    return fig


FIGURES = [
    ("latency", fig_latency_vs_cache),
    ("throughput", fig_throughput_vs_length),
    ("memory", fig_memory_vs_length),
    ("kv", fig_kv_vs_length),
    ("ppl-position", fig_ppl_by_position),
    ("ppl", fig_ppl_bars),
    ("profile", fig_profile),
    ("sinks", fig_sinks),
    ("cache-sizes", fig_cache_sizes),
    ("stability", fig_stability),
    ("attention", fig_attention_share),
]


# ---- tables -----------------------------------------------------------------------------------------------------------

def _num(value, spec="{:,.2f}"):
    return "–" if value is None else spec.format(value)


def cells_table(runs) -> str:
    head = ("<tr><th>run</th><th>method</th><th>cache</th><th>length</th><th>mode</th><th>p50 ms</th>"
            "<th>p90 ms</th><th>p99 ms</th><th>tokens/s</th><th>peak MiB</th><th>KV MiB</th>"
            "<th>× recompute</th><th>note</th></tr>")
    rows = []
    for label, run in runs:
        for c in _cells(run):
            note = "text cycled" if c.get("text_cycled") else ""
            if c.get("status") != "ok":
                rows.append(f"<tr class='oom'><td>{esc(label)}</td><td>{esc(c['method'])}</td>"
                            f"<td>{esc(cache_label(c))}</td><td>{c['length']:,}</td><td>{esc(c.get('mode'))}</td>"
                            f"<td colspan='7'>{esc(c.get('error', c.get('status')))}</td><td>{esc(note)}</td></tr>")
                continue
            lat = c["latency_ms"]
            speed = c.get("speedup_vs_recompute")
            if isinstance(speed, dict):
                speed = ", ".join(f"{v:.1f} @ {k}" for k, v in speed.items())
            elif speed is not None:
                speed = f"{speed:.1f}"
            peak = peak_bytes(c)
            rows.append(
                f"<tr><td>{esc(label)}</td><td>{esc(c['method'])}</td><td>{esc(cache_label(c))}</td>"
                f"<td>{c['length']:,}</td><td>{esc(c.get('mode'))}</td><td>{_num(lat['p50'])}</td>"
                f"<td>{_num(lat['p90'])}</td><td>{_num(lat['p99'])}</td><td>{_num(c.get('tokens_per_s'))}</td>"
                f"<td>{_num(peak / MIB if peak else None, '{:,.0f}')}</td>"
                f"<td>{_num((c.get('kv_bytes') or 0) / MIB)}</td><td>{esc(speed or '–')}</td><td>{esc(note)}</td></tr>")
    if not rows:
        return ""
    return f"<table class='cells'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def quality_table(runs) -> str:
    rows = []
    for label, run in runs:
        for q in run.records:
            if q.get("record") != "quality":
                continue
            if q.get("status") != "ok":
                rows.append(f"<tr class='oom'><td>{esc(label)}</td><td>{esc(q['method'])}</td>"
                            f"<td>{esc(cache_label(q))}</td><td colspan='4'>{esc(q.get('error'))}</td></tr>")
                continue
            ci = q.get("ppl_ci95")
            interval = f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "–"
            note = f"sampled at {q.get('sample_size')} positions" if q.get("sampled") else "every token"
            rows.append(f"<tr><td>{esc(label)}</td><td>{esc(q['method'])}</td><td>{esc(cache_label(q))}</td>"
                        f"<td>{q['tokens']:,}</td><td>{_num(q['ppl'], '{:.3f}')}</td>"
                        f"<td>{esc(interval)}</td><td>{esc(note)}</td></tr>")
    if not rows:
        return ""
    return ("<table class='quality'><thead><tr><th>run</th><th>method</th><th>cache</th><th>tokens</th><th>PPL</th>"
            "<th>95% CI</th><th>note</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def ratio_table(runs) -> str:
    """Cells present in the first run and in later ones: p50 per run and the ratio to the first."""
    if len(runs) < 2:
        return ""
    base_label, base = runs[0]
    base_cells = {(c["method"], c.get("cache_size"), c["length"], c.get("mode")): c for c in _cells(base, "ok")}
    head = "<tr><th>method</th><th>cache</th><th>length</th><th>" + esc(base_label) + " p50 ms</th>"
    head += "".join(f"<th>{esc(label)} p50 ms</th><th>ratio</th>" for label, _ in runs[1:]) + "</tr>"
    rows = []
    for key, cell in base_cells.items():
        cols = []
        for _, run in runs[1:]:
            other = {(c["method"], c.get("cache_size"), c["length"], c.get("mode")): c for c in _cells(run, "ok")}
            if key in other:
                ratio = other[key]["latency_ms"]["p50"] / cell["latency_ms"]["p50"]
                cls = "slower" if ratio > 1.1 else "faster" if ratio < 0.9 else ""
                cols.append(f"<td>{_num(other[key]['latency_ms']['p50'])}</td><td class='{cls}'>{ratio:.3f}</td>")
            else:
                cols.append("<td>–</td><td>–</td>")
        rows.append(f"<tr><td>{esc(key[0])}</td><td>{esc(cache_label(cell))}</td><td>{key[2]:,}</td>"
                    f"<td>{_num(cell['latency_ms']['p50'])}</td>{''.join(cols)}</tr>")
    return ("<h2>Side by side: latency ratio to " + esc(base_label) + "</h2><table class='ratios'><thead>" + head
            + "</thead><tbody>" + "".join(rows) + "</tbody></table>")


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


def build_report(runs: list[tuple[str, Run]]) -> str:
    from plotly.offline import get_plotlyjs

    figures = []
    for name, make in FIGURES:
        fig = make(runs)
        if fig is not None:
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
<h2>Cells</h2>
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
        description="Build the HTML report of one or more pystream-bench run directories, from their saved results "
                    "alone. With two or more runs, shows them side by side with the latency ratio per cell.",
        epilog="examples:\n  pystream-report runs/20261128-101500 -o report.html\n"
               "  pystream-report runs/main runs/my-branch -o compare.html",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
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
