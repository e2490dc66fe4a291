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
