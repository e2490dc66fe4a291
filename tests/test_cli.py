"""pystream-bench end to end at tiny sizes (a tiny random model written to a temporary folder, a short text), and
every kind of bad input: one line, exit code 2, no traceback, no run directory."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import TEXT, char_tokenizer, read_records, run_cli, save_tiny_model, tiny_args, tiny_model

def test_end_to_end_on_a_tiny_model(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(tiny_args(tiny_model_dir, text_file, out, "--recompute-steps", "3"), capsys)
    assert code == 0, stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["schema_version"] == 1 and meta["config"]["lengths"] == [100, 1024]
    assert meta["model"]["kind"] == "folder" and meta["model"]["layers"] == 2
    assert meta["versions"]["torch"] == torch.__version__ and meta["device"]["threads"] == 1
    assert meta["command"].startswith("pystream-bench --model ") and "--lengths 100,1k" in meta["command"]
    records = read_records(out)
    cells = [r for r in records if r["record"] == "cell"]
    # recompute, sink, window at 2 cache sizes, and dense, at 2 lengths
    assert len(cells) == 2 * (3 * 2 + 1)
    for cell in cells:
        assert cell["status"] == "ok", cell
        # recompute times --recompute-steps of its own (each step a whole forward), after one warm-up step
        steps, warmup = (3, 1) if cell["method"] == "recompute" else (4, 1)
        assert (cell["timed_steps"], cell["warmup_steps"]) == (steps, warmup)
        assert cell["latency_ms"]["p50"] > 0 and cell["tokens_per_s"] > 0
        assert cell["latency_ms"]["p50"] <= cell["latency_ms"]["p90"] <= cell["latency_ms"]["p99"]
        assert cell["peak_rss_bytes"] > 0
    by = {(c["method"], c["cache_size"], c["length"]): c for c in cells}
    sink = by[("sink", 32, 1024)]
    assert (sink["sinks"], sink["window"]) == (4, 28)
    assert sink["stream_position"] == 1024 and sink["mode"] == "state"
    assert len(TEXT) < 1024  # one token per character: the 1k stream reads the text more than once...
    assert sink["text_cycled"] is True  # ...and says so
    assert by[("sink", 32, 100)]["text_cycled"] is False
    # KV bytes: 2 layers x (keys + values) x 2 kv heads x 32 slots x 16 features x 4 bytes, plus sink copies and
    # re-base scratch
    assert sink["kv_bytes"] == 2 * (2 * 2 * 32 * 16 * 4 + 2 * 2 * 4 * 16 * 4 + 2 * 28 * 8 * 4)
    assert by[("dense", None, 1024)]["kv_bytes"] == 2 * 2 * 2 * 1024 * 16 * 4
    recompute_p50 = by[("recompute", 16, 100)]["latency_ms"]["p50"]
    sink16 = by[("sink", 16, 100)]
    assert sink16["speedup_vs_recompute"] == pytest.approx(recompute_p50 / sink16["latency_ms"]["p50"])
    assert by[("dense", None, 100)]["speedup_vs_recompute"] == pytest.approx(
        {str(cs): by[("recompute", cs, 100)]["latency_ms"]["p50"] / by[("dense", None, 100)]["latency_ms"]["p50"]
         for cs in (16, 32)})
    # quality at each length: the 120 tokens ending there (from token 1 when the stream is shorter)
    quality = {(r["method"], r["length"]): r for r in records if r["record"] == "quality"}
    assert set(quality) == {(m, n) for m in ("sink", "window", "recompute", "dense") for n in (100, 1024)}
    sink = quality[("sink", 1024)]
    assert (sink["start"], sink["end"], sink["tokens"]) == (904, 1024, 120) and len(sink["nll"]) == 120
    assert sink["position_scheme"] == "in-cache" and sink["evaluator"] == "chunked" and sink["ppl"] > 1
    assert sink["buckets"][0]["start"] == 904 and sink["buckets"][-1]["end"] == 1024
    assert (quality[("sink", 100)]["start"], quality[("sink", 100)]["end"]) == (1, 100)
    recompute = quality[("recompute", 1024)]
    assert recompute["ratio_to"] == "sink" and recompute["position_scheme"] is None
    assert recompute["ratio_ci95"][0] <= recompute["ratio"] <= recompute["ratio_ci95"][1]
    assert "decode latency per token" in stdout and "quality" in stdout
    # stderr is captured, not a terminal: the progress comes as plain lines, each pass ending with its mean rate
    # (the tokens fed: the 120 wanted and the warm-up before them)
    assert re.search(r"^quality: sink 16 @ 1,024: done ([\d,]+) of \1 tokens in \d+:\d\d:\d\d, [\d.,]+ tokens/s$",
                     stderr, re.MULTILINE), stderr
    assert sorted(p.name for p in out.iterdir()) == ["eta.jsonl", "results.jsonl", "run.json"]  # no .lock left
    # the ETA's log: the plan, then one line per finished item with what was predicted and what it took
    from pystream.measure.eta import read_log

    (session,) = read_log(out / "eta.jsonl")
    plan = session["header"]
    assert plan["spec"]["layers"] == 2 and len(plan["items"]) == len(records)
    assert [e["index"] for e in session["items"]] == list(range(len(records)))
    assert [e["label"] for e in session["items"]] == [i["label"] for i in plan["items"]]
    for entry in session["items"]:
        assert entry["actual_s"] > 0 and entry["predicted_s"] > 0 and entry["eta_s"] >= 0
    assert session["items"][-1]["eta_s"] == 0 and session["items"][-1]["pending"] == 0
    elapsed = [e["elapsed_s"] for e in session["items"]]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= sum(e["actual_s"] for e in session["items"])


def test_resume_runs_nothing_twice(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "sink,window", "--ppl-tokens", "0")
    assert run_cli(args, capsys)[0] == 0
    before = (out / "results.jsonl").read_text()
    code, _, stderr = run_cli([*args, "--resume"], capsys)
    assert code == 0
    assert (out / "results.jsonl").read_text() == before
    assert re.search(r"resumed: (\d+) finished", stderr).group(1) == str(len(before.splitlines()))


def test_resume_says_how_much_was_done_before_the_bar(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "sink,window")
    assert run_cli(args, capsys)[0] == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["record"] for line in lines]
    # 2 lengths x 2 capacities x 2 methods, then sink and window quality at each of the 2 lengths
    assert kinds == ["cell"] * 8 + ["quality"] * 4
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")  # as if stopped after 5 cells
    code, _, stderr = run_cli([*args, "--resume"], capsys)
    assert code == 0, stderr
    assert "resuming: 5 of 8 cells already done, 0 of 4 quality passes; 7 items to run" in stderr
    assert len(read_records(out)) == 12
    # the ETA log gained a session (appended, the first kept) that ran the 7 items left
    from pystream.measure.eta import read_log

    first, second = read_log(out / "eta.jsonl")
    assert len(first["items"]) == 12 and len(second["items"]) == 7
    assert [i["done"] for i in second["header"]["items"]] == [True] * 5 + [False] * 7
    assert [e["index"] for e in second["items"]] == list(range(5, 12))


def test_dense_that_would_not_fit_is_recorded_as_oom(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    from pystream.measure import clocks as measure

    monkeypatch.setattr(measure, "available_bytes", lambda device: 64 * 1024**2)  # pretend 64 MiB are free
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "dense,sink", "--lengths", "2M",
                     "--ppl-tokens", "0", "--cache-sizes", "16")
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    cells = {r["method"]: r for r in read_records(out)}
    assert cells["dense"]["status"] == "oom"
    assert cells["dense"]["error"].startswith("OOM: needs 1.0 GiB, 0.1 GiB available")
    assert cells["sink"]["status"] == "ok"  # the run goes on
    assert "OOM" in stdout


def test_stream_mode_streams_every_token(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "sink,dense", "--lengths", "300", "--mode",
                     "stream", "--ppl-tokens", "0", "--cache-sizes", "32")
    assert run_cli(args, capsys)[0] == 0
    cells = {r["method"]: r for r in read_records(out)}
    assert cells["sink"]["mode"] == "stream" and cells["sink"]["stream_position"] == 300
    assert cells["sink"]["evicted"] == 300 - 32
    assert cells["dense"]["stream_position"] == 300


BAD_INPUTS = [
    (["--lengths", "4x"], "--lengths: '4x' is not a size"),
    (["--lengths", "0"], "--lengths: '0' must be positive"),
    (["--lengths", "-5"], "--lengths: '-5' is not a size"),
    (["--lengths", "4k,,8k"], "without empty items"),
    (["--cache-sizes", "4", "--sinks", "4"], "--cache-sizes: 4 is not larger than --sinks 4"),
    (["--methods", "sink,turbo"], "--methods: unknown method 'turbo'"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--recompute-steps", "0"], "--recompute-steps must be >= 1"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_arguments(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_cli([*args, "--out", out], capsys)
    assert code == 2
    assert message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not out.exists()


def test_bad_files(tiny_model_dir, text_file, tmp_path, capsys):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--text", tmp_path / "missing.txt"], "missing.txt: no such file"),
        (["--text", not_utf8], "latin1.txt: not valid UTF-8 (byte 3 is 0xe9)"),
        (["--text", empty], "empty.txt: the file is empty"),
        (["--text", tmp_path], "is a directory, not a file"),
        (["--model", tmp_path / "no-such-model"], "is not a local folder or file"),
        (["--model", "some-org/some-model-that-is-not-here"], "the hub is unreachable"),
        (["--model", a_file], "is a file, not a model folder"),
        (["--out", a_file / "run"], "cannot write in"),
        (["--out", a_file], "exists and is not a directory"),
        (["--resume", "--out", tmp_path / "nothing-here"], "holds no run to continue"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        args = ["--model", tiny_model_dir, "--text", text_file, "--out", out, "--lengths", "64", *map(str, extra)]
        code, _, stderr = run_cli(args, capsys)
        assert code == 2, (extra, stderr)
        assert message in stderr, (extra, stderr)
        assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr
        assert not out.exists()


def test_pickled_weights_are_refused(tmp_path, text_file, capsys):
    folder = save_tiny_model(tmp_path / "pickled")
    model = tiny_model("llama")
    (folder / "model.safetensors").unlink()  # leave only a pickle, which would run code when loaded
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    code, _, stderr = run_cli(["--model", folder, "--text", text_file, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "no safetensors weights" in stderr and "unpickling" in stderr


def test_unsupported_model_is_named(tmp_path, text_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    code, _, stderr = run_cli(["--model", folder, "--text", text_file, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "model type 'gpt2'" in stderr


def test_help_shows_examples_and_units():
    result = subprocess.run([sys.executable, "-m", "pystream.cli", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0
    assert "pystream-bench --lengths 4k,1M" in result.stdout
    assert "k = 1024 and M = 1024*1024" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 120  # the description wraps too
    for option in ("--dtype", "--seed", "--out"):  # every option says what it does
        entry = result.stdout[result.stdout.index(f"  {option} "):].split("\n  -")[0]
        assert len(entry.split()) > 4, entry
    report = subprocess.run([sys.executable, "-m", "pystream.report", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    assert "RUN_DIR               a directory written by pystream-bench" in report.stdout


def test_profile_writes_traces_and_a_breakdown(tiny_model_dir, text_file, tmp_path, capsys):
    import gzip

    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--lengths", "200", "--cache-sizes", "32", "--ppl-tokens",
                     "0", "--profile", "--profile-steps", "3", "--methods", "sink,dense,recompute")
    assert run_cli(args, capsys)[0] == 0
    cells = {r["method"]: r for r in read_records(out)}
    for method, cell in cells.items():
        parts = cell["profile"]["ms_per_step"]
        assert cell["profile"]["steps"] == 3 and parts["step_ms"] > 0 and parts["logits_ms"] > 0
        trace = json.loads(gzip.open(out / "traces" / cell["profile"]["trace"]).read())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"pystream::step", "pystream::forward", "pystream::logits"} <= names
        if method != "recompute":
            assert "pystream::cache_update" in names and parts["cache_update_ms"] > 0
    assert cells["sink"]["profile"]["ms_per_step"]["bookkeeping_ms"] > 0
    assert cells["sink"]["profile"]["ms_per_step"]["rerotate_ms"] > 0
    assert cells["recompute"]["profile"]["ms_per_step"]["cache_update_ms"] == 0


def test_validate_returns_a_frozen_config_and_leaves_args_alone(tmp_path):
    import dataclasses

    from pystream.cli import RunConfig, build_parser, validate

    args = build_parser().parse_args(["--lengths", "4k,1M", "--cache-sizes", "256,1k", "--out", str(tmp_path / "r"),
                                      "--experiment", "paper"])
    before = dict(vars(args))
    config = validate(args)
    assert vars(args) == before  # threads, parts, ... resolved into the config, not written back
    assert isinstance(config, RunConfig) and config.lengths == (4096, 1024**2) and config.cache_sizes == (256, 1024)
    assert config.threads >= 1 and config.parts == ("ppl", "sinks", "cache", "attention", "stability")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sinks = 8
    assert not (tmp_path / "r").exists()
