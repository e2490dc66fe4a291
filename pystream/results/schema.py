"""The results schema: what a record is, what identifies it, and how the report labels it. Plain Python (no torch):
the report and anything reading old runs depend on this alone."""

from __future__ import annotations

import math

SCHEMA = "pystream.results"
SCHEMA_VERSION = 1


class ResultsError(Exception):
    """A results file or run directory cannot be used; the message names the file and the problem."""


def _clean(value):
    """JSON has no NaN or infinity: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def record(kind: str, **fields) -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "record": kind, **_clean(fields)}


def cache_label(rec: dict) -> str:
    """How a record's cache reads: "4+1020" with sinks, "1024" without, "" when it has none (dense)."""
    if rec.get("cache_size") is None:
        return ""
    if rec.get("sinks"):
        return f"{rec['sinks']}+{rec['cache_size'] - rec['sinks']}"
    return str(rec["cache_size"])


def record_key(rec: dict) -> tuple:
    """What identifies a record across a resume: its kind, method, capacity (`cache_size`), stream length, mode,
    sinks and position scheme (quality at a length: "in-cache" or "original"; None where a record has none, as every
    record before the scheme existed). The one definition: the drivers ask `RunWriter.done` with the first fields of
    the record they would write, so the two always agree."""
    return (rec.get("record"), rec.get("method"), rec.get("cache_size"), rec.get("length"), rec.get("mode"),
            rec.get("sinks") or 0, rec.get("position_scheme"))


def check_version(rec: dict, where: str) -> None:
    if rec.get("schema") != SCHEMA:
        raise ResultsError(f"{where}: not a pystream results record (schema {rec.get('schema')!r})")
    version = rec.get("schema_version")
    if not isinstance(version, int):
        raise ResultsError(f"{where}: record has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise ResultsError(f"{where}: written by a newer pystream (schema_version {version}, this one reads up to "
                           f"{SCHEMA_VERSION}); upgrade pystream")


def peak_bytes(rec: dict) -> int | None:
    """A cell's peak memory: torch's max allocated on a GPU, the process's peak RSS on the CPU."""
    return rec.get("cuda_max_allocated_bytes") or rec.get("peak_rss_bytes")
