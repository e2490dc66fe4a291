"""The recall experiment (issue 14): the probe's layout, the branching pass against separate streams through the exact
evaluator, a cache that holds the first copy against dense, one that evicted it against a passage never seen, the CLI
end to end on a tiny model; and (slow) the bundled model's recall where it must be high or low."""

import json

import numpy as np
import pytest
import torch

from conftest import InterruptAfter, Writer, run_cli, tiny_model
from pystream.measure.evaluator import dense_nll, stream_nll
from pystream.measure.recall import (Passage, RecallConfig, RecallExperiment, _DenseFeeder, _StreamFeeder,
                                     branch_nll, copies, make_passages, probe_stream, recompute_probe)

TEXT = np.random.default_rng(1).integers(0, 128, 3000)


def passage(position=24, P=8, seed=0, offset=100):
    tokens = torch.from_numpy(np.random.default_rng(seed).integers(0, 128, P).astype(np.int64))
    return Passage(tokens, offset, position, seed)


def test_probe_layout_is_what_the_record_says():
    cfg = RecallConfig(passages=3, passage_tokens=8, first_position=40)
    for pas in make_passages(TEXT, cfg):
        for d in (0, 16, 300):
            ids = probe_stream(TEXT, pas, d)
            first, repeat = copies(pas, d)
            assert ids.numel() == pas.position + 2 * 8 + d
            assert torch.equal(ids[first.start:first.stop], pas.tokens)
            assert torch.equal(ids[repeat.start:repeat.stop], pas.tokens)
            assert repeat.start - first.stop == d
            text = TEXT[(np.arange(pas.position + d) + pas.text_offset) % len(TEXT)]
            assert np.array_equal(ids[:pas.position].numpy(), text[:pas.position])  # text before
            assert np.array_equal(ids[first.stop:repeat.start].numpy(), text[pas.position:])  # the gap continues it
    assert len({p.position for p in make_passages(TEXT, cfg)}) == 3  # several stream positions


def separate(model, pas, d, how):
    """Oracle: the probe stream for one distance alone, through the exact evaluator."""
    ids = probe_stream(TEXT, pas, d)
    first, repeat = copies(pas, d)
    nll = how(ids)
    return nll.at(np.arange(first.start, first.stop)), nll.at(np.arange(repeat.start, repeat.stop))


@pytest.mark.parametrize("kind", ["dense", "sink", "window-original"])
def test_one_pass_branching_equals_separate_streams(kind):
    model = tiny_model("llama")
    pas = passage()
    distances = [0, 5, 40, 90]
    if kind == "dense":
        feeder, how = _DenseFeeder(model), lambda ids: dense_nll(model, ids, start=1)
    elif kind == "sink":
        feeder, how = _StreamFeeder(model, 2, 30, "in-cache"), \
            lambda ids: stream_nll(model, ids, num_sinks=2, window=30, start=1)
    else:
        feeder, how = _StreamFeeder(model, 0, 30, "original"), \
            lambda ids: stream_nll(model, ids, num_sinks=0, window=30, position_scheme="original", start=1)
    first, repeats = branch_nll(feeder, TEXT, pas, distances, chunk=16)
    for d in distances:
        f, r = separate(model, pas, d, how)
        assert np.allclose(first, f, atol=1e-4) and np.allclose(repeats[d], r, atol=1e-4), d


def test_a_cache_holding_the_first_copy_gives_dense_repeat_nll():
    model = tiny_model("llama")
    pas = passage(position=16)
    first_d, dense = branch_nll(_DenseFeeder(model), TEXT, pas, [16], chunk=64)
    # 16 + 8 + 16 + 8 = 48 tokens: a 4+60 cache never evicts
    first_s, held = branch_nll(_StreamFeeder(model, 4, 60, "in-cache"), TEXT, pas, [16], chunk=64)
    assert np.allclose(first_s, first_d, atol=1e-4) and np.allclose(held[16], dense[16], atol=1e-4)
    # can fail: a cache too small to hold it gives something else
    _, small = branch_nll(_StreamFeeder(model, 4, 12, "in-cache"), TEXT, pas, [16], chunk=64)
    assert not np.allclose(small[16], dense[16], atol=1e-3)


def test_a_cache_that_evicted_it_gives_the_nll_of_unseen_tokens():
    """Window 16, two layers: the repeat's states reach back 2 x 15 tokens, so at d = 40 nothing of the first copy is
    left; its repeat scores exactly as the same tokens after a first copy of other tokens (a passage never seen)."""
    model = tiny_model("llama")
    pas = passage(position=24)
    d = 40
    _, evicted = branch_nll(_StreamFeeder(model, 4, 16, "in-cache"), TEXT, pas, [d], chunk=32)
    other = torch.from_numpy(np.random.default_rng(99).integers(0, 128, 8).astype(np.int64))
    ids = probe_stream(TEXT, pas, d)
    first, repeat = copies(pas, d)
    ids[first.start:first.stop] = other  # the first copy replaced: the repeat is now unseen
    unseen = stream_nll(model, ids, num_sinks=4, window=16, start=1).at(np.arange(repeat.start, repeat.stop))
    assert np.allclose(evicted[d], unseen, atol=1e-4)
    # can fail: dense still sees the first copy, so it differs from the unseen control
    _, dense = branch_nll(_DenseFeeder(model), TEXT, pas, [d], chunk=32)
    dense_unseen = dense_nll(model, ids, start=1).at(np.arange(repeat.start, repeat.stop))
    assert not np.allclose(dense[d], dense_unseen, atol=1e-3)


def test_recompute_probe_sees_only_its_context():
    model = tiny_model("llama")
    pas = passage(position=24)
    first, repeats = recompute_probe(model, TEXT, pas, [4, 60], context=48, stride=2)
    assert first.shape == (4,) and repeats[4].shape == (4,)
    # at d = 4 the whole stream before each repeat token fits in 48 + ... : the last repeat token's window
    # (48 tokens) still holds the first copy's last token, which dense sees too; at d = 60 it does not
    dense_first, dense = branch_nll(_DenseFeeder(model), TEXT, pas, [60], chunk=64)
    assert np.allclose(first, dense_first[1::2], atol=1e-4)  # the first copy starts at 24 < 48: recompute = dense
    assert not np.allclose(repeats[60], dense[60][1::2], atol=1e-3)


def test_far_probe_uses_the_warm_up_exactly():
    model = tiny_model("llama")
    cfg = RecallConfig(passages=2, passage_tokens=8, distances=(4,), cache_sizes=(20,), sinks=2,
                       methods=("sink",), position_schemes=("in-cache",), probes=("far",), far_position=400,
                       far_distances=(4, 12))
    writer = Writer()
    RecallExperiment(cfg, model, TEXT, writer, InterruptAfter()).run()
    recs = writer.records
    assert [r["distance"] for r in recs] == [4, 12] and all(r["probe"] == "far" for r in recs)
    pas = make_passages(TEXT, cfg, position=400)[0]
    ids = probe_stream(TEXT, pas, 12)
    first, repeat = copies(pas, 12)
    full = stream_nll(model, ids, num_sinks=2, window=18, start=1, warmup=False)  # every token from 0
    f, r = full.at(np.arange(first.start, first.stop)), full.at(np.arange(repeat.start, repeat.stop))
    assert recs[1]["first_nll"][0] == pytest.approx(f.mean(), abs=1e-4)
    assert recs[1]["repeat_nll"][0] == pytest.approx(r.mean(), abs=1e-4)


def test_recall_experiment_through_the_cli(tmp_path, capsys, tiny_model_dir, text_file):
    out = tmp_path / "run"
    args = ["--experiment", "recall", "--model", tiny_model_dir, "--text", text_file, "--out", out,
            "--cache-sizes", "24,40", "--recall-distances", "4,16,64", "--recall-passages", "2",
            "--recall-cache-reach", "4",
            "--passage-tokens", "8", "--far-position", "300", "--threads", "1",
            "--recall-methods", "dense,dense-pi:2,sink,window,recompute"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["record"] for r in records} == {"recall"}
    curve = [r for r in records if r["probe"] == "distance"]
    # dense, dense-pi:2, sink x 2 schemes x 2 caches, window (one scheme: no sinks, both alike) and recompute
    # x 2 caches; 3 distances each
    assert len(curve) == 3 * (2 + 4 + 2 + 2)
    assert {r["position_scheme"] for r in curve if r["method"] == "window"} == {"in-cache"}
    for r in records:
        assert r["passages"] == 2 and len(r["first_nll"]) == len(r["repeat_nll"]) == 2
        per = [1 - b / a for a, b in zip(r["first_nll"], r["repeat_nll"])]
        assert r["recall"] == pytest.approx(np.mean(per))
        assert r["ci95"][0] <= r["recall"] <= r["ci95"][1]
    places = {(r["method"], r["cache_size"], r["placement"]) for r in records if r["probe"] == "placement"}
    assert ("sink", 24, "middle") in places and ("dense", None, "start") in places
    far = [r for r in records if r["probe"] == "far"]
    assert {r["position_scheme"] for r in far} == {"in-cache", "original"} and {r["method"] for r in far} == {"sink"}
    assert "recall against distance" in stdout
    html = (out / "report.html").read_text()
    assert "id='fig-recall'" in html
    before = (out / "results.jsonl").read_text()
    assert run_cli([*args, "--resume"], capsys)[0] == 0
    assert (out / "results.jsonl").read_text() == before  # nothing recomputed


def test_bad_recall_arguments(tmp_path, capsys):
    for extra, message in ((["--recall-methods", "dense,turbo"], "--recall-methods: unknown method 'turbo'"),
                           (["--recall-passages", "1"], "--recall-passages must be >= 2"),
                           (["--recall-distances", "16,x"], "--recall-distances"),
                           (["--recall-probes", "far,magic"], "--recall-probes")):
        code, _, stderr = run_cli(["--experiment", "recall", "--out", tmp_path / "run", *extra], capsys)
        assert code == 2 and message in stderr, stderr
        assert not (tmp_path / "run").exists()


# ---- the bundled model (slow) ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    from pystream.inputs.models import load_model
    from pystream.inputs.texts import load_text, tokenize

    loaded = load_model()
    return loaded.model, np.asarray(tokenize(load_text(None), loaded.tokenizer))


def bundled_recall(model, ids, feeder, d, passages=2):
    cfg = RecallConfig(passages=passages)
    recalls = []
    for pas in make_passages(ids, cfg):
        first, repeats = branch_nll(feeder(), ids, pas, [d], chunk=1024)
        recalls.append(1 - repeats[d].mean() / first.mean())
    return float(np.mean(recalls))


@pytest.mark.slow
def test_bundled_dense_remembers_at_200(bundled):
    model, ids = bundled
    assert bundled_recall(model, ids, lambda: _DenseFeeder(model), 200) >= 0.8


@pytest.mark.slow
def test_bundled_sink_256_forgets_at_1024(bundled):
    model, ids = bundled
    assert bundled_recall(model, ids, lambda: _StreamFeeder(model, 4, 252, "in-cache"), 1024) <= 0.2


@pytest.mark.slow
def test_bundled_sink_1024_remembers_at_512(bundled):
    model, ids = bundled
    assert bundled_recall(model, ids, lambda: _StreamFeeder(model, 4, 1020, "in-cache"), 512) >= 0.8


class PlanWatcher(InterruptAfter):
    """The progress stand-in that keeps the plan the experiment hands its overall bar, and each remaining-time
    estimate at the moment an item finishes."""

    def __init__(self):
        super().__init__()
        self.plan, self.left = None, []

    def add_task(self, *a, plan=None, **k):
        if plan is not None:
            self.plan = plan
        return 0

    def advance(self, *a, **k):
        if self.plan is not None:
            self.left.append(self.plan.remaining_s())
        super().advance()


def test_the_plan_covers_what_runs_and_its_estimate_comes_from_measured_rates():
    model = tiny_model("llama")
    cfg = RecallConfig(passages=2, passage_tokens=8, distances=(4, 16, 200), cache_sizes=(24, 40), sinks=2,
                       methods=("dense", "sink", "window", "recompute"), far_position=400, far_distances=(4,),
                       recompute_stride=4, cache_reach=4)
    writer, watcher = Writer(), PlanWatcher()
    experiment = RecallExperiment(cfg, model, TEXT, writer, watcher)
    work = experiment.work()
    experiment.run()
    plan = watcher.plan
    # one item per passage of each pass, all finished, none left
    assert len(plan.items) == sum(len(w.passages) for w in work) and not plan.pending
    assert [item.key for item, _ in plan.finished] == [item.key for item in plan.items]
    assert watcher.left[-1] == 0
    # after the first item the estimate uses its measured rate, not the (much slower) prior from the model's size
    first_item, _ = plan.finished[0]
    assert plan.model.measured(first_item.parts[0].kind) is not None
    # sink, window and recompute stop at 4x their cache (200 > 4 x 40); dense goes on; window once, both schemes
    # for sink, the far probe for sink alone
    curve = {(r["method"], r["cache_size"], r["position_scheme"]): [] for r in writer.records}
    for r in writer.records:
        if r["probe"] == "distance":
            curve[(r["method"], r["cache_size"], r["position_scheme"])].append(r["distance"])
    assert curve[("dense", None, None)] == [4, 16, 200]
    assert curve[("sink", 24, "in-cache")] == curve[("sink", 40, "original")] == [4, 16]
    assert ("window", 24, "original") not in curve and curve[("window", 40, "in-cache")] == [4, 16]
    assert curve[("recompute", 40, None)] == [4, 16]
    assert {(r["method"], r["position_scheme"]) for r in writer.records if r["probe"] == "far"} == \
        {("sink", "in-cache"), ("sink", "original")}
    assert all(r["passages"] == 2 for r in writer.records)


def test_the_plan_prices_a_pass_by_what_it_feeds():
    """A dense pass to a longer distance costs more units; a far pass is priced from its warm-up start, not from
    token 0; recompute by the windows it re-reads."""
    model = tiny_model("llama")
    cfg = RecallConfig(passages=1, passage_tokens=8, far_position=4000, cache_sizes=(24,), sinks=2)
    experiment = RecallExperiment(cfg, model, TEXT, Writer(), InterruptAfter())
    from pystream.measure.recall import Setting, Work
    near = make_passages(TEXT, cfg)[0]
    far = make_passages(TEXT, cfg, position=4000)[0]
    dense = Setting("dense", None, 0, None)
    sink = Setting("sink", 24, 2, "in-cache")

    def units(work, pas):
        return sum(p.units for p in experiment.parts(work, pas))
    assert units(Work(dense, False, (16, 2000), (near,)), near) > 2 * units(Work(dense, False, (16, 200), (near,)),
                                                                            near)
    far_units = units(Work(sink, True, (16,), (far,)), far)
    assert far_units < units(Work(sink, False, (16,), (far,)), far) / 10  # 4,000 tokens in, a warm-up of 2 x 21
    recompute = Setting("recompute", 24, 0, None)
    assert units(Work(recompute, False, (4, 16), (near,)), near) == pytest.approx(
        1.5 * units(Work(recompute, False, (4,), (near,)), near))  # (1 + 2) / (1 + 1) copies scored
