"""Killed and concurrent runs, damaged results files: pystream-bench loses nothing and says what is wrong."""

import json
import os
import signal
import subprocess
import sys
import time

from pystream.results import read_results
from conftest import run_cli

SLOW_ARGS = ["--methods", "sink,window", "--lengths", "100,200,300", "--cache-sizes", "32", "--steps", "1500",
             "--warmup", "1", "--ppl-tokens", "0", "--no-report"]


def bench_command(model_dir, text, out, *extra):
    return [sys.executable, "-m", "pystream.cli", "--model", str(model_dir), "--text", str(text), "--out", str(out),
            *SLOW_ARGS, *extra]


def start(model_dir, text, out, *extra):
    cmd = bench_command(model_dir, text, out, *extra)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it: give the run the
    # default disposition, as a terminal would, whatever started this test.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_records(out, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "results.jsonl"
        if path.exists() and len(path.read_bytes().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no records appeared")


def keys(records):
    return [(r["method"], r["cache_size"], r["length"], r["mode"]) for r in records]


def test_sigkill_mid_cell_then_resume(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, text_file, out)
    wait_for_records(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records, _ = read_results(out / "results.jsonl")  # still parses
    assert 2 <= len(records) < 6
    finished = (out / "results.jsonl").read_bytes()
    for rec in records:
        assert rec["status"] == "ok" and rec["timed_steps"] == 1500  # every finished cell is whole
    code = subprocess.run(bench_command(tiny_model_dir, text_file, out, "--resume"), capture_output=True,
                          text=True).returncode
    assert code == 0
    after, _ = read_results(out / "results.jsonl")
    assert len(after) == 6 and len(set(keys(after))) == 6  # completed, nothing repeated
    assert (out / "results.jsonl").read_bytes().startswith(finished)  # finished cells untouched


def test_ctrl_c_ends_cleanly_with_a_resume_hint(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, text_file, out)
    wait_for_records(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" in stderr and str(out) in stderr.replace("\n", "")
    records, _ = read_results(out / "results.jsonl")
    assert records and all(r["status"] == "ok" for r in records)


def test_a_second_run_on_the_same_directory_refuses(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, text_file, out)
    try:
        wait_for_records(out, 1, proc)
        second = subprocess.run(bench_command(tiny_model_dir, text_file, out, "--resume"), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert "another pystream-bench run is writing here" in second.stderr
        third = subprocess.run(bench_command(tiny_model_dir, text_file, out), capture_output=True, text=True,
                               timeout=120)
        assert third.returncode == 2 and "already holds files" in third.stderr
    finally:
        proc.kill()
        proc.wait()


def test_damaged_results_file(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--model", tiny_model_dir, "--text", text_file, "--out", out, "--methods", "sink", "--lengths", "64,128",
            "--cache-sizes", "32", "--steps", "2", "--ppl-tokens", "0", "--no-report"]
    assert run_cli(fast, capsys)[0] == 0
    path = out / "results.jsonl"
    good = path.read_text()
    # a torn last line (a kill in the middle of a write) is dropped on resume
    path.write_text(good + '{"schema": "pystream.results", "schema_vers')
    assert run_cli([*fast, "--resume"], capsys)[0] == 0
    assert path.read_text() == good
    # a line edited by hand into invalid JSON is reported with the file and line, exit 2
    lines = good.splitlines()
    path.write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    code, _, stderr = run_cli([*fast, "--resume"], capsys)
    assert code == 2 and f"{path}:1: invalid JSON" in stderr and stderr.count("\n") == 1
    from pystream.report import main as report_main

    assert report_main([str(out)]) == 2
    assert f"{path}:1: invalid JSON" in capsys.readouterr().err
    # a results file from a newer schema version
    newer = json.loads(lines[0])
    newer["schema_version"] = 99
    path.write_text(json.dumps(newer) + "\n")
    code, _, stderr = run_cli([*fast, "--resume"], capsys)
    assert code == 2 and "newer pystream (schema_version 99" in stderr


def test_an_unwritable_cache_directory_does_not_stop_a_run(tiny_model_dir, text_file, tmp_path, capsys,
                                                           monkeypatch):
    """The token cache only saves time: with $PYSTREAM_CACHE unusable the run still completes."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("PYSTREAM_CACHE", str(blocker))
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--text", text_file, "--out", out, "--methods", "sink", "--lengths", "64",
            "--cache-sizes", "16", "--steps", "2", "--warmup", "1", "--ppl-tokens", "0", "--no-report"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert len(read_results(out / "results.jsonl")[0]) == 1


# ---- a full disk: every record is whole or absent, the run says so and resumes (issue 16, item 2) ----

def limit_file_size(size_bytes):
    """For a child process: files may not grow past `size_bytes` (RLIMIT_FSIZE, no privileges needed), and the
    signal the kernel sends at the limit is ignored, so that the write fails with EFBIG as on a full disk."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, resource.RLIM_INFINITY))

    return apply


WRITER_SCRIPT = r"""
import json, os, resource, signal, sys
from pathlib import Path
from pystream.results import RunWriter, ResultsWriteError, SCHEMA, SCHEMA_VERSION, read_results

out = Path(sys.argv[1])
writer = RunWriter(out, {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "config": {}}, resume=False)
cell = {"record": "cell", "method": "sink", "cache_size": 32, "sinks": 4, "length": 0, "mode": "state",
        "status": "oom", "error": "x" * 700}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))  # room for two records, not three
written = 0
try:
    for length in range(1, 10):
        writer.append(dict(cell, length=length))
        written += 1
except ResultsWriteError as err:
    print("refused:", err)
size_after_failure = (out / "results.jsonl").stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space came back
writer.append(dict(cell, length=100))
writer.close()
records, valid = read_results(out / "results.jsonl")
data = (out / "results.jsonl").read_bytes()
print(json.dumps({"written": written, "size_after_failure": size_after_failure, "valid": valid,
                  "two_records": sum(len(line) + 1 for line in data.splitlines()[:2]),
                  "size": (out / "results.jsonl").stat().st_size, "lengths": [r["length"] for r in records]}))
"""


def test_a_write_that_fails_leaves_whole_records_and_the_next_one_starts_on_a_boundary(tmp_path):
    result = subprocess.run([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path / "run")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "cannot write a record (File too large)" in result.stdout
    facts = json.loads(result.stdout.splitlines()[-1])
    assert facts["written"] == 2
    assert facts["size_after_failure"] == facts["two_records"]  # cut back to two whole records, nothing of the third
    assert facts["valid"] == facts["size"]  # every byte is part of a whole record
    assert facts["lengths"] == [1, 2, 100]  # the record written after space came back stands on its own line


def test_a_partial_write_is_completed(tmp_path, monkeypatch):
    """`os.write` may write fewer bytes than asked: the writer goes on until the record is whole."""
    from pystream.results import SCHEMA, SCHEMA_VERSION, RunWriter
    from pystream.results import store

    real_write = os.write
    monkeypatch.setattr(store.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # 7 bytes at a time
    writer = RunWriter(tmp_path / "run", {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}, resume=False)
    writer.append({"record": "cell", "method": "sink", "cache_size": 32, "sinks": 4, "length": 64, "mode": "state",
                   "status": "oom", "error": "a long enough message " * 5})
    writer.close()
    records, valid = read_results(tmp_path / "run" / "results.jsonl")
    assert len(records) == 1 and records[0]["error"].startswith("a long enough")
    assert valid == (tmp_path / "run" / "results.jsonl").stat().st_size


def test_a_full_disk_ends_the_run_with_one_line_and_resume_completes_it(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    cmd = bench_command(tiny_model_dir, text_file, out)
    cmd[cmd.index("--steps") + 1] = "2"
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(4000))
    assert full.returncode == 1, full.stderr
    errors = [line for line in full.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot write a record (File too large)" in errors[0], full.stderr
    assert "--resume" in errors[0] and "Traceback" not in full.stderr and "complete" not in full.stderr
    data = (out / "results.jsonl").read_bytes()
    records, valid = read_results(out / "results.jsonl")
    assert valid == len(data) and data.endswith(b"\n") and 1 <= len(records) < 6  # whole records only
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    after, _ = read_results(out / "results.jsonl")
    assert len(after) == 6 and len(set(keys(after))) == 6
    assert (out / "results.jsonl").read_bytes().startswith(data)


def test_sigterm_is_handled_as_ctrl_c(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_model_dir, text_file, out)
    wait_for_records(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "Traceback" not in stderr
    assert "interrupted (SIGTERM)" in stderr and "--resume" in stderr and str(out) in stderr.replace("\n", "")
    assert not (out / ".lock").exists()
    records, _ = read_results(out / "results.jsonl")
    assert records and all(r["status"] == "ok" for r in records)


# ---- special files: refused before anything is read, never a hang (item 3) ----

def test_special_files_are_refused_with_one_line(tiny_model_dir, text_file, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model_with_fifo = tmp_path / "model-with-fifo"
    model_with_fifo.mkdir()
    for item in tiny_model_dir.iterdir():
        (model_with_fifo / item.name).symlink_to(item)
    os.mkfifo(model_with_fifo / "tokenizer_config.json.fifo")
    cases = [(["--text", fifo], "is a FIFO, not a regular file"),
             (["--text", "/dev/zero"], "is a device, not a regular file"),
             (["--text", tmp_path], "is a directory, not a file"),
             (["--model", model_with_fifo], "is not a regular file")]
    for extra, message in cases:
        out = tmp_path / "run"
        args = ["--model", tiny_model_dir, "--text", text_file, "--out", out, "--lengths", "64", *map(str, extra)]
        # a subprocess with a timeout: a regression would block on the FIFO, not hang the test run
        result = subprocess.run([sys.executable, "-m", "pystream.cli", *map(str, args)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, (extra, result.stderr)
        assert not out.exists()


def test_a_text_larger_than_the_limit_is_refused_before_reading(text_file, monkeypatch):
    from pystream.inputs import texts

    monkeypatch.setattr(texts, "MAX_TEXT_BYTES", 100)
    import pytest

    with pytest.raises(texts.TextError, match=r"bytes, more than the 100 read at most"):
        texts.load_text(str(text_file))


def test_a_results_file_that_is_a_fifo_is_refused(tmp_path, capsys):
    from pystream.report import main as report_main
    from pystream.results import SCHEMA, SCHEMA_VERSION

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION}))
    os.mkfifo(run / "results.jsonl")
    assert report_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "results.jsonl: is a FIFO, not a regular file" in err and err.strip().count("\n") == 0


def test_a_truncated_model_file_is_a_model_error(tiny_model_dir, text_file, tmp_path, capsys):
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "run"
    code, _, stderr = run_cli(["--model", broken, "--text", text_file, "--out", out, "--lengths", "64"], capsys)
    assert code == 2 and stderr.startswith("pystream-bench: error: --model: could not load") , stderr
    assert stderr.strip().count("\n") == 0 and not out.exists()


# ---- every number bounded before anything is created; allocator failures are oom records (item 4) ----

import pytest  # noqa: E402

BOUNDS = [
    (["--lengths", "99999999999999999999999"], "--lengths: '99999999999999999999999' is more than"),
    (["--lengths", "9" * 5000], "is not a size"),
    (["--cache-sizes", "100000000000"], "--cache-sizes: '100000000000' is more than"),
    (["--ppl-cache", "100000000000"], "--ppl-cache must be >= 1 and <="),
    (["--batch", "100000"], "--batch must be >= 1 and <= 4,096"),
    (["--steps", "10000000000"], "--steps must be"),
    (["--warmup", "10000000000"], "--warmup must be"),
    (["--threads", "100000"], "--threads must be"),
    (["--sinks", "100000000000"], "--sinks must be"),
    (["--seed", "-1"], "--seed must be"),
    (["--seed", str(1 << 70)], "--seed must be"),
    (["--recompute-samples", "10000000000"], "--recompute-samples must be"),
    (["--profile-steps", "10000000000"], "--profile-steps must be"),
    (["--ppl-tokens", "99999999999999999999"], "--ppl-tokens must be"),
    (["--methods", "dense-pi:1e9"], "--methods: unknown method"),
    (["--methods", "dense-pi:99999999999"], "the scaling factor must be >= 1 and <= 1024"),
    (["--experiment", "paper", "--experiment-tokens", "99999999999999999999"], "--experiment-tokens:"),
    (["--experiment", "paper", "--experiment-cache", "100000000000"], "--experiment-cache must be"),
    (["--experiment", "paper", "--stability-tokens", "99999999999999999999"], "--stability-tokens:"),
]


@pytest.mark.parametrize("args, message", BOUNDS, ids=[" ".join(a)[:40] for a, _ in BOUNDS])
def test_numbers_past_their_bound_are_refused_before_anything_is_created(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_cli([*args, "--out", out], capsys)
    assert code == 2 and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and not out.exists()


def test_an_allocator_failure_is_an_oom_record(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    """torch's CPU allocator raises a plain RuntimeError; the cell and the quality pass record it as oom and the
    run goes on."""
    import torch

    from pystream.measure import cells, quality_at

    def huge(*args, **kwargs):
        return torch.empty(1 << 50)  # a real allocator failure, not a stand-in exception

    monkeypatch.setattr(cells, "streaming_cache", huge)  # the cell's cache
    monkeypatch.setattr(quality_at, "stream_nll", huge)  # the quality pass's evaluator
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--text", text_file, "--out", out, "--methods", "window,dense", "--lengths",
            "64", "--cache-sizes", "32", "--steps", "2", "--warmup", "1", "--ppl-tokens", "40", "--no-report"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    from conftest import read_records

    by = {(r["record"], r["method"]): r for r in read_records(out)}
    for key in (("cell", "window"), ("quality", "window")):
        assert by[key]["status"] == "oom" and "can't allocate memory" in by[key]["error"], by[key]
    assert by[("cell", "dense")]["status"] == "ok" and by[("quality", "dense")]["status"] == "ok"


def test_a_streaming_cache_that_would_not_fit_is_predicted(tiny_model_dir, text_file, tmp_path, capsys,
                                                           monkeypatch):
    from pystream.measure import clocks

    monkeypatch.setattr(clocks, "available_bytes", lambda device: 64 * 1024**2)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--text", text_file, "--out", out, "--methods", "sink", "--lengths",
            "64", "--cache-sizes", "4M", "--steps", "2", "--warmup", "1", "--ppl-tokens", "0", "--no-report"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    from conftest import read_records

    (cell,) = read_records(out)
    assert cell["status"] == "oom" and cell["error"].startswith("OOM: needs") and cell["kv_bytes_needed"] > 2**31


def test_a_perplexity_that_overflows_is_infinite_and_stored_as_null():
    import math

    import numpy as np

    from pystream.measure.quality import perplexity, sampled_perplexity, summarise
    from pystream.results import record

    nll = np.array([800.0, 790.0, np.nan])
    assert perplexity(nll) == math.inf and sampled_perplexity(nll)[0] == math.inf
    stored = record("quality", **summarise(nll, sampled=False, bucket_tokens=2))
    assert stored["ppl"] is None and stored["buckets"][0]["ppl"] is None


# ---- checkpoints: no empty folder left; a resumed cell says what its times cover (item 6) ----

def test_stream_checkpoints_leave_no_folder_and_a_resumed_cell_says_so(tmp_path):
    import numpy as np

    from conftest import InterruptAfter, tiny_model
    from pystream.measure.runner import Bench, BenchConfig

    model = tiny_model("llama")
    ids = np.arange(3, 120, dtype=np.int32)
    cfg = BenchConfig(lengths=(200,), methods=("sink",), cache_sizes=(32,), mode="stream", steps=2, warmup=1,
                      ppl_tokens=0, checkpoint_every_s=0.0)  # a checkpoint after every forward
    with pytest.raises(KeyboardInterrupt):
        Bench(cfg, model, ids, InterruptAfter(steps=100), run_dir=tmp_path).run_cell("sink", 32, 200, [])
    assert list((tmp_path / "checkpoints").iterdir())  # the interrupted stream left its checkpoint
    rec = Bench(cfg, model, ids, InterruptAfter(), run_dir=tmp_path).run_cell("sink", 32, 200, [])
    assert rec["status"] == "ok" and rec["stream_position"] == 200
    assert 0 < rec["resumed_from_token"] < 200  # wall_s / setup_s cover only the tokens after it
    assert not (tmp_path / "checkpoints").exists()  # the checkpoint and its folder are gone
    fresh = Bench(cfg, model, ids, InterruptAfter(), run_dir=tmp_path).run_cell("sink", 32, 200, [])
    assert "resumed_from_token" not in fresh and not (tmp_path / "checkpoints").exists()


def test_a_cache_ablation_record_without_a_capacity_does_not_crash_the_report(tmp_path):
    """A record the reader accepts (cache_size may be null) must render: the cache-size figure skips it."""
    import json

    from pystream.report import main as report_main
    from pystream.results import RESULTS, record
    from pystream.results.store import META

    run = tmp_path / "run"
    run.mkdir()
    (run / META).write_text(json.dumps({"schema": "pystream.results", "schema_version": 1}))
    recs = [record("quality", method="sink", cache_size=size, sinks=4, tokens=64, status="ok", ppl=5.0 + i,
                   experiments=["cache"], buckets=[], nll=[]) for i, size in enumerate((None, 256, 512))]
    (run / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert report_main([str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").exists()
