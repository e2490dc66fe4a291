"""pystream-bench's quality at each length (pystream/measure/quality_at.py), end to end on a tiny model: the records
cover the tokens ending at each L, sink's PPL there equals token-by-token SinkCache streaming over the whole stream
(an oracle independent of the chunked evaluator) and a direct evaluator call, the paired recompute fields agree with
the NLL they were computed from, dense past memory is a record of its need, ALiBi models stay token by token."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from conftest import read_records, run_cli, tiny_args

LENGTHS = (100, 1024)
PPL_TOKENS = 120


def _model_and_ids(model_dir, text_file):
    from pystream.inputs.models import load_model
    from pystream.inputs.texts import load_text, tokenize

    loaded = load_model(str(model_dir))
    ids = torch.from_numpy(tokenize(load_text(str(text_file)), loaded.tokenizer, use_cache=False).astype(np.int64))
    return loaded.model, ids


def _stream(ids, end):
    """The bench's stream 0: the text cycled to `end` tokens."""
    return ids[torch.arange(end) % ids.numel()]


def _nll(rec):
    return np.array([np.nan if v is None else v for v in rec["nll"]], dtype=float)


@pytest.fixture(scope="module")
def at_lengths(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality-at") / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "sink,window,recompute,dense", "--cache-sizes",
                     "16", "--position-schemes", "in-cache,original", "--ppl-tokens", str(PPL_TOKENS))
    # the run every test of this file reads, made here so that any one of them can run alone
    from pystream.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    assert code == 0, stderr.getvalue()
    return out, args, stdout.getvalue()


def test_quality_at_each_length_is_exact(at_lengths, tiny_model_dir, text_file, capsys):
    from pystream.cache.hf import streaming_cache
    from pystream.measure.evaluator import stream_nll
    from pystream.measure.quality import nll_streaming

    out, args, stdout = at_lengths
    quality = {(r["method"], r["length"], r.get("position_scheme")): r for r in read_records(out)
               if r["record"] == "quality"}
    expected = {(m, n, s) for n in LENGTHS for m, s in (("sink", "in-cache"), ("sink", "original"),
                                                        ("window", "in-cache"), ("dense", None), ("recompute", None))}
    assert set(quality) == expected
    model, ids = _model_and_ids(tiny_model_dir, text_file)
    assert ids.numel() < LENGTHS[-1]  # the 1k stream cycles the text, as the cells' streams do
    for (name, length, scheme), rec in quality.items():
        start = max(1, length - PPL_TOKENS)
        assert (rec["start"], rec["end"], rec["tokens"]) == (start, length, length - start), rec["method"]
        assert len(rec["nll"]) == length - start and rec["buckets"][0]["start"] == start
        assert rec["status"] == "ok" and rec["mode"] == "quality"
        if name in ("sink", "window"):
            sinks = 4 if name == "sink" else 0
            direct = stream_nll(model, _stream(ids, length), num_sinks=sinks, window=16 - sinks,
                                position_scheme=scheme, start=start, end=length)
            assert rec["ppl"] == pytest.approx(direct.ppl, rel=1e-9)
            assert rec["evaluator"] == "chunked"
    # the oracle: token by token through SinkCache over the whole 1k stream, the tokens [904, 1024) of it
    stream = _stream(ids, 1024)
    full = nll_streaming(model, streaming_cache(16, 4, model.config), stream)
    sink = quality[("sink", 1024, "in-cache")]
    assert np.abs(_nll(sink) - full[903:]).max() <= 1e-4  # recorded to 5 decimals
    assert sink["ppl"] == pytest.approx(math.exp(full[903:].mean()), rel=1e-5)
    assert sink["streamed_from"] > 0  # it did start at the warm-up, not at token 0
    # the two schemes differ once the sinks are far from the query
    assert abs(quality[("sink", 1024, "original")]["ppl"] - sink["ppl"]) > 1e-3 * sink["ppl"]
    assert "904-1,024" in stdout and "original" in stdout
    # a resume measures nothing again: every length and scheme has its own identity
    before = (out / "results.jsonl").read_text()
    assert run_cli([*args, "--resume"], capsys)[0] == 0
    assert (out / "results.jsonl").read_text() == before


def test_recompute_is_paired_with_sink(at_lengths, tiny_model_dir, text_file):
    from pystream.measure.evaluator import recompute_nll_at

    out, _, _ = at_lengths
    quality = {(r["method"], r["length"], r.get("position_scheme")): r for r in read_records(out)
               if r["record"] == "quality"}
    model, ids = _model_and_ids(tiny_model_dir, text_file)
    for length in LENGTHS:
        rec, sink = quality[("recompute", length, None)], quality[("sink", length, "in-cache")]
        nll = _nll(rec)
        positions = np.flatnonzero(~np.isnan(nll))
        assert rec["sample_size"] == positions.size >= 2
        assert rec["ratio_to"] == "sink" and rec["ratio_position_scheme"] == "in-cache"
        diff = _nll(sink)[positions] - nll[positions]
        assert rec["ratio"] == pytest.approx(math.exp(diff.mean()), rel=1e-6)
        assert rec["ratio_ci95"][0] <= rec["ratio"] <= rec["ratio_ci95"][1]
        assert rec["ratio_met_target"] == (rec["ratio_rel_half_width"] <= rec["ratio_target"])
        assert rec["ratio_met_target"] or rec["sample_size"] in (rec["tokens"], 512)
        # the recorded NLL is recompute's at those stream tokens
        some = positions[:4] + rec["start"]
        direct = recompute_nll_at(model, _stream(ids, length), some, 16)
        assert np.abs(direct - nll[positions[:4]]).max() <= 1e-4


def test_recompute_all_is_exact(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "sink,recompute", "--cache-sizes", "16",
                     "--lengths", "300", "--ppl-tokens", "40", "--recompute-ppl", "all")
    assert run_cli(args, capsys)[0] == 0
    rec = next(r for r in read_records(out) if r["record"] == "quality" and r["method"] == "recompute")
    assert rec["sampled"] is False and rec["sample_size"] == 40 and None not in rec["nll"]
    assert rec["ratio_ci95"][0] == pytest.approx(rec["ratio"]) == pytest.approx(rec["ratio_ci95"][1])


def test_dense_past_memory_is_its_need(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    from pystream.measure import clocks

    monkeypatch.setattr(clocks, "available_bytes", lambda device: 64 * 1024**2)
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--methods", "dense,sink", "--lengths", "2M", "--steps", "1",
                     "--cache-sizes", "16", "--ppl-tokens", "50")
    assert run_cli(args, capsys)[0] == 0
    quality = {r["method"]: r for r in read_records(out) if r["record"] == "quality"}
    assert quality["dense"]["status"] == "oom" and quality["dense"]["kv_bytes_needed"] == 2 * 1024**2 * 512
    assert quality["dense"]["error"].startswith("OOM: needs 1.0 GiB")
    sink = quality["sink"]  # exact at 2M for the price of the warm-up
    assert sink["status"] == "ok" and (sink["start"], sink["end"]) == (2 * 1024**2 - 50, 2 * 1024**2)
    assert sink["tokens_fed"] < 200


def test_alibi_models_stay_token_by_token(tmp_path, monkeypatch):
    """Through the drivers directly (tests/test_alibi.py runs pystream-bench end to end on ALiBi models)."""
    from rich.console import Console
    from rich.progress import Progress

    from conftest import tiny_alibi_model
    from pystream.cache.hf import streaming_cache
    from pystream.measure.quality import nll_streaming
    from pystream.measure.runner import Bench, BenchConfig

    model = tiny_alibi_model("bloom")
    ids = np.random.default_rng(1).integers(0, 128, 300)
    cfg = BenchConfig(lengths=(400,), methods=("sink",), cache_sizes=(16,), ppl_tokens=60,
                      position_schemes=("in-cache", "original"))
    bench = Bench(cfg, model, ids, Progress(console=Console(file=open(tmp_path / "log", "w"))))
    quality = {item.scheme: bench.run_quality(item, []) for item in bench.quality_plan()}
    rec = quality["in-cache"]
    assert rec["evaluator"] == "token-by-token" and rec["streamed_from"] > 0 and (rec["start"], rec["end"]) == (340, 400)
    assert quality["original"]["status"] == "unsupported" and "token by token" in quality["original"]["error"]
    full = nll_streaming(model, streaming_cache(16, 4, model.config), _stream(torch.from_numpy(ids), 400))
    assert np.abs(_nll(rec) - full[339:]).max() <= 1e-5  # recorded to 5 decimals: the whole stream's NLL
    # the check can fail: a warm-up one window (of a layer's reach) short is not the whole stream's
    from pystream.measure import quality_at

    monkeypatch.setattr(quality_at, "warmup_start", lambda layers, S, W, start: start - 1 - (layers - 1) * (W - 1))
    short = quality_at._alibi_token_by_token(bench, _stream(torch.from_numpy(ids), 400), 4, 16, 340, 400,
                                             lambda *a: None)[0]
    assert np.abs(short - full[339:]).max() > 1e-3


@pytest.mark.parametrize("methods, schemes, paired", [
    (("sink", "window", "recompute"), ("original", "in-cache"), ("sink", "original")),
    (("window", "recompute"), ("in-cache",), ("window", "in-cache")),
    (("dense", "recompute"), ("in-cache",), None),
])
def test_recompute_waits_for_the_record_it_is_paired_with(methods, schemes, paired):
    """What a scheduler running items out of order (--ray) waits for is the record `run_quality` pairs with."""
    from pystream.measure.quality_at import pair_candidates, quality_plan
    from pystream.measure.runner import BenchConfig

    cfg = BenchConfig(lengths=(4096, 8192), methods=methods, cache_sizes=(256,), ppl_tokens=512,
                      position_schemes=schemes)
    plan = quality_plan(cfg)
    for item in plan:
        deps = pair_candidates(cfg, plan, item)
        if item.method != "recompute" or paired is None:
            assert deps == []
        else:
            assert [(d.method, d.scheme, d.length, d.capacity) for d in deps] == [(*paired, item.length, 256)]
