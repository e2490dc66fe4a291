"""The tables printed at the end of a run (rich), from the records alone."""

from __future__ import annotations

from rich import box
from rich.table import Table

from .schema import cache_label, peak_bytes

MIB = 1024**2


def _fmt(value, spec="{:,.1f}"):
    return "-" if value is None else spec.format(value)


def _ppl(value) -> str:
    """A finished record's perplexity; null is one that overflowed (JSON has no infinity)."""
    return "inf (overflowed)" if value is None else f"{value:.3f}"


def latency_unit(cells: list[dict]) -> str:
    """What one latency sample times: a decode step produces one token per stream, so with batch 1 it is the time
    per token and with a larger batch it is the time per step (batch tokens)."""
    return "token" if all((c.get("batch") or 1) == 1 for c in cells) else "step"


def _table(title: str, columns: tuple, text_columns: tuple, caption: str | None = None) -> Table:
    # No cell wraps: a wrapped number or message reads as several rows. Long messages go in the caption instead.
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                  collapse_padding=True, show_edge=False)
    for name in columns:
        table.add_column(name, justify="left" if name in text_columns else "right", no_wrap=True)
    return table


def cells_table(records: list[dict]) -> Table:
    cells = [r for r in records if r.get("record") == "cell"]
    per = latency_unit(cells)
    batched = per == "step"
    failed = [c for c in cells if c.get("status") != "ok"]
    caption = "\n".join(f"{c['method']} @ {c['length']:,}: {c.get('error') or c.get('status')}" for c in failed)
    title = ("decode latency per token (batch 1: a step decodes one token)" if not batched else
             "decode latency per step (a step decodes one token in each of the batch's streams; tok/s counts them "
             "all)")
    columns = ("method", "cache", "length", "mode") + (("batch",) if batched else ()) + (
        "p50 ms", "p90 ms", "p99 ms", "tok/s", "peak MiB", "KV MiB", "x recompute")
    table = _table(title, columns, ("method", "mode"), caption or None)
    for rec in cells:
        cache = cache_label(rec) or "-"
        first = [rec["method"], cache, f"{rec['length']:,}", rec.get("mode", "")] + (
            [str(rec.get("batch") or 1)] if batched else [])
        if rec.get("status") != "ok":
            # the message is in the caption: in a column it would wrap over several lines
            table.add_row(*first, f"[red]{str(rec.get('status', '')).upper() or 'failed'}[/red]", "-", "-", "-",
                          "-", "-", "-")
            continue
        lat = rec["latency_ms"]
        speedup = rec.get("speedup_vs_recompute")
        if isinstance(speedup, dict):
            speedup = " ".join(f"{v:.1f}@{k}" for k, v in sorted(speedup.items(), key=lambda kv: int(kv[0])))
        elif speedup is not None:
            speedup = f"{speedup:.1f}"
        peak = peak_bytes(rec)
        table.add_row(*first, _fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(rec.get("tokens_per_s")),
                      _fmt(peak / MIB if peak else None, "{:,.0f}"), _fmt(rec.get("kv_bytes", 0) / MIB),
                      speedup or "-")
    return table


def quality_range_text(rec: dict) -> str:
    """The predicted tokens a quality record covers, 0-based half-open; records without `start` (before quality at
    a length existed) covered the text's first `tokens` tokens, predicting 1..tokens-1."""
    if rec.get("start") is None:
        return f"1-{rec.get('tokens') or 0:,}"
    return f"{rec['start']:,}-{rec['end']:,}"


def ratio_text(rec: dict) -> str:
    """The paired ratio of a recompute record: "sink / recompute 1.023 (0.991-1.056)"."""
    if rec.get("ratio") is None:
        return ""
    ci = rec.get("ratio_ci95")
    interval = f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    return f"{rec.get('ratio_to')} / recompute {rec['ratio']:.3f}{interval}"


def quality_note(rec: dict) -> str:
    note = f"sampled at {rec['sample_size']:,} positions" if rec.get("sampled") else "every token"
    if rec.get("evaluator") == "token-by-token":
        note += ", token by token"
    return note


def quality_table(records: list[dict]) -> Table:
    recs = [r for r in records if r.get("record") == "quality"]
    at_length = any(r.get("start") is not None for r in recs)
    title = ("quality: perplexity of the tokens [start, end) ending at each stream length" if at_length else
             "quality: perplexity over the first tokens of the text")
    columns = ("method", "cache", "length", "tokens", "positions", "PPL", "95% CI", "paired ratio", "note")
    failed = [r for r in recs if r.get("status") != "ok"]
    caption = "\n".join(f"{r['method']} @ {r['length']:,}: {r.get('error') or r.get('status')}" for r in failed
                        if r.get("length") is not None)
    table = _table(title, columns, ("method", "positions", "paired ratio", "note"), caption or None)
    for rec in recs:
        cache = cache_label(rec) or "-"
        length = f"{rec['length']:,}" if rec.get("start") is not None else "-"
        first = [rec["method"], cache, length, quality_range_text(rec), rec.get("position_scheme") or "-"]
        if rec.get("status") != "ok":
            # the message is in the caption, as in the cells' table
            table.add_row(*first, f"[red]{str(rec.get('status', '')).upper() or 'failed'}[/red]", "-", "-", "-")
            continue
        ci = rec.get("ppl_ci95")
        table.add_row(*first, _ppl(rec["ppl"]), f"{_ppl(ci[0])}-{_ppl(ci[1])}" if ci else "-",
                      ratio_text(rec) or "-", quality_note(rec))
    return table


def print_summary(records: list[dict], console) -> None:
    if any(r.get("record") == "cell" for r in records):
        console.print(cells_table(records))
    if any(r.get("record") == "quality" for r in records):
        console.print(quality_table(records))
