"""The caches against oracles, on tiny random-weight models of every supported architecture (float32; on the CPU,
and again on a CUDA device where there is one).

1. SinkCache == the paper's algorithm (tests/reference.py) over 2,000 single-token steps, S=4, W=64, with sdpa and
   eager, with the model's own positions and with the cache's re-based positions: ring wrap-around and re-basing
   both happen many times.
2. Before the cache is full, logits == a plain full-sequence forward.
3. generate() with SinkCache == a greedy loop over the reference, past max_position_embeddings.
5. WindowCache == the reference with S=0; batch 2 == two batch-1 runs.
"""

import pytest
import torch

import pystream.cache.kv
from conftest import tiny_model
from pystream import SinkCache, WindowCache, prefill
from reference import PaperReferenceCache

S, W = 4, 64
STEPS = 2000
TOL = 1e-4


def stream_both(model, ids, cache, ref, planned):
    """Feed ids token by token through both caches; return the max abs logit difference per step."""
    diffs = []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            x = ids[:, t:t + 1]
            expected = model(x, cache=ref).logits
            kwargs = {"position_ids": cache.position_ids(1)} if planned else {}
            got = model(x, cache=cache, **kwargs).logits
            diffs.append((expected - got).abs().max().item())
    return diffs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("planned", [True, False], ids=["cache-positions", "model-positions"])
def test_sink_cache_equals_paper_algorithm(arch, attn, planned, device):
    model = tiny_model(arch, attn).to(device)
    ids = torch.randint(0, model.config.vocab_size, (1, STEPS), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    cache = SinkCache(S, W, model.config, device=device)
    diffs = stream_both(model, ids, cache, PaperReferenceCache(model, S, W), planned)
    assert max(diffs) <= TOL, f"max diff {max(diffs):.2e} at step {diffs.index(max(diffs))}"
    # every internal event happened: the ring wrapped many times, and (cache positions) the frame was re-based
    assert cache.seen() == STEPS and cache.ring.occupied(0) == S + W  # full: each later token evicted one
    assert cache.kv.layers[0].keys.device.type == device.type
    if planned:
        assert cache.ring.frame_base(0) > 10 * (S + W)
        assert cache.get_seq_length() <= cache.ring.max_position
    else:
        assert cache.ring.frame_base(0) == 0


def test_oracle_detects_unshifted_sinks(monkeypatch):
    """The oracle can fail: a cache that leaves the sinks at their original positions is caught."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))

    def place_without_shift(self, layer, step):
        step.sink_shift = [-self.ring.frame_base(b) for b in range(self.ring.num_streams)]
        step.sink_cos = None
        original(self, layer, step)

    original = pystream.cache.kv.StreamingKV._place_sinks
    monkeypatch.setattr(pystream.cache.kv.StreamingKV, "_place_sinks", place_without_shift)
    diffs = stream_both(model, ids, SinkCache(S, W, model.config), PaperReferenceCache(model, S, W), planned=True)
    assert max(diffs[: S + W]) <= TOL  # identical until the first eviction...
    assert max(diffs) > 100 * TOL  # ...then clearly wrong


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_before_full_equals_full_forward(arch, attn):
    model = tiny_model(arch, attn)
    ids = torch.randint(0, 128, (2, S + W), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids).logits
        cache = SinkCache(S, W, model.config)
        chunk = model(ids[:, :10], cache=cache).logits  # a multi-token chunk, then single tokens
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(10, S + W)]
    got = torch.cat([chunk, *steps], dim=1)
    assert (got - full).abs().max().item() <= TOL


def greedy_reference(model, prompt, new_tokens):
    cache = PaperReferenceCache(model, S, W)
    tokens = prompt.clone()
    with torch.inference_mode():
        logits = model(prompt, cache=cache).logits[:, -1]
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, cache=cache).logits[:, -1]
    return tokens


def test_generate_equals_greedy_reference_past_max_positions(arch, device):
    model = tiny_model(arch).to(device)
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3)).to(device)
    new_tokens = 3 * model.config.max_position_embeddings  # 192 > 64
    expected = greedy_reference(model, prompt, new_tokens)
    out = model.generate(prompt, cache=SinkCache(S, W, model.config), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    assert torch.equal(out, expected)


def test_generate_with_deprecated_past_key_values():
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    expected = greedy_reference(model, prompt, 80)
    with pytest.warns(Warning, match="`past_key_values` is deprecated"):  # transformers still routes it to cache=
        out = model.generate(prompt, past_key_values=SinkCache(S, W, model.config), max_new_tokens=80,
                             min_new_tokens=80, do_sample=False)
    assert torch.equal(out, expected)


def test_prompt_longer_than_cache(arch, device):
    """A prompt of any length gives the same result as feeding it token by token, through prefill() and through
    pystream.generate()."""
    model = tiny_model(arch).to(device)
    prompt = torch.randint(0, 128, (1, 3 * (S + W) + 5), generator=torch.Generator().manual_seed(5)).to(device)
    ref = PaperReferenceCache(model, S, W)
    with torch.inference_mode():
        expected = [model(prompt[:, t:t + 1], cache=ref).logits[:, -1] for t in range(prompt.shape[1])]
    seen = []
    last = prefill(model, SinkCache(S, W, model.config), prompt, on_token=lambda i, lg: seen.append(lg.clone()))
    assert len(seen) == prompt.shape[1]
    assert max((a - b).abs().max().item() for a, b in zip(seen, expected)) <= TOL
    assert (last - expected[-1]).abs().max().item() <= TOL

    import pystream

    out = pystream.generate(model, prompt, SinkCache(S, W, model.config), max_new_tokens=40, min_new_tokens=40,
                            do_sample=False)
    ref = PaperReferenceCache(model, S, W)
    tokens = prompt.clone()
    with torch.inference_mode():
        for t in range(prompt.shape[1] - 1):
            model(prompt[:, t:t + 1], cache=ref)
        logits = model(prompt[:, -1:], cache=ref).logits[:, -1]
        for _ in range(40):
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = model(nxt, cache=ref).logits[:, -1]
    assert torch.equal(out, tokens)
    # and transformers' own chunked prefill, one token per chunk, gives the same tokens
    chunked = model.generate(prompt, cache=SinkCache(S, W, model.config), max_new_tokens=40, min_new_tokens=40,
                             do_sample=False, prefill_chunk_size=1)
    assert torch.equal(chunked, tokens)


def test_overlong_chunk_is_refused_with_guidance():
    model = tiny_model("llama")
    cache = SinkCache(S, W, model.config)
    ids = torch.randint(0, 128, (1, S + W + 1))
    with pytest.raises(ValueError, match="prefill"):
        model(ids, cache=cache)
    assert cache.seen() == 0  # nothing was booked


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_cache_equals_reference_without_sinks(arch, attn):
    model = tiny_model(arch, attn)
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(6))
    diffs = stream_both(model, ids, WindowCache(W, model.config), PaperReferenceCache(model, 0, W), planned=True)
    assert max(diffs) <= TOL


def test_window_cache_without_config_uses_model_positions():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(7))
    diffs = stream_both(model, ids, WindowCache(W), PaperReferenceCache(model, 0, W), planned=False)
    assert max(diffs) <= TOL


@pytest.mark.parametrize("planned", [True, False], ids=["cache-positions", "model-positions"])
def test_batch_of_two_equals_two_single_runs(arch, planned, device):
    model = tiny_model(arch).to(device)
    ids = torch.randint(0, 128, (2, 400), generator=torch.Generator().manual_seed(8)).to(device)
    batched = SinkCache(S, W, model.config, device=device)
    singles = [SinkCache(S, W, model.config, device=device) for _ in range(2)]
    worst = 0.0
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            kwargs = {"position_ids": batched.position_ids(1)} if planned else {}
            got = model(ids[:, t:t + 1], cache=batched, **kwargs).logits
            for b in range(2):
                kw = {"position_ids": singles[b].position_ids(1)} if planned else {}
                one = model(ids[b:b + 1, t:t + 1], cache=singles[b], **kw).logits
                worst = max(worst, (got[b:b + 1] - one).abs().max().item())
    assert worst <= TOL


def test_paper_cache_baseline_equals_reference():
    """The benchmark baseline computes the same thing as the oracle (it only has to be slow the paper's way)."""
    from pystream import PaperCache

    model = tiny_model("gpt_neox")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(9))
    diffs = stream_both(model, ids, PaperCache(S, W, model.config), PaperReferenceCache(model, S, W),
                        planned=False)
    assert max(diffs) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch_name", ["llama", "gpt_neox"])
def test_half_precision_error_is_the_references(arch_name, dtype, device):
    """In bfloat16/float16 the cache rotates stored keys in that precision (sinks every step, the window at each
    re-base). Its logits must stray from the float32 truth no further than the paper's algorithm run in the same
    precision does: re-rotation must not pile up rounding error over a stream 12x the cache."""
    exact = tiny_model(arch_name).to(device)
    low = tiny_model(arch_name).to(device, dtype)
    ids = torch.randint(0, 128, (1, 12 * (S + W)), generator=torch.Generator().manual_seed(1)).to(device)
    truth, ref = PaperReferenceCache(exact, S, W), PaperReferenceCache(low, S, W)
    cache = SinkCache(S, W, low)  # the model as config: its device comes with it
    ref_error, our_error = [], []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            x = ids[:, t:t + 1]
            expected = exact(x, cache=truth).logits
            ref_error.append((low(x, cache=ref).logits.float() - expected).abs().mean().item())
            got = low(x, cache=cache, position_ids=cache.position_ids(1)).logits.float()
            our_error.append((got - expected).abs().mean().item())
    assert cache.kv.layers[0].keys.dtype == dtype
    mean_ref, mean_ours = sum(ref_error) / len(ref_error), sum(our_error) / len(our_error)
    assert mean_ours <= 1.25 * mean_ref, f"mean |error| {mean_ours:.2e}, the reference's {mean_ref:.2e}"
    late = slice(len(our_error) // 2, None)  # and no drift: the second half is no worse than the reference's
    assert max(our_error[late]) <= 1.5 * max(ref_error[late])
