"""The tables printed at the end of a run (rich), from the records alone."""

from __future__ import annotations

from rich.table import Table

from .schema import cache_label, peak_bytes

MIB = 1024**2


def _fmt(value, spec="{:,.1f}"):
    return "-" if value is None else spec.format(value)


def _table(title: str, columns: tuple, text_columns: tuple) -> Table:
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, justify="left" if name in text_columns else "right")
    return table


def cells_table(records: list[dict]) -> Table:
    table = _table("decode per token", ("method", "cache", "length", "mode", "p50 ms", "p90 ms", "p99 ms", "tok/s",
                                        "peak RSS MiB", "KV MiB", "x recompute"), ("method", "mode"))
    for rec in (r for r in records if r.get("record") == "cell"):
        cache = cache_label(rec) or "-"
        if rec.get("status") != "ok":
            table.add_row(rec["method"], cache, f"{rec['length']:,}", rec.get("mode", ""),
                          f"[red]{rec.get('error', rec.get('status'))}[/red]", "", "", "", "", "", "")
            continue
        lat = rec["latency_ms"]
        speedup = rec.get("speedup_vs_recompute")
        if isinstance(speedup, dict):
            speedup = ", ".join(f"{v:.1f}@{k}" for k, v in sorted(speedup.items(), key=lambda kv: int(kv[0])))
        elif speedup is not None:
            speedup = f"{speedup:.1f}"
        peak = peak_bytes(rec)
        table.add_row(rec["method"], cache, f"{rec['length']:,}", rec.get("mode", ""), _fmt(lat["p50"]),
                      _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(rec.get("tokens_per_s")),
                      _fmt(peak / MIB if peak else None, "{:,.0f}"), _fmt(rec.get("kv_bytes", 0) / MIB),
                      speedup or "-")
    return table


def quality_table(records: list[dict]) -> Table:
    table = _table("quality: perplexity over the first tokens of the text",
                   ("method", "cache", "tokens", "PPL", "95% CI", "note"), ("method", "note"))
    for rec in (r for r in records if r.get("record") == "quality"):
        cache = cache_label(rec) or "-"
        if rec.get("status") != "ok":
            table.add_row(rec["method"], cache, f"{rec['length']:,}", "-", "-", rec.get("error", ""))
            continue
        ci = rec.get("ppl_ci95")
        note = f"sampled at {rec['sample_size']} positions" if rec.get("sampled") else "every token"
        table.add_row(rec["method"], cache, f"{rec['tokens']:,}", _fmt(rec["ppl"], "{:.3f}"),
                      f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-", note)
    return table


def print_summary(records: list[dict], console) -> None:
    if any(r.get("record") == "cell" for r in records):
        console.print(cells_table(records))
    if any(r.get("record") == "quality" for r in records):
        console.print(quality_table(records))
