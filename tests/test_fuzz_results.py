"""Fuzzing the results reader (issue 16): generated records and byte-level corruptions of a real results.jsonl
either load or are refused with a one-line ResultsError naming the file and line; never a traceback. Whatever loads,
the report renders."""

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from pystream.results import SCHEMA, SCHEMA_VERSION, ResultsError, read_results

REAL = [
    {"schema": SCHEMA, "schema_version": 1, "record": "cell", "method": "sink", "cache_size": 32, "length": 64,
     "mode": "state", "sinks": 4, "batch": 1, "window": 28, "dtype": "float32", "device": "cpu",
     "text_cycled": False, "status": "ok", "latency_ms": {"p50": 1.0, "p90": 1.2, "p99": 1.3, "mean": 1.1,
                                                          "min": 0.9, "max": 1.4},
     "timed_steps": 2, "warmup_steps": 1, "tokens_per_s": 900.0, "achieved_bandwidth_gb_s": 0.5, "wall_s": 0.2,
     "peak_rss_bytes": 10**9, "peak_rss_exact": True, "kv_bytes": 4096, "setup_s": 0.1, "stream_position": 64,
     "frame_base": 0, "evicted": 32, "speedup_vs_recompute": None},
    {"schema": SCHEMA, "schema_version": 1, "record": "cell", "method": "dense", "cache_size": None, "length": 64,
     "mode": "state", "sinks": 0, "status": "oom", "error": "OOM: needs 1.0 GiB"},
    {"schema": SCHEMA, "schema_version": 1, "record": "quality", "method": "sink", "cache_size": 32, "length": 40,
     "mode": "quality", "sinks": 4, "status": "ok", "tokens": 40, "sampled": False, "sample_size": None,
     "wall_s": 0.3, "ppl": None, "ppl_ci95": None, "buckets": [{"start": 1, "end": 40, "tokens": 39, "ppl": None}],
     "nll": [1.0, None, 2.5], "pretraining_length": 64},
]
REAL_BYTES = b"".join(json.dumps(r).encode() + b"\n" for r in REAL)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
FIELDS = sorted({k for r in REAL for k in r} | {"ppl_ci95", "profile", "experiments", "rope_scaling", "maps"})


def check(data: bytes, tmp_path, render=False):
    """Load `data` as a run's results; whatever loads is rendered by pystream-report's own writer."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(data)
    try:
        records, valid = read_results(path)
    except ResultsError as err:
        message = str(err)
        assert message.startswith(str(path)) and "\n" not in message, message
        return
    assert 0 <= valid <= len(data)
    if render:
        from pystream.report import write_report

        (tmp_path / "run.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION}))
        write_report([tmp_path], tmp_path / "report.html")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_generated_records_load_or_are_refused_in_one_line(tmp_path, data):
    rec = dict(data.draw(st.sampled_from(REAL)))
    for name in data.draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        if data.draw(st.booleans()):
            rec[name] = data.draw(json_values)
        else:
            rec.pop(name, None)
    check(json.dumps(rec).encode() + b"\n", tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(REAL_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(REAL_BYTES)))
def test_byte_corruptions_load_or_are_refused_in_one_line(tmp_path, flips, cut):
    data = bytearray(REAL_BYTES[:cut] if cut % 3 == 0 else REAL_BYTES)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    check(bytes(data), tmp_path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_whatever_loads_renders(tmp_path, data):
    recs = []
    for base in REAL:
        rec = dict(base)
        for name in data.draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
            rec[name] = data.draw(json_values)
        recs.append(rec)
    check(b"".join(json.dumps(r).encode() + b"\n" for r in recs), tmp_path, render=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_nested_fields_the_report_reads_render(tmp_path, data):
    """The nested fields the report looks into (a cell's profile breakdown, a quality record's experiments), filled
    with any JSON: what loads renders (CI's fuzz run once found a profile without its breakdown crashing the report)."""
    from pystream.report.html import PROFILE_PARTS

    cell, _, quality = (dict(r) for r in REAL)
    parts = st.sampled_from([key for key, _, _ in PROFILE_PARTS]) | st.text(max_size=5)
    cell["profile"] = data.draw(st.dictionaries(st.just("ms_per_step") | st.text(max_size=5),
                                                st.dictionaries(parts, json_values, max_size=4) | json_values,
                                                max_size=2))
    quality["experiments"] = data.draw(json_values | st.lists(st.sampled_from(["ppl", "stability", "x"])))
    check(b"".join(json.dumps(r).encode() + b"\n" for r in (cell, quality)), tmp_path, render=True)
