"""The paper experiment's logic on a tiny model: the parts run, the records have the expected shape, batched rows
equal single runs, and an interrupted stream resumes from its checkpoint with the same result."""

import json

import numpy as np
import pytest
import torch

from conftest import InterruptAfter, Writer, run_cli, save_tiny_model, tiny_model
from pystream import SinkCache, WindowCache
from pystream.cache.batch import StreamBatch
from pystream.measure.experiments import PaperConfig, PaperExperiment
from pystream.results.paper import paper_table


def stream_single(model, cache, ids):
    out = []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            out.append(model(ids[:, t:t + 1], cache=cache, position_ids=cache.position_ids(1)).logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("capacities", [(64, 64, 64), (32, 64, 96)], ids=["same-capacity", "mixed-capacity"])
def test_stream_batch_rows_equal_single_runs(capacities):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 250), generator=torch.Generator().manual_seed(0))
    settings = [(0, capacities[0]), (4, capacities[1]), (8, capacities[2])]
    make = lambda s, c: SinkCache(s, c - s, model.config) if s else WindowCache(c, model.config)  # noqa: E731
    batch = StreamBatch([make(s, c) for s, c in settings])
    rows = []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            x = ids[:, t:t + 1].expand(3, 1)
            rows.append(model(x, cache=batch, position_ids=batch.position_ids(),
                              attention_mask=batch.attention_mask()).logits[:, -1])
    batched = torch.stack(rows, dim=1)
    for row, (s, c) in enumerate(settings):
        single = stream_single(model, make(s, c), ids)
        assert (batched[row] - single).abs().max().item() <= 1e-4


def test_interrupted_stream_resumes_from_its_checkpoint(tmp_path):
    model = tiny_model("qwen2")
    ids = np.random.default_rng(0).integers(0, 128, 2000)
    cfg = PaperConfig(tokens=300, cache=48, checkpoint_every_s=0)
    make = lambda: [SinkCache(4, 44, model.config), WindowCache(48, model.config)]  # noqa: E731
    whole = PaperExperiment(cfg, model, ids, Writer(), InterruptAfter(), "cpu", None)._stream_batch("t", make(), 300)
    first = PaperExperiment(cfg, model, ids, Writer(), InterruptAfter(137), "cpu", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        first._stream_batch("t", make(), 300)
    assert (tmp_path / "checkpoints" / "t" / "nll.npy").exists()
    progress = InterruptAfter()
    resumed = PaperExperiment(cfg, model, ids, Writer(), progress, "cpu", tmp_path)._stream_batch("t", make(), 300)
    assert 0 < progress.count < 299 - 100  # it did not start again from the beginning
    assert np.allclose(resumed, whole, atol=1e-4, equal_nan=True)
    assert not (tmp_path / "checkpoints" / "t").exists()  # cleaned up once finished


class Updates(InterruptAfter):
    """The progress bar's stand-in that keeps what `update(completed=...)` was told, and interrupts past `stop`."""

    def __init__(self, stop=None):
        super().__init__()
        self.stop, self.completed = stop, []

    def update(self, task, completed=None, **kwargs):
        if completed is not None:
            self.completed.append(completed)
            if self.stop is not None and completed > self.stop:
                raise KeyboardInterrupt


def test_stability_is_exact_across_units_and_resumes(tmp_path):
    """Part 5 through the chunked evaluator, a unit at a time (each from its own warm-up): the whole stream's NLL,
    per 128-token chunk; an interrupted run resumes after its last finished unit with the same result."""
    from pystream.measure.evaluator import stream_nll

    model = tiny_model("llama")
    ids = np.random.default_rng(0).integers(0, 128, 2000)
    cfg = PaperConfig(parts=("stability",), cache=24, stability_tokens=700, stability_chunk=128, stability_unit=200)
    whole = Writer()
    PaperExperiment(cfg, model, ids, whole, InterruptAfter(), "cpu", None).part_stability()
    rec = whole.records[0]
    direct = stream_nll(model, torch.from_numpy(ids[:700]), num_sinks=4, window=20, warmup=False)
    assert np.abs(np.array(rec["nll"]) - direct.nll).max() <= 1e-4  # recorded to 5 decimals
    assert [b["end"] for b in rec["buckets"]] == [129, 257, 385, 513, 641, 700]
    assert rec["buckets"][0]["ppl"] == pytest.approx(np.exp(direct.nll[:128].mean()), rel=1e-5)
    assert (rec["evaluator"], rec["start"], rec["end"]) == ("chunked", 1, 700)
    first = PaperExperiment(cfg, model, ids, Writer(), Updates(stop=400), "cpu", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        first.part_stability()  # interrupted as unit 3 (tokens 401-600) begins
    progress, resumed = Updates(), Writer()
    PaperExperiment(cfg, model, ids, resumed, progress, "cpu", tmp_path).part_stability()
    # units 3 and 4 only (1 and 2 came from the checkpoint), the bar only ever moving forward
    assert min(progress.completed) >= 400 and progress.completed[-1] == 699
    assert progress.completed == sorted(progress.completed)
    # the same NLL (the resumed units start from a warm-up, the whole run is one stream: equal up to float rounding)
    assert np.abs(np.array(resumed.records[0]["nll"]) - np.array(rec["nll"])).max() <= 1e-4
    assert not (tmp_path / "checkpoints" / "stability").exists()
    short = Writer()
    PaperExperiment(PaperConfig(parts=("stability",), cache=24, stability_tokens=700, stability_keep_nll=100), model,
                    ids, short, InterruptAfter(), "cpu", None).part_stability()
    assert short.records[0]["nll"] is None and short.records[0]["ppl"] == pytest.approx(rec["ppl"], rel=1e-5)


def test_paper_experiment_through_the_cli(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 30)
    out = tmp_path / "run"
    args = ["--experiment", "paper", "--model", folder, "--text", text, "--out", out, "--experiment-tokens", "300",
            "--experiment-cache", "48", "--cache-tokens", "200", "--stability-tokens", "400", "--threads", "1"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    streams = [r for r in records if "stream" in (r.get("experiments") or [])]
    assert sorted(r["sinks"] for r in streams) == [0, 1, 2, 4, 8]
    assert all(len(r["nll"]) == 299 and r["cache_size"] == 48 for r in streams)
    by = {(r["method"], tuple(r.get("experiments") or [])): r for r in records if r["record"] == "quality"}
    assert ("dense", ("ppl",)) in by and by[("recompute", ("ppl",))]["sampled"]
    cache = sorted(r["cache_size"] for r in records if "cache" in (r.get("experiments") or []))
    assert cache == [256, 512, 1024, 2048]
    stability = [r for r in records if r.get("experiments") == ["stability"]]
    assert len(stability) == 1 and stability[0]["tokens"] == 400 and len(stability[0]["buckets"]) == 1
    attention = [r for r in records if r["record"] == "attention"][0]
    assert len(attention["share_first_token"]) == 2 and len(attention["share_first_token"][0]) == 4
    assert all(0 <= v <= 1 for row in attention["share_first_token"] for v in row)
    table = paper_table(records)
    sink_rows = {r["setting"]: r for r in table if r["finding"].startswith("2")}
    assert list(sink_rows) == ["0+48", "1+47", "2+46", "4+44", "8+40"]  # ours, by sinks, each beside the paper's
    window_ppl = next(r["ppl"] for r in streams if r["sinks"] == 0)
    assert sink_rows["0+48"]["ours"] == window_ppl and sink_rows["0+48"]["paper"] == 3359.95
    assert "beside the paper's" in stdout
    html = (out / "report.html").read_text()
    for fig in ("fig-sinks", "fig-cache-sizes", "fig-stability", "fig-attention", "fig-ppl-position"):
        assert f"id='{fig}'" in html
    assert "The paper's findings: ours beside the paper's" in html
    # a resume with the same arguments finds everything done and recomputes nothing
    before = (out / "results.jsonl").read_text()
    assert run_cli([*args, "--resume"], capsys)[0] == 0
    assert (out / "results.jsonl").read_text() == before


def test_bad_experiment_arguments(tmp_path, capsys):
    for extra, message in ((["--parts", "ppl,magic"], "--parts: unknown part 'magic'"),
                           (["--experiment-cache", "8"], "must be larger than the 8 sinks"),
                           (["--experiment-tokens", "200", "--experiment-cache", "256"], "must be longer")):
        code, _, stderr = run_cli(["--experiment", "paper", "--out", tmp_path / "run", *extra], capsys)
        assert code == 2 and message in stderr, stderr
        assert not (tmp_path / "run").exists()


def test_stability_continues_part_ones_sink_stream_and_recompute_is_paired():
    """Parts 1 and 5 in one process: the stability stream continues part 1's sink stream (no second pass over its
    tokens, no warm-up) and equals the whole stream evaluated in one call; recompute is sampled at sink's tokens and
    paired with them, its sample grown towards the 3% target."""
    from pystream.measure.evaluator import stream_nll

    model = tiny_model("llama")
    ids = np.random.default_rng(0).integers(0, 128, 2000)
    cfg = PaperConfig(parts=("ppl", "stability"), tokens=300, cache=24, stability_tokens=700, stability_chunk=128,
                      stability_unit=200, recompute_samples=16, recompute_max_positions=120)
    writer = Writer()
    PaperExperiment(cfg, model, ids, writer, InterruptAfter(), "cpu", None).run()
    by = {(r["method"], r["mode"]): r for r in writer.records}
    sink, stability = by[("sink", "experiment:stream")], by[("sink", "experiment:stability")]
    direct = stream_nll(model, torch.from_numpy(ids[:700]), num_sinks=4, window=20, warmup=False)
    assert np.abs(np.array(stability["nll"]) - direct.nll).max() <= 1e-4
    assert stability["nll"][:299] == sink["nll"]  # part 1's NLL, taken over
    assert stability["tokens_fed"] == 700 - 300 and stability["timed_from_token"] == 300  # only the new tokens
    assert (sink["start"], sink["end"], sink["position_scheme"], sink["evaluator"]) == (1, 300, "in-cache", "chunked")
    recompute = by[("recompute", "experiment:ppl")]
    assert recompute["ratio_to"] == "sink" and recompute["ratio_target"] == 0.03
    assert 16 < recompute["sample_size"] <= 120 and recompute["ratio_rounds"][0][0] == 16
    low, high = recompute["ratio_ci95"]
    assert low <= recompute["ratio"] <= high
    dense = by[("dense", "experiment:ppl")]
    assert dense["status"] == "ok" and len(dense["nll"]) == 299 and dense["evaluator"] == "chunked"
    rows = {r["finding"]: r for r in paper_table(writer.records)}
    assert rows["1. sink PPL / recompute PPL (paired, same tokens)"]["ours"] == recompute["ratio"]
    assert rows["5. stability: PPL over a long stream"]["ours"] == stability["ppl"]
    # a resumed run (another process) pairs recompute with the sink record as written: the same ratio
    resumed = Writer()
    resumed.records = [r for r in writer.records if r["method"] != "recompute"]
    PaperExperiment(cfg, model, ids, resumed, InterruptAfter(), "cpu", None).part_baselines()
    again = [r for r in resumed.records if r["method"] == "recompute"][0]
    assert again["ratio_to"] == "sink" and again["ratio"] == pytest.approx(recompute["ratio"], rel=1e-4)
