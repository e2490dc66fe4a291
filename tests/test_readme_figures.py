"""The README's tables are the committed runs': every row of the default run's two tables, of the recall table, of
the paper table (ours beside the paper's, as `pystream.results.paper.paper_table` builds it) and of the stability
streams' table is rebuilt here from
`reports/*/results.jsonl` and must appear in the README as written (a re-run that moves a figure,
or a README edited by hand, fails this test)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _records(run="default-run"):
    return [json.loads(line) for line in (ROOT / "reports" / run / "results.jsonl").read_text().splitlines()]


def _cache_label(method: str, rec: dict) -> str:
    if rec.get("sinks"):
        return f"{method} {rec['sinks']}+{rec['cache_size'] - rec['sinks']}"
    return f"{method} {rec['cache_size']}"


def latency_rows(records) -> list[str]:
    """| method cache | p50 ms, peak MiB @ each length |: the caches of 1,024 slots and dense."""
    cells = {(r["method"], r.get("cache_size"), r["length"]): r for r in records if r["record"] == "cell"}
    lengths = sorted({length for _, _, length in cells})
    rows = []
    for method, capacity in (("sink", 1024), ("window", 1024), ("recompute", 1024), ("dense", None)):
        parts, label = [], None
        for length in lengths:
            rec = cells[(method, capacity, length)]
            label = label or (_cache_label(method, rec) if capacity else method)
            if rec["status"] != "ok":
                parts.append(rec["error"])
                continue
            p50 = rec["latency_ms"]["p50"]
            if method == "recompute":
                sink = cells[("sink", capacity, length)]["latency_ms"]["p50"]
                parts.append(f"{p50:,.0f} ms ({p50 / sink:.1f}x sink)")
            elif method == "dense":
                parts.append(f"{p50:,.1f} ms, {rec['peak_rss_bytes'] / MIB:,.0f} MiB "
                             f"({rec['kv_bytes'] / MIB:,.0f} MiB of KV)")
            else:
                parts.append(f"{p50:,.1f} ms, {rec['peak_rss_bytes'] / MIB:,.0f} MiB")
        rows.append(f"| {label} | " + " | ".join(parts) + " |")
    return rows


def quality_rows(records, capacity=256) -> list[str]:
    """| method cache | PPL @ each length |: quality at each length at the smaller cache, in-cache positions."""
    quality = {(r["method"], r["length"]): r for r in records if r["record"] == "quality"
               and r.get("cache_size") in (capacity, None) and r.get("position_scheme") in ("in-cache", None)}
    lengths = sorted({length for _, length in quality})
    rows = []
    for method in ("sink", "window", "dense", "recompute"):
        parts, label = [], None
        for length in lengths:
            rec = quality[(method, length)]
            label = label or (_cache_label(method, rec) if rec.get("cache_size") else method)
            if rec["status"] != "ok":
                parts.append(rec["error"])
            elif rec.get("ratio") is not None:
                low, high = rec["ratio_ci95"]
                parts.append(f"{rec['ppl']:.2f} (sink / recompute {rec['ratio']:.3f}, 95% CI {low:.3f}-{high:.3f}, "
                             f"{rec['sample_size']} positions)")
            else:
                parts.append(f"{rec['ppl']:.2f}")
        rows.append(f"| {label} | " + " | ".join(parts) + " |")
    return rows


def recall_rows(records) -> list[str]:
    """| method cache | recall at each distance |: the distance probe of reports/recall, blank past a method's
    reach."""
    probe = [r for r in records if r["record"] == "recall" and r.get("probe") == "distance" and r["status"] == "ok"]
    distances = sorted({r["distance"] for r in probe})
    series: dict = {}
    for rec in probe:
        label = rec["method"] if rec.get("cache_size") is None else _cache_label(rec["method"], rec)
        if rec.get("position_scheme") == "original":
            label += ", original positions"
        family = ("dense", "sink", "window", "recompute").index(rec["method"].split("-")[0])
        order = (family, rec.get("cache_size") or 0, rec["method"], rec.get("position_scheme") == "original")
        series.setdefault((order, label), {})[rec["distance"]] = rec["recall"]
    rows = []
    for (_, label), values in sorted(series.items()):
        cells = [label] + [f"{values[d]:.2f}" if d in values else "" for d in distances]
        rows.append("|" + "".join(f" {c} |" if c else " |" for c in cells))
    return rows


def paper_rows(records) -> list[str]:
    """| finding | our setting | ours | paper | paper's setting |: the paper experiment's table, as the CLI prints it."""
    from pystream.results.paper import paper_table

    rows = []
    for row in paper_table(records):
        digits = row.get("digits", 2)
        paper = "–" if row["paper"] is None else f"{row['paper']:.{digits}f}"
        rows.append(f"| {row['finding']} | {row['setting']} | {row['ours']:.{digits}f} | {paper} | "
                    f"{row['paper_setting']} |")
    return rows


def stability_rows(runs) -> list[str]:
    """| run | dtype | stream | PPL | per chunk | timed |: each committed run's stability stream (part 5 of the paper
    experiment), its wall time over the tokens it fed itself (`timed_from_token` on)."""
    rows = []
    for run in runs:
        meta = json.loads((ROOT / "reports" / run / "run.json").read_text())
        (rec,) = [r for r in _records(run) if r["record"] == "quality" and "stability" in (r.get("experiments") or [])]
        chunks = [b["ppl"] for b in rec["buckets"]]
        rows.append(f"| `reports/{run}` | {meta['config']['dtype']} | {rec['length']:,} | {rec['ppl']:.2f} | "
                    f"{min(chunks):.2f} to {max(chunks):.2f} | {rec['tokens_fed']:,} tokens in "
                    f"{rec['wall_s'] / 60:.1f} min, {rec['tokens_fed'] / rec['wall_s']:,.0f} tokens/s |")
    return rows


TABLES = {"latency": ("default-run", latency_rows), "quality": ("default-run", quality_rows),
          "recall": ("recall", recall_rows), "paper": ("paper-experiment", paper_rows),
          "stability": (("stability-fp32", "paper-experiment", "stability-4m"), stability_rows)}


@pytest.mark.parametrize("table", TABLES)
def test_readme_tables_are_the_committed_runs(table):
    run, rows = TABLES[table]
    readme = (ROOT / "README.md").read_text()
    missing = [row for row in (rows(run) if isinstance(run, tuple) else rows(_records(run))) if row not in readme]
    assert not missing, f"README rows that differ from reports/{run} (rebuilt from its results):\n" + "\n".join(missing)


def test_the_check_sees_a_moved_figure():
    records = _records()
    before = latency_rows(records)
    for rec in records:
        if rec["record"] == "cell" and rec["method"] == "sink" and rec.get("cache_size") == 1024:
            rec["latency_ms"]["p50"] *= 1.01
    assert latency_rows(records) != before

