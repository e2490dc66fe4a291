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


# ---- validation: what the reader checks of every record, so that the report never meets a wrong type ----
# A field's type: "int", "num" (int or float), "str", "bool", "dict", "list", a tuple of allowed types, a
# ("list", item) or ("dict", value) for containers; "?" in front: null is allowed. Unknown fields (added later
# within a version) and unknown record kinds pass with the common checks.
_INT_LIMIT = 1 << 63
_LATENCY = ("dict", "num")
COMMON_FIELDS = {"method": "?str", "cache_size": "?int", "sinks": "?int", "length": "?int", "mode": "?str",
                 "status": "?str", "error": "?str"}
RECORD_FIELDS = {
    "cell": {"window": "?int", "batch": "?int", "dtype": "?str", "device": "?str", "latency_ms": ("?", _LATENCY),
             "timed_steps": "?int", "warmup_steps": "?int", "tokens_per_s": "?num", "peak_rss_bytes": "?int",
             "peak_rss_exact": "?bool", "cuda_max_allocated_bytes": "?int", "cuda_max_reserved_bytes": "?int",
             "kv_bytes": "?int", "kv_bytes_needed": "?int", "achieved_bandwidth_gb_s": "?num",
             "speedup_vs_recompute": ("?", "num", ("dict", "?num")), "setup_s": "?num", "wall_s": "?num",
             "stream_position": "?int", "evicted": "?int", "frame_base": "?int", "text_cycled": "?bool",
             "profile": "?dict", "rope_scaling": "?dict", "resumed_from_token": "?int",
             # --compile (absent in older runs: eager): whether the timed steps ran compiled, and the compile and
             # warm-up seconds spent before them (not in the latencies)
             "compiled": "?bool", "compile_s": "?num"},
    "quality": {"tokens": "?int", "ppl": "?num", "ppl_ci95": ("?", ("list", "?num")), "sampled": "?bool",
                "sample_size": "?int", "buckets": ("?", ("list", ("dict", None))), "nll": ("?", ("list", "?num")),
                "pretraining_length": "?int", "rope_scaling": "?dict", "experiments": ("?", ("list", "str")),
                "wall_s": "?num"},
    "attention": {"tokens": "?int", "share_first_token": ("?", ("list", ("list", "?num"))), "maps": "?dict"},
}
BUCKET_FIELDS = {"start": "int", "end": "int", "tokens": "int", "ppl": "?num"}
# what an `ok` record must have, for the tables and figures that read it
# (a quality record's `nll` may be null: a stream longer than the paper experiment's `stability_keep_nll` keeps its
# chunk perplexities only)
REQUIRED_OK = {"cell": ("method", "length", "latency_ms", "tokens_per_s"),
               "quality": ("method", "tokens", "buckets")}
LATENCY_KEYS = ("p50", "p90", "p99", "mean", "min", "max")


def _type_ok(value, spec) -> bool:
    if spec is None:
        return True
    if isinstance(spec, str) and spec.startswith("?"):
        return value is None or _type_ok(value, spec[1:])
    if isinstance(spec, tuple) and spec and spec[0] == "?":
        return value is None or any(_type_ok(value, s) for s in spec[1:])
    if isinstance(spec, tuple) and spec[0] in ("list", "dict") and len(spec) == 2:
        if spec[0] == "list":
            return isinstance(value, list) and all(_type_ok(v, spec[1]) for v in value)
        return isinstance(value, dict) and all(_type_ok(v, spec[1]) for v in value.values())
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT
    if spec == "num":
        return ((isinstance(value, int) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT)
                or (isinstance(value, float) and math.isfinite(value)))
    return isinstance(value, {"str": str, "bool": bool, "dict": dict, "list": list}[spec])


def validate_record(rec: dict, where: str) -> None:
    """Refuse a record whose fields have the wrong type, naming the field: ResultsError("FILE:LINE: field ...")."""
    kind = rec.get("record")
    if not isinstance(kind, str):
        raise ResultsError(f"{where}: field 'record' must be a string")
    fields = {**COMMON_FIELDS, **RECORD_FIELDS.get(kind, {})}
    for name, spec in fields.items():
        if name in rec and not _type_ok(rec[name], spec):
            raise ResultsError(f"{where}: field {name!r} has the wrong type or value ({_show(rec[name])})")
    if rec.get("status") == "ok":
        for name in REQUIRED_OK.get(kind, ()):
            if rec.get(name) is None:
                raise ResultsError(f"{where}: field {name!r} is missing from an ok {kind} record")
    latency = rec.get("latency_ms")
    if kind == "cell" and isinstance(latency, dict) and any(k not in latency for k in LATENCY_KEYS):
        raise ResultsError(f"{where}: field 'latency_ms' must have {', '.join(LATENCY_KEYS)}")
    if kind == "quality" and isinstance(rec.get("ppl_ci95"), list) and len(rec["ppl_ci95"]) != 2:
        raise ResultsError(f"{where}: field 'ppl_ci95' must be [low, high]")
    buckets = rec.get("buckets") if kind == "quality" else None  # typed (a list of objects) above
    for bucket in buckets or []:
        for name, spec in BUCKET_FIELDS.items():
            if not _type_ok(bucket.get(name), spec):
                raise ResultsError(f"{where}: field 'buckets.{name}' has the wrong type or value")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
