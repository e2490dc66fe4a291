"""ALiBi models (BLOOM, MPT): the caches return their keys in logical order, which gives the paper's contiguous
linear bias; checked against the paper's algorithm written plainly (tests/reference.py)."""

import pytest
import torch

from pystream import SinkCache, WindowCache
from conftest import tiny_alibi_model
from reference import AlibiReferenceCache

S, W = 4, 64


def stream_both(model, ids, cache, ref):
    worst = 0.0
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            x = ids[:, t:t + 1]
            worst = max(worst, (model(x, cache=ref).logits - model(x, cache=cache).logits).abs().max().item())
    return worst


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_sink_cache_equals_paper_algorithm_for_alibi(arch):
    model = tiny_alibi_model(arch)
    ids = torch.randint(0, 128, (1, 2000), generator=torch.Generator().manual_seed(1))
    cache = SinkCache(S, W, model.config)
    assert stream_both(model, ids, cache, AlibiReferenceCache(model, S, W)) <= 1e-4
    assert cache.seen() == 2000 and cache.ring.evicted_count(0) == 2000 - S - W


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_window_cache_equals_reference_for_alibi(arch):
    model = tiny_alibi_model(arch)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(2))
    assert stream_both(model, ids, WindowCache(W, model.config), AlibiReferenceCache(model, 0, W)) <= 1e-4


def test_alibi_oracle_can_fail():
    """The comparison sees a cache whose keys are in ring order (a jumping bias)."""
    model = tiny_alibi_model("bloom")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    cache = SinkCache(S, W, model.config)
    cache.kv.logical_order = False  # ring order: the bias jumps where the ring wraps
    assert stream_both(model, ids, cache, AlibiReferenceCache(model, S, W)) > 1e-2


def test_alibi_generate_and_no_positions():
    model = tiny_alibi_model("bloom")
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, cache=SinkCache(S, W, model.config), max_new_tokens=150, min_new_tokens=150,
                         do_sample=False)
    ref = AlibiReferenceCache(model, S, W)
    tokens = prompt.clone()
    with torch.inference_mode():
        logits = model(prompt, cache=ref).logits[:, -1]
        for _ in range(150):
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, cache=ref).logits[:, -1]
    assert torch.equal(out, tokens)
    with pytest.raises(ValueError, match="no positions"):
        SinkCache(S, W, model.config).position_ids(1)


@pytest.mark.parametrize("broken", [False, True])
def test_alibi_fast_forward_changes_nothing_the_model_sees(monkeypatch, broken):
    """ALiBi keys carry no position: jumping a full cache's counters (keep_window=True, what the cells' state mode
    does) keeps the sinks and the window in logical order, so the next step's logits are those of the cache that
    did not jump. Broken variant: the window keys are not moved to the slots their tokens have after the jump."""
    from pystream.cache.kv import StreamingKV

    if broken:
        monkeypatch.setattr(StreamingKV, "_move_window", lambda self, old, new, shift: None)
    model = tiny_alibi_model("bloom")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(5))
    jumped, plain = SinkCache(S, W, model.config), SinkCache(S, W, model.config)
    with torch.inference_mode():
        for cache in (jumped, plain):
            for t in range(ids.shape[1]):
                model(ids[:, t:t + 1], cache=cache)
        jumped.fast_forward(1_000_003, keep_window=True)
        assert jumped.seen() == 1_000_003
        x = ids[:, :1]
        diff = (model(x, cache=jumped).logits - model(x, cache=plain).logits).abs().max().item()
    assert (diff > 1e-3) if broken else (diff <= 1e-5)


def test_pystream_bench_serves_alibi_models(tmp_path, capsys, text_file):
    """Both modes end to end on BLOOM and MPT folders; MPT's dense past its max_seq_len (256 here) is recorded as
    unsupported, with the reason, instead of failing the run."""
    from conftest import char_tokenizer, read_records, run_cli

    for arch in ("bloom", "mpt"):
        folder = tmp_path / arch
        tiny_alibi_model(arch).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        for mode in ("state", "stream"):
            out = tmp_path / f"{arch}-{mode}"
            code, _, err = run_cli(["--model", folder, "--text", text_file, "--out", out, "--lengths", "100,300",
                                    "--cache-sizes", "16", "--steps", "2", "--warmup", "1", "--ppl-tokens", "40",
                                    "--recompute-samples", "8", "--mode", mode, "--no-report"], capsys)
            assert code == 0, err
            bad = {(r["record"], r["method"], r["length"]): r for r in read_records(out) if r.get("status") != "ok"}
            expected = {("cell", "dense", 300), ("quality", "dense", 300)} if arch == "mpt" else set()
            assert set(bad) == expected
            for rec in bad.values():
                assert rec["status"] == "unsupported" and "at most 256" in rec["error"]
