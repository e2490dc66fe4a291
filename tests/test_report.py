"""The HTML report: built from a small fixture run directory (no model), checked as text and in a real browser."""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pystream.report import main as report_main
from pystream.report import write_report
from pystream.results import META, RESULTS, SCHEMA, SCHEMA_VERSION, load_run, record

HOSTILE = "<script>alert('x')</script>"
ARTIFACTS = Path(os.environ.get("PYSTREAM_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))


def make_run(folder: Path, *, model_name="smollm2-135m", scale=1.0, batch=1, lengths=(4096, 1048576),
             nodes=None) -> Path:
    folder.mkdir(parents=True)
    meta = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "started": "2026-11-28T10:00:00+0000",
        "command": f"pystream-bench --lengths 4k,1M --model '{model_name}'",
        "config": {"mode": "state", "dtype": "float32", "batch": batch},
        "versions": {"pystream": "0.1.0", "torch": "2.13.0"}, "git_commit": "abc123",
        "device": {"kind": "cpu", "name": "Test CPU", "threads": 1},
        "model": {"name": model_name, "kind": "folder", "model_type": "llama", "layers": 30,
                  "max_position_embeddings": 8192},
        "text": {"name": "kjv", "tokens": 1_000_000},
    }
    (folder / META).write_text(json.dumps(meta))
    records = []
    for length in lengths:
        for cache in (256, 1024):
            recompute = 600.0 * cache / 256 * scale
            for method, p50, sinks in (("recompute", recompute, 0), ("sink", 52.0 * scale, 4),
                                       ("window", 51.0 * scale, 0)):
                records.append(record(
                    "cell", method=method, cache_size=cache, length=length, mode="state", sinks=sinks,
                    window=cache - sinks, status="ok", batch=batch,
                    latency_ms={"p50": p50, "p90": p50 * 1.05, "p99": p50 * 1.1, "mean": p50, "min": p50 * 0.95,
                                "max": p50 * 1.2},
                    tokens_per_s=batch * 1000 / p50, peak_rss_bytes=1_000_000_000, kv_bytes=cache * 46_080,
                    speedup_vs_recompute=recompute / p50, text_cycled=length > 1_000_000))
        if length == 4096:
            records.append(record("cell", method="dense", cache_size=None, length=length, mode="state", batch=batch,
                                  status="ok", latency_ms={"p50": 110.0, "p90": 112.0, "p99": 115.0, "mean": 110.0,
                                                           "min": 100.0, "max": 120.0},
                                  tokens_per_s=9.1, peak_rss_bytes=1_400_000_000, kv_bytes=4096 * 46_080,
                                  speedup_vs_recompute={"256": 5.4, "1024": 21.0}))
        else:
            records.append(record("cell", method="dense", cache_size=None, length=length, mode="state", batch=batch,
                                  status="oom", error="OOM: needs 45.0 GiB, 22.6 GiB available"))
    for method, cache, ppl in (("dense", None, 4.1), ("sink", 256, 4.4), ("window", 256, 11.2)):
        nll = [round(math.log(ppl) + 0.4 * math.sin(i / 60), 4) for i in range(1535)]
        records.append(record("quality", method=method, cache_size=cache, length=1536, mode="quality", status="ok",
                              tokens=1536, sinks=4 if method == "sink" else 0, ppl=ppl, ppl_ci95=None,
                              sampled=False, sample_size=None, nll=nll, pretraining_length=8192,
                              buckets=[{"start": 1, "end": 257, "tokens": 256, "ppl": ppl}]))
    sampled = [None] * 1535
    for i in range(0, 1535, 20):
        sampled[i] = 1.5
    records.append(record("quality", method="recompute", cache_size=256, length=1536, mode="quality", status="ok",
                          tokens=1536, sinks=0, ppl=5.2, ppl_ci95=[2.8, 9.8], sampled=True, sample_size=77,
                          nll=sampled, pretraining_length=8192,
                          buckets=[{"start": 1, "end": 257, "tokens": 13, "ppl": 5.0},
                                   {"start": 257, "end": 513, "tokens": 13, "ppl": 5.4}]))
    if nodes:  # a run on a cluster: cells alternate between the nodes, each record says where it ran
        for index, rec in enumerate(r for r in records if r["record"] == "cell"):
            node = nodes[index % len(nodes)]
            rec["ran_on"] = {"node": node, "node_id": f"id-{node}", "device": "cpu", "device_name": "Test CPU",
                             "threads": 1, "pid": 100 + index}
            if rec.get("latency_ms") and node == nodes[-1]:  # the last node is the slow one
                rec["latency_ms"] = {k: v * 1.5 for k, v in rec["latency_ms"].items()}
    (folder / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def make_run_at_lengths(folder: Path) -> Path:
    """A run with quality at two lengths (the evaluator's records): sink under both position schemes, window, dense
    at 4k and OOM at 1M, recompute paired with sink."""
    make_run(folder)
    lines = [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]
    records = [r for r in lines if r["record"] == "cell"]
    for length in (4096, 1048576):
        start, end = length - 1536, length
        for method, cache, sinks, scheme, ppl in (("sink", 256, 4, "in-cache", 5.8), ("sink", 256, 4, "original", 9.1),
                                                  ("window", 256, 0, "in-cache", 12.0), ("dense", None, 0, None, 4.2)):
            base = dict(method=method, cache_size=cache, length=length, mode="quality", sinks=sinks,
                        position_scheme=scheme, start=start, end=end, tokens=1536, pretraining_length=8192)
            if method == "dense" and length > 8192:
                records.append(record("quality", **base, status="oom", error="OOM: needs 45.0 GiB, 22.5 GiB available",
                                      kv_bytes_needed=45 * 1024**3))
                continue
            ppl = ppl * (1.3 if length > 8192 and method != "dense" else 1.0)
            nll = [round(math.log(ppl) + 0.3 * math.sin(i / 40), 4) for i in range(1536)]
            records.append(record("quality", **base, status="ok", evaluator="chunked", ppl=ppl, ppl_ci95=None,
                                  sampled=False, sample_size=None, nll=nll,
                                  buckets=[{"start": start, "end": start + 256, "tokens": 256, "ppl": ppl}]))
        sampled = [None] * 1536
        for i in range(0, 1536, 12):
            sampled[i] = 1.6
        records.append(record("quality", method="recompute", cache_size=256, length=length, mode="quality", sinks=0,
                              position_scheme=None, start=start, end=end, tokens=1536, status="ok", ppl=5.0,
                              ppl_ci95=[4.6, 5.4], sampled=True, sample_size=128, nll=sampled, pretraining_length=8192,
                              buckets=[{"start": start, "end": start + 256, "tokens": 22, "ppl": 5.0}],
                              ratio_to="sink", ratio_position_scheme="in-cache", ratio=1.04, ratio_ci95=[0.99, 1.09],
                              ratio_rel_half_width=0.048, ratio_target=0.05))
    (folder / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


RECALL_SETTINGS = (("dense", None, 0, None), ("sink", 256, 4, "in-cache"), ("sink", 256, 4, "original"),
                   ("window", 256, 0, "in-cache"), ("recompute", 256, 0, None), ("sink", 1024, 4, "in-cache"))


def make_recall_run(folder: Path) -> Path:
    """A recall run (`--experiment recall`): recall against distance per method, and the placement probe, whose
    dense records sit at the distances of each cache's window."""
    folder.mkdir(parents=True)
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "started": "2026-11-29T10:00:00+0000",
            "command": "pystream-bench --experiment recall", "config": {"experiment": "recall"},
            "versions": {"pystream": "0.1.0"}, "device": {"kind": "cpu", "name": "Test CPU", "threads": 1},
            "model": {"name": "smollm2-135m", "max_position_embeddings": 8192}, "text": {"name": "kjv"}}
    (folder / META).write_text(json.dumps(meta))
    records = []

    def add(method, cache, sinks, scheme, probe, d, value, placement=None, window=None):
        mode = f"recall-{probe}" + (f":{placement}" if placement else "") + f"/{scheme or '-'}"
        extra = {"placement": placement, "placement_window": window} if placement else {}
        records.append(record("recall", method=method, cache_size=cache, sinks=sinks, position_scheme=scheme,
                              length=d, mode=mode, status="ok", probe=probe, distance=d, passage_tokens=64,
                              passages=3, first_nll=[13.0, 13.2, 13.4], repeat_nll=[13.0 * (1 - value)] * 3,
                              recall_per_passage=[value] * 3, recall=value, ci95=[value - 0.05, value + 0.05],
                              pretraining_length=8192, **extra))

    for method, cache, sinks, scheme in RECALL_SETTINGS:
        for d in (16, 256, 1024, 9216):
            held = (d + 64 <= cache - sinks) if cache else d < 8192
            add(method, cache, sinks, scheme, "distance", d, (0.9 if held else 0.02) - (0.1 if scheme == "original"
                                                                                         else 0.0))
        windows = [cache - sinks] if cache else [252, 1020]
        for window in windows:
            for where, d, value in (("start", window - 64, 0.7), ("middle", (window - 64) // 2, 0.8),
                                    ("end", 0, 0.95)):
                if where == "end" and window != windows[0]:
                    continue  # d = 0 ends every window: recorded once (one record key), as the experiment does
                add(method, cache, sinks, scheme, "placement", d, value - (0.05 if method == "dense" else 0.0),
                    where, window)
    (folder / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_recall_placement_is_drawn_per_cache_start_to_end(tmp_path):
    """One panel per cache, placements in the order start, middle, end, every method's recall at each, with its
    interval; dense in each panel at the distances of that cache's window."""
    run = make_recall_run(tmp_path / "run")
    fig = rendered(tmp_path, [run])["recall-placement"]
    records = [r for r in load_run(run).records if r["probe"] == "placement"]
    titles = [a["text"] for a in fig["layout"]["annotations"] if a["text"].startswith("cache ")]
    assert titles == ["cache 256", "cache 1,024"]
    panels = {}
    for trace in fig["data"]:
        panels.setdefault(trace.get("xaxis", "x"), []).append(trace["name"])
        assert list(trace["x"]) == ["start", "middle", "end"], trace["name"]
    assert panels["x"] == ["dense (distances of window 252)", "recompute 256", "sink 4+252",
                           "sink 4+252 (original positions)", "window 256"]
    assert panels["x2"] == ["dense (distances of window 1,020)", "sink 4+1020"]
    for trace in fig["data"]:
        method, *rest = trace["name"].split(" ")
        mine = [r for r in records if r["method"] == method and (
            r["cache_size"] is None and (f"window {r['placement_window']:,})" in trace["name"]
                                         or r["placement"] == "end")
            or r["cache_size"] and series_label(r) == trace["name"])]
        by = {r["placement"]: r for r in mine}
        assert values(trace["y"]) == [by[p]["recall"] for p in ("start", "middle", "end")]
        assert [d for d, _ in trace["customdata"]] == [by[p]["distance"] for p in ("start", "middle", "end")]
        assert values(trace["error_y"]["array"]) == pytest.approx([0.05] * 3)
    xaxis = fig["layout"]["xaxis"]
    assert xaxis["type"] == "category" and list(xaxis["categoryarray"]) == ["start", "middle", "end"]
    # a run without placement records draws no such figure
    kept = [json.dumps(r) for r in load_run(run).records if r["probe"] != "placement"]
    (run / RESULTS).write_text("\n".join(kept) + "\n")
    assert "recall-placement" not in rendered(tmp_path, [run]) and "recall" in rendered(tmp_path, [run])


def series_label(rec):
    from pystream.report.html import series_name

    return series_name(rec)


def test_quality_at_lengths_is_drawn_per_method_and_scheme(tmp_path):
    run = make_run_at_lengths(tmp_path / "run")
    html = write_report([run], tmp_path / "report.html").read_text()
    figures = figures_of(html)
    traces = {t["name"]: t for t in figures["ppl-length"]["data"]}
    assert {"sink 4+252", "sink 4+252 (original positions)", "window 256", "dense", "recompute 256"} <= set(traces)
    assert values(traces["sink 4+252"]["x"]) == [4096, 1048576]
    assert values(traces["dense"]["x"]) == [4096]  # the OOM at 1M is a note, not a point
    assert figures["ppl-length"]["layout"]["xaxis"]["type"] == "log"
    assert "OOM: needs 45.0 GiB" in figures["ppl-length"]["layout"]["title"]["text"]
    assert "sink / recompute 1.040 (0.990-1.090)" in html  # the paired ratio with its interval
    assert "1,047,040-1,048,576" in html  # the tokens a record covers


EXPECTED_FIGURES = ["fig-latency", "fig-throughput", "fig-memory", "fig-kv", "fig-ppl-position", "fig-ppl"]


def test_report_holds_figures_and_rows(tmp_path):
    run = make_run(tmp_path / "run")
    html = write_report([run], tmp_path / "report.html").read_text()
    for fig in EXPECTED_FIGURES:
        assert f"id='fig-{fig[4:]}'" in html
    # one summary row per cell: 2 lengths x (3 methods x 2 caches + dense)
    assert len(re.findall(r"<tr(?: class='oom')?><td>run</td>", html)) == 14 + 4
    assert "OOM: needs 45.0 GiB, 22.6 GiB available" in html
    assert "4+252" in html and "sampled at 77 positions" in html
    assert html.count("<script>") == 2  # plotly.js once, the figures once: nothing fetched
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:", html)


def test_user_strings_are_escaped(tmp_path):
    run = make_run(tmp_path / "run", model_name=HOSTILE)
    html = write_report([run], tmp_path / "report.html").read_text()
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html


def test_two_runs_side_by_side_with_ratios(tmp_path):
    a, b = make_run(tmp_path / "main"), make_run(tmp_path / "branch", scale=1.25)
    html = write_report([a, b], tmp_path / "compare.html").read_text()
    assert "Side by side: latency ratio to main" in html
    assert html.count("<td class='slower'>1.250</td>") == 12  # every scaled cell...
    assert html.count("<td class=''>1.000</td>") == 1  # ...and dense, which was not
    assert "[branch]" in html  # figure traces carry their run


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / META).write_text("{not json")
    assert report_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "run.json: invalid JSON" in err and err.count("\n") == 1
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    newer = make_run(tmp_path / "newer")
    rec = json.loads((newer / RESULTS).read_text().splitlines()[0])
    rec["schema_version"] = SCHEMA_VERSION + 1
    (newer / RESULTS).write_text(json.dumps(rec) + "\n")
    assert report_main([str(newer)]) == 2
    assert "newer pystream" in capsys.readouterr().err


# ---- what the figures draw: parsed from Plotly's JSON inside the page ------------------------------------------------

REPORTS = Path(__file__).resolve().parent.parent / "reports"
MIB = 1024**2


def figures_of(html: str) -> dict:
    start = html.index("const figures = ") + len("const figures = ")
    return {f["id"][len("fig-"):]: f for f in json.loads(html[start:html.index(";\nfor (const f of figures)")])}


def values(array) -> list:
    """A trace's array as Python numbers: Plotly writes numpy arrays as base64 typed arrays."""
    if array is None:
        return []
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"])).tolist()
    return list(array)


def _ok(records, kind):
    return [r for r in records if r.get("record") == kind and r.get("status") == "ok"]


def _rolling(records, meta):
    out = []
    for q in _ok(records, "quality"):
        if not q.get("sampled") and q.get("nll") is not None:  # a very long stream keeps chunk PPLs only
            nll = np.array(q["nll"], dtype=float)
            window = meta["window"]
            out += list(np.convolve(nll, np.ones(window) / window, mode="valid"))
    return out


def _bin_means(records, meta):
    out = []
    for q in _ok(records, "quality"):
        if q.get("sampled"):
            for start in range(0, len(q["nll"]), meta["width"]):
                part = [v for v in q["nll"][start:start + meta["width"]] if v is not None]
                if part:
                    out.append(sum(part) / len(part))
    return out


# How each plotted value comes from the records, written here independently of the report's code.
DERIVATIONS = {
    "cell.latency_ms.p50": lambda recs, meta: [c["latency_ms"]["p50"] for c in _ok(recs, "cell")],
    "cell.tokens_per_s": lambda recs, meta: [c["tokens_per_s"] for c in _ok(recs, "cell")],
    "cell.peak_bytes / MiB": lambda recs, meta: [(c.get("cuda_max_allocated_bytes") or c["peak_rss_bytes"]) / MIB
                                                 for c in _ok(recs, "cell")],
    "cell.kv_bytes / MiB": lambda recs, meta: [c["kv_bytes"] / MIB for c in _ok(recs, "cell")],
    "quality.ppl": lambda recs, meta: [q["ppl"] for q in _ok(recs, "quality")],
    "quality.buckets.ppl": lambda recs, meta: [b["ppl"] for q in _ok(recs, "quality") for b in q["buckets"]
                                               if b.get("ppl")],
    "quality.nll rolling mean": _rolling,
    "quality.nll bin mean": _bin_means,
    "recall.recall": lambda recs, meta: [r["recall"] for r in _ok(recs, "recall")],
}
for _part in ("model_ms", "cache_update_ms", "bookkeeping_ms", "rerotate_ms", "logits_ms", "other_ms"):
    DERIVATIONS[f"cell.profile.ms_per_step.{_part}"] = (
        lambda recs, meta, part=_part: [c["profile"]["ms_per_step"].get(part, 0.0) for c in _ok(recs, "cell")
                                        if c.get("profile")])

# What a figure may draw, for a trace that does not name its derivation (the report before traces named theirs).
FIGURE_VALUES = {"latency": ["cell.latency_ms.p50"], "throughput": ["cell.tokens_per_s"],
                 "memory": ["cell.peak_bytes / MiB"], "kv": ["cell.kv_bytes / MiB"],
                 "ppl-position": ["quality.nll rolling mean", "quality.nll bin mean"], "ppl": ["quality.ppl"],
                 "sinks": ["quality.ppl"], "cache-sizes": ["quality.ppl"], "stability": ["quality.buckets.ppl"],
                 "profile": [d for d in DERIVATIONS if d.startswith("cell.profile.")]}


def _fallback_meta(trace, derivation):
    if derivation == "quality.nll rolling mean":
        return {"window": int(trace.get("x0", 65)) - 1, "decimals": 4}
    return {"width": 1024}


def example_runs(tmp_path, name):
    if name == "fixture":
        return [make_run(tmp_path / "run")]
    if name == "comparison":
        return [make_run(tmp_path / "main"), make_run(tmp_path / "branch", scale=1.25)]
    if name == "batch 4":
        return [make_run(tmp_path / "run", batch=4)]
    if name == "two nodes":
        return [make_run(tmp_path / "run", nodes=("node-a", "node-b"))]
    if name == "at lengths":
        return [make_run_at_lengths(tmp_path / "run")]
    if name == "recall":
        return [make_recall_run(tmp_path / "run")]
    if name == "at lengths, compared":
        return [make_run_at_lengths(tmp_path / "main"), make_run_at_lengths(tmp_path / "branch")]
    return [REPORTS / ("recall" if name == "recall-run" else name)]


EXAMPLES = ["fixture", "comparison", "batch 4", "two nodes", "at lengths", "at lengths, compared", "recall",
            "default-run", "paper-experiment", "context-extension",
            "gpu-h200/1m", "recall-run"]


def rendered(tmp_path, runs):
    return figures_of(write_report(runs, tmp_path / "report.html").read_text())


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_plotted_value_is_a_record_value(tmp_path, example):
    """Every y a Scatter or Bar trace draws is a value that a record holds, or one derived from records in a named
    way (bytes -> MiB, a rolling mean of the per-token NLL); a status (OOM) is never drawn as a value."""
    runs = example_runs(tmp_path, example)
    records = [r for run in runs for r in load_run(run).records]
    checked, unnamed = 0, []
    for name, fig in rendered(tmp_path, runs).items():
        for trace in fig["data"]:
            if trace["type"] not in ("scatter", "bar"):
                continue
            named = trace.get("meta") if isinstance(trace.get("meta"), dict) else {}
            derivations = [named["y"]] if named.get("y") else FIGURE_VALUES.get(name, [])
            ys = [v for v in values(trace.get("y")) if v is not None]
            candidates, tolerance = [], 1e-9
            for derivation in derivations:
                meta = named if named.get("y") else _fallback_meta(trace, derivation)
                candidates += DERIVATIONS[derivation](records, meta)
                if "decimals" in meta:  # values rounded for the page
                    tolerance = max(tolerance, 0.5 * 10.0 ** -meta["decimals"] + 1e-12)
            candidates = np.array(sorted(candidates))
            assert candidates.size, f"{name}: {trace.get('name')}: no record holds what it draws ({derivations})"
            index = np.clip(np.searchsorted(candidates, ys), 1, len(candidates) - 1)
            nearest = np.minimum(abs(candidates[index] - ys), abs(candidates[index - 1] - ys))
            strays = [y for y, d in zip(ys, nearest) if d > tolerance * max(1.0, abs(y))]
            assert not strays, f"{name}: {trace.get('name')!r} draws {strays[:5]}, which no record holds"
            if named.get("y") not in DERIVATIONS:
                unnamed.append(f"{name}: {trace.get('name')!r}")
            checked += len(ys)
    assert checked > 0
    assert not unnamed, f"traces that do not name where their y comes from: {unnamed}"


def _axes(layout):
    return {key: axis for key, axis in layout.items() if re.fullmatch(r"[xy]axis\d*", key)}


@pytest.mark.parametrize("example", ["fixture", "comparison", "default-run"])
def test_subplots_sharing_an_axis_agree_on_it(tmp_path, example):
    figures = rendered(tmp_path, example_runs(tmp_path, example))
    shared = 0
    for name, fig in figures.items():
        axes = _axes(fig["layout"])
        for key, axis in axes.items():
            if axis.get("matches"):
                target = axes[axis["matches"][0] + "axis" + axis["matches"][1:]]
                assert axis.get("type", "-") == target.get("type", "-"), f"{name}: {key} is not on {target}'s scale"
                assert axis.get("showticklabels") is not False, f"{name}: {key} hides its tick labels"
                shared += 1
    assert shared > 0  # the latency figure's panels share their y axis


def identity(trace) -> tuple:
    """What tells a trace apart on screen: colour, and the dash of its line and the symbol of its markers where it
    draws them; for bars, their colours and fill pattern."""
    marker = trace.get("marker", {})
    if trace["type"] == "bar":
        color = marker.get("color")
        return ("bar", tuple(color) if isinstance(color, list) else color, marker.get("pattern", {}).get("shape"))
    mode = trace.get("mode", "lines+markers")
    line = trace.get("line", {})
    symbol = marker.get("symbol", "circle")
    return (line.get("color") or marker.get("color"),
            line.get("dash", "solid") if "lines" in mode else None,
            (tuple(symbol) if isinstance(symbol, list) else symbol) if "markers" in mode else None)


@pytest.mark.parametrize("example", ["fixture", "comparison", "two nodes", "at lengths", "at lengths, compared",
                                     "recall", "recall-run", "default-run", "paper-experiment", "context-extension"])
def test_each_series_has_its_own_identity(tmp_path, example):
    """No two traces of a subplot look alike; a series keeps its look in every figure; a series of fewer than three
    points is drawn as points, not as a line."""
    seen = {}
    for name, fig in rendered(tmp_path, example_runs(tmp_path, example)).items():
        panels = {}
        for trace in fig["data"]:
            if trace["type"] not in ("scatter", "bar"):
                continue
            panel = panels.setdefault((trace.get("xaxis", "x"), trace.get("yaxis", "y")), {})
            look = identity(trace)
            assert look not in panel, f"{name}: {trace.get('name')!r} looks like {panel.get(look)!r} ({look})"
            panel[look] = trace.get("name")
            if trace["type"] == "scatter":
                points = sum(v is not None for v in values(trace.get("y")))
                assert points >= 3 or "lines" not in trace.get("mode", "lines"), \
                    f"{name}: {trace.get('name')!r} joins {points} points with a line"
                color = look[0]
                if trace.get("name") in seen:
                    assert seen[trace["name"]][0] == color, f"{trace['name']!r} changes colour in {name}"
                    for i in (1, 2):  # the dash, the symbol: the same wherever both figures draw them
                        if look[i] is not None and seen[trace["name"]][i] is not None and not isinstance(look[i],
                                                                                                         tuple):
                            assert seen[trace["name"]][i] == look[i], f"{trace['name']!r} changes its look in {name}"
                seen.setdefault(trace.get("name"), look)


def test_a_run_on_several_nodes_is_coloured_by_node(tmp_path):
    """pystream-bench --ray records where each cell ran: with two nodes, a figure draws every cell in its node's
    colour (the slow node's cells stand apart) and the cells table names the node; one node draws no such figure."""
    figures = rendered(tmp_path, [make_run(tmp_path / "two", nodes=("node-a", "node-b"))])
    traces = figures["nodes"]["data"]
    assert [t["name"] for t in traces] == ["node node-a", "node node-b"]
    assert len({identity(t) for t in traces}) == 2
    records = load_run(tmp_path / "two").records
    for trace in traces:
        node = trace["name"].removeprefix("node ")
        expected = [c["latency_ms"]["p50"] for c in records if c["record"] == "cell" and c["status"] == "ok"
                    and c["ran_on"]["node"] == node]
        assert sorted(values(trace["y"])) == sorted(expected) and expected
    slow, fast = (np.median(values(t["y"])) for t in reversed(traces))
    assert slow > fast
    html = (tmp_path / "report.html").read_text()
    assert "node node-b" in html.split("<table class='cells'>")[1].split("</table>")[0]
    assert "nodes" not in rendered(tmp_path, [make_run(tmp_path / "one", nodes=("node-a",))])


def test_a_status_is_a_note_not_a_point(tmp_path):
    figures = rendered(tmp_path, [make_run(tmp_path / "run")])
    for name in ("throughput", "memory", "kv"):
        fig = figures[name]
        for trace in fig["data"]:
            if trace["name"].startswith("dense"):
                assert 1048576 not in values(trace.get("x")), f"{name}: dense is drawn where it did not run"
        notes = [a["text"] for a in fig["layout"].get("annotations", [])]
        assert any("OOM: needs 45.0 GiB, 22.6 GiB available" in n for n in notes), f"{name}: the OOM is not said"


# ---- tables ----------------------------------------------------------------------------------------------------------

def test_perplexity_table_has_its_own_heading(tmp_path):
    html = write_report([make_run(tmp_path / "run")], tmp_path / "report.html").read_text()
    cells, ppl = html.index("<h2>Cells</h2>"), html.index("<h2>Perplexity</h2>")
    assert cells < html.index("<table class='cells'>") < ppl < html.index("<table class='quality'>")


def test_batch_is_shown_and_latency_is_per_step(tmp_path):
    from rich.console import Console

    from pystream.results.summary import print_summary

    run = make_run(tmp_path / "run", batch=4)
    html = write_report([run], tmp_path / "report.html").read_text()
    assert "<th>batch</th>" in html and "<th>p50 ms/step</th>" in html and "ms/token" not in html
    assert html.count("<td>4</td>") >= 14  # the batch of every cell
    console = Console(width=120, file=io.StringIO(), color_system=None)
    print_summary(load_run(run).records, console)
    text = console.file.getvalue()
    assert "per step" in text and "per token" not in text and re.search(r"\bbatch\b", text)
    single = make_run(tmp_path / "single")
    assert "<th>p50 ms/token</th>" in write_report([single], tmp_path / "single.html").read_text()


@pytest.mark.parametrize("width", [120, 100])
def test_summary_tables_do_not_wrap(tmp_path, width):
    """Each record is one line of the terminal table, and the OOM message reads in one piece."""
    from rich.console import Console

    from pystream.results.summary import print_summary

    records = load_run(REPORTS / "default-run").records
    console = Console(width=width, file=io.StringIO(), color_system=None)
    print_summary(records, console)
    lines = console.file.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    oom = next(r["error"] for r in records if r["record"] == "cell" and r["status"] == "oom")
    assert oom.startswith("OOM: needs ") and any(oom in line for line in lines)
    for rec in records:
        if rec["record"] == "cell" and rec["status"] == "ok" and width >= 120:
            p50 = f"{rec['latency_ms']['p50']:,.1f}"
            assert any(f"{rec['length']:,}" in line and p50 in line for line in lines), (rec["method"], p50)


def test_comparison_without_common_cells_says_so(tmp_path):
    a = make_run(tmp_path / "short", lengths=(4096,))
    b = make_run(tmp_path / "long", lengths=(16384,))
    html = write_report([a, b], tmp_path / "compare.html").read_text()
    assert "short and long have no cell in common" in html
    assert "sink 4+252 @ 4,096 (state)" in html and "sink 4+252 @ 16,384 (state)" in html  # both runs' cells
    ratios = html[html.index("<table class='ratios'>"):]
    assert "<td>16,384</td>" in ratios and "<td>4,096</td>" in ratios


# ---- in a real browser -------------------------------------------------------------------------------------------------

def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Put first in <head>: records script errors and console.error calls where --dump-dom will show them.
PROBE = """<script>
window.__errors = [];
const keep = (m) => { window.__errors.push(String(m)); document.documentElement.setAttribute('data-errors',
  JSON.stringify(window.__errors)); };
window.addEventListener('error', (e) => keep(e.message || e));
window.addEventListener('unhandledrejection', (e) => keep(e.reason));
const original = console.error; console.error = (...a) => { keep(a.join(' ')); original(...a); };
window.alert = (m) => keep('alert ran: ' + m);
window.addEventListener('load', () => setTimeout(() =>
  document.documentElement.setAttribute('data-loaded', '1'), 500));
</script>"""


def run_chromium(chromium, page: Path, *extra, timeout=120):
    args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            # networking off: every host resolves to nothing, and any proxy use fails
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
            "--virtual-time-budget=30000", *extra, page.as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def chromium_or_skip():
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("PYSTREAM_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (CI installs it: apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return chromium


def figure_section(dom: str, fig: str) -> str:
    start = dom.index(f'id="{fig}"')
    end = dom.find('<div class="figure', start + 1)
    return dom[start:end if end > 0 else len(dom)]


def y_ticks(section: str) -> dict:
    """The y tick labels Plotly drew, per axis: [(label, height in pixels)]."""
    ticks = {}
    for axis, attrs in re.findall(r'<g class="(y\d*)tick"><text ([^>]*)>', section):
        label = re.search(r'data-unformatted="([^"]*)"', attrs).group(1)
        height = float(re.search(r'translate\([^,]*,\s*([-\d.]+)\)', attrs).group(1))
        ticks.setdefault(axis, []).append((label, round(height, 1)))
    return ticks


@pytest.mark.browser
def test_report_renders_in_a_real_browser(tmp_path):
    chromium = chromium_or_skip()
    run = make_run(tmp_path / "run", model_name=HOSTILE)
    report = write_report([run], tmp_path / "report.html")
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = run_chromium(chromium, probed, "--dump-dom").stdout
    assert 'data-loaded="1"' in dom, "the page did not finish loading"
    errors = re.search(r'data-errors="([^"]*)"', dom)
    assert errors is None, f"console errors: {errors.group(1) if errors else ''}"
    assert "<script>alert(" not in dom  # the hostile model name stayed text (and alert() never ran: see errors)
    for fig in EXPECTED_FIGURES:
        section = figure_section(dom, fig)
        assert 'class="main-svg"' in section, f"{fig} has no SVG"
        points = len(re.findall(r'class="(?:point|js-line)[" ]', section))
        assert points > 0, f"{fig} drew no data points"
    # the latency panels share their y axis: each shows tick labels, the same ones at the same heights (one scale)
    ticks = y_ticks(figure_section(dom, "fig-latency"))
    assert set(ticks) == {"y", "y2"}, f"tick labels drawn on {sorted(ticks)} only"
    assert ticks["y"] == ticks["y2"] and len(ticks["y"]) >= 3
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    result = run_chromium(chromium, report, f"--screenshot={shot}", "--window-size=1400,4800")
    assert result.returncode == 0 and shot.stat().st_size > 50_000


# Only the figures, stacked at a fixed pitch, their legends laid out but not painted (a legend shows its colours
# whether or not the plot does), so that one screenshot at 1400 px holds each figure at a known place.
FIGURE_PITCH = 560
FIGURES_ONLY = """<style>body > :is(h1, h2, p, table, div.runs){display:none !important}
body{margin:0 !important;max-width:none !important} .figure{margin:0 0 40px !important;height:520px !important} .legend{visibility:hidden}</style>"""


def _hex(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)


@pytest.mark.browser
@pytest.mark.parametrize("example", ["fixture", "default-run", "paper-experiment", "context-extension",
                                     "recall-run"])
def test_every_figure_is_drawn_at_1400_px(tmp_path, example):
    """A screenshot of every figure at 1400 px is not blank, and every series colour of a figure shows in it (a
    series drawn exactly under another would not)."""
    chromium = chromium_or_skip()
    image_module = pytest.importorskip("PIL.Image")
    report = write_report(example_runs(tmp_path, example), tmp_path / "report.html")
    figures = figures_of(report.read_text())
    page = tmp_path / "figures.html"
    page.write_text(report.read_text().replace("</head>", FIGURES_ONLY + "</head>", 1))
    shot = tmp_path / "figures.png"
    result = run_chromium(chromium, page, f"--screenshot={shot}", f"--window-size=1400,{FIGURE_PITCH * len(figures)}")
    assert result.returncode == 0, result.stderr[-2000:]
    image = np.asarray(image_module.open(shot).convert("RGB"), dtype=float)
    assert image.shape[1] == 1400
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for k, (name, fig) in enumerate(figures.items()):
        part = image[k * FIGURE_PITCH:k * FIGURE_PITCH + 520]
        image_module.fromarray(part.astype(np.uint8)).save(ARTIFACTS / f"figure-{example.replace('/', '-')}-{name}.png")
        assert part.mean(axis=2).std() > 8, f"{name}: blank"
        colours = {t.get("line", {}).get("color") or t.get("marker", {}).get("color") for t in fig["data"]
                   if t["type"] == "scatter"}
        for colour in sorted(c for c in colours if isinstance(c, str) and c.startswith("#")):
            shown = (abs(part - _hex(colour)).max(axis=2) < 40).sum()
            assert shown >= 20, f"{name}: {colour} shows in {shown} pixels only: a series is hidden"
