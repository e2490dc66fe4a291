"""SinkCache / WindowCache behaviour beyond the oracles: errors, unsupported models, snapshots, fast-forward,
ragged batches, memory accounting, and the allocation-free decode step."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import tiny_config, tiny_model
from pystream import SinkCache, UnsupportedModelError, WindowCache
from reference import reference_from

S, W = 4, 64


def feed(model, cache, ids, planned=True):
    logits = []
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            kwargs = {"position_ids": cache.position_ids(1)} if planned else {}
            logits.append(model(ids[:, t:t + 1], cache=cache, **kwargs).logits[:, -1])
    return logits


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---- models the caches cannot serve ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make_config, model_type", [
    (lambda: __import__("transformers").GPT2Config(n_layer=2, n_embd=32, n_head=2), "gpt2"),
    (lambda: __import__("transformers").OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                  ffn_dim=64), "opt"),
])
def test_unservable_model_is_named(make_config, model_type):
    config = make_config()
    with pytest.raises(UnsupportedModelError, match=f"model type '{model_type}'"):
        SinkCache(4, 60, config)
    with pytest.raises(UnsupportedModelError, match=f"model type '{model_type}'"):
        WindowCache(64, config)


def test_length_dependent_rope_is_refused():
    config = tiny_config("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        SinkCache(4, 60, config)


def test_cache_larger_than_model_window_is_refused():
    config = tiny_config("mistral", sliding_window=32)
    with pytest.raises(ValueError, match="sliding_window"):
        SinkCache(4, 60, config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_sinks=-1, window=10), "num_sinks and window must be >= 0"),
    (dict(num_sinks=0, window=0), "num_sinks \\+ window must be > 0"),
    (dict(num_sinks=4, window=0), "window must be >= 1"),
    (dict(num_sinks=4, window=10, rebase_interval=0), "rebase_interval must be >= 1"),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkCache(config=tiny_config("llama"), **kwargs)


def test_sinks_need_the_config():
    with pytest.raises(ValueError, match="config=model.config"):
        SinkCache(4, 60)


def test_rotary_frequencies_from_config_match_the_model(arch):
    from pystream.cache.hf import rotary_spec

    model = tiny_model(arch)
    from_config, from_model = rotary_spec(model.config), rotary_spec(model)
    assert from_config.rotary_dim == from_model.rotary_dim
    assert torch.equal(from_config.inv_freq, from_model.inv_freq)


def test_non_consecutive_positions_are_refused():
    model = tiny_model("llama")
    cache = SinkCache(S, W, model.config)
    with pytest.raises(ValueError, match="consecutive"):
        model(torch.tensor([[1, 2, 3]]), cache=cache, position_ids=torch.tensor([[0, 2, 3]]))
    assert cache.seen() == 0


# ---- state control --------------------------------------------------------------------------------------------------

def test_snapshot_restore_replays_exactly():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    cache = SinkCache(S, W, model.config)
    feed(model, cache, ids[:, :250])
    saved = cache.snapshot()
    first = feed(model, cache, ids[:, 250:])
    cache.restore(saved)
    again = feed(model, cache, ids[:, 250:])
    assert max_diff(first, again) == 0.0
    other = SinkCache(S, W + 1, model.config)
    feed(model, other, ids[:, :5])
    with pytest.raises(ValueError, match="geometry"):
        other.restore(saved)


@pytest.mark.parametrize("target", [10_000, 2**33 + 7])
def test_fast_forward_then_refill_equals_reference_from_same_contents(target, device):
    """Jump to `target`, feed the W tokens before it: the counters are those of a long stream, the window holds
    exactly those tokens, and decoding on equals the paper's algorithm started from the same cache contents."""
    model = tiny_model("llama").to(device)
    ids = torch.randint(0, 128, (1, S + W + 200), generator=torch.Generator().manual_seed(1)).to(device)
    cache = SinkCache(S, W, model.config, device=device)
    feed(model, cache, ids[:, :S])
    cache.fast_forward(target - W)
    feed(model, cache, ids[:, S:S + W])  # "the tokens just before target"
    ring = cache.ring
    assert cache.seen() == target and ring.occupied(0) == S + W
    held = sorted(ring.token_in_slot(0, s) for s in range(S + W))
    assert held == list(range(S)) + list(range(target - W, target))
    assert cache.get_seq_length() <= ring.max_position  # positions stay small however far we jumped
    ref = reference_from(cache, model)
    ours = feed(model, cache, ids[:, S + W:])
    theirs = []
    with torch.inference_mode():
        for t in range(S + W, ids.shape[1]):
            theirs.append(model(ids[:, t:t + 1], cache=ref).logits[:, -1])
    assert max_diff(ours, theirs) <= 1e-4


@pytest.mark.parametrize("target", [5_000, 2**40 + 3])
def test_fast_forward_keeping_the_window_equals_reference_from_same_contents(target):
    """Fill sinks + window in one chunk, jump keeping the window: it now holds the W tokens before `target`, and
    decoding on equals the paper's algorithm started from the same contents."""
    model = tiny_model("gpt_neox")
    ids = torch.randint(0, 128, (1, S + W + 150), generator=torch.Generator().manual_seed(5))
    cache = SinkCache(S, W, model.config)
    with torch.inference_mode():
        model(ids[:, : S + W], cache=cache)
    cache.fast_forward(target, keep_window=True)
    ring = cache.ring
    assert cache.seen() == target
    held = sorted(ring.token_in_slot(0, s) for s in range(S + W))
    assert held == list(range(S)) + list(range(target - W, target))
    ref = reference_from(cache, model)
    ours = feed(model, cache, ids[:, S + W:])
    with torch.inference_mode():
        theirs = [model(ids[:, t:t + 1], cache=ref).logits[:, -1] for t in range(S + W, ids.shape[1])]
    assert max_diff(ours, theirs) <= 1e-4
    # Only relative positions matter, so the jump changes nothing: decoding on equals a cache that never jumped.
    fresh = SinkCache(S, W, model.config)
    with torch.inference_mode():
        model(ids[:, : S + W], cache=fresh)
    assert max_diff(ours, feed(model, fresh, ids[:, S + W:])) <= 1e-4


def test_reset_stream_makes_a_ragged_batch_that_matches_single_runs(device):
    model = tiny_model("mistral").to(device)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(2)).to(device)
    batched = SinkCache(S, W, model.config, device=device)
    feed(model, batched, ids[:, :150])
    batched.reset_stream(1)
    single0, single1 = SinkCache(S, W, model.config, device=device), SinkCache(S, W, model.config, device=device)
    feed(model, single0, ids[:1, :150])
    worst = 0.0
    with torch.inference_mode():
        for t in range(150, 300):
            mask = batched.slot_mask()
            got = model(ids[:, t:t + 1], cache=batched, position_ids=batched.position_ids(1),
                        attention_mask=mask).logits[:, -1]
            a = model(ids[:1, t:t + 1], cache=single0, position_ids=single0.position_ids(1)).logits[:, -1]
            b = model(ids[1:, t:t + 1], cache=single1, position_ids=single1.position_ids(1)).logits[:, -1]
            worst = max(worst, (got[0] - a[0]).abs().max().item(), (got[1] - b[0]).abs().max().item())
    assert worst <= 1e-4


def test_reset_empties_every_stream():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(3))
    cache = SinkCache(S, W, model.config)
    feed(model, cache, ids)
    cache.reset()
    assert cache.seen() == 0 and cache.get_seq_length() == 0
    assert max_diff(feed(model, cache, ids[:, :90]), feed(model, SinkCache(S, W, model.config), ids[:, :90])) == 0


# ---- memory ---------------------------------------------------------------------------------------------------------

def test_kv_bytes_is_what_the_buffers_hold():
    model = tiny_model("llama")  # 2 layers, 2 kv heads, head_dim 16, float32
    cache = SinkCache(S, W, model.config)
    assert cache.kv_bytes == 0
    feed(model, cache, torch.zeros(1, 3, dtype=torch.long))
    per_layer = 2 * (1 * 2 * (S + W) * 16 * 4)  # keys and values
    per_layer += 1 * 2 * S * 16 * 4  # pristine sink keys
    per_layer += 1 * 2 * S * 16 * 4  # and their half-swapped twins
    per_layer += 1 * 2 * W * (16 // 2) * 4  # scratch for re-basing the window
    assert cache.kv_bytes == 2 * per_layer


def decode_allocations(cache, model, steps):
    """Tensor allocations made by `cache.update` over `steps` single-token steps (as the model calls it)."""
    cfg = model.config
    heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    k, v = torch.randn(1, heads, 1, head_dim), torch.randn(1, heads, 1, head_dim)

    def run():
        for _ in range(steps):
            positions = cache.position_ids(1)
            for layer in range(cfg.num_hidden_layers):
                cache.update(k, v, layer, kwargs={"position_ids": positions})

    run()  # warm-up: the first step of each kind allocates its buffers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return [e.name for e in prof.events() if e.cpu_memory_usage > 0]


def test_decode_step_allocates_nothing_once_full():
    model = tiny_model("llama")
    cache = SinkCache(S, W, model.config, rebase_interval=16)
    feed(model, cache, torch.randint(0, 128, (1, S + W + 5)))
    allocations = decode_allocations(cache, model, steps=100)  # spans several re-bases
    assert allocations == []
    assert cache.ring.frame_base(0) > 0


def test_allocation_count_can_fail():
    """The counter sees allocations when there are some (a cache that concatenates would be caught)."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    dynamic = DynamicCache(config=model.config)
    cfg = model.config
    k = torch.randn(1, 2, 1, 16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            for layer in range(cfg.num_hidden_layers):
                dynamic.update(k, k, layer)
    assert any(e.cpu_memory_usage > 0 for e in prof.events())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(4))
    cpu = feed(model, SinkCache(S, W, model.config), ids)
    gpu_model = tiny_model("llama").cuda()
    cache = SinkCache(S, W, gpu_model)  # the model as config: positions go to its device from the first step
    gpu = feed(gpu_model, cache, ids.cuda())
    assert cache.kv.layers[0].keys.is_cuda
    assert max_diff(cpu, [g.cpu() for g in gpu]) <= 1e-3


def test_positions_before_the_first_forward_go_to_the_given_device():
    """Before any buffer exists the cache cannot know the model's device: `device=` (or the model as config) says
    where the first positions go ("meta" stands in for a GPU here)."""
    config = tiny_config("llama")
    assert SinkCache(S, W, config, device="meta").position_ids(3).device.type == "meta"
    assert SinkCache(S, W, config, batch_size=2, device="meta").position_ids(1).device.type == "meta"
    assert WindowCache(W, config, batch_size=2, device="meta").position_ids(5).device.type == "meta"
    assert SinkCache(S, W, config).position_ids(3).device.type == "cpu"


def test_rotation_tables_through_a_host_buffer_match_direct_ones():
    """Per-stream rotation angles are assembled on the host; off the CPU they travel through separate host buffers
    and one contiguous copy. Simulated here on the CPU: both ways give the model's own cos/sin."""
    from pystream.cache.rope import RotarySpec, RotationAngles

    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    rotary = RotarySpec(inv_freq=inv, rotary_dim=16)
    direct = RotationAngles(rotary, 2, torch.float32, torch.device("cpu"), 4)
    staged = RotationAngles(rotary, 2, torch.float32, torch.device("cpu"), 4)
    staged.cos_host, staged.sin_host = torch.empty_like(staged.cos_host), torch.empty_like(staged.sin_host)
    shifts = [-37, 2**33 + 5]  # different per stream: not served from the precomputed table
    (cos_a, sin_a), (cos_b, sin_b) = direct(shifts), staged(shifts)
    assert torch.equal(cos_a, cos_b) and torch.equal(sin_a, sin_b)
    angle = torch.tensor(shifts, dtype=torch.float64)[:, None] * inv
    angle = torch.remainder(angle, 2 * torch.pi)
    expected_cos = torch.cat((angle.cos(), angle.cos()), -1).float()
    expected_sin = torch.cat((-angle.sin(), angle.sin()), -1).float()
    assert torch.allclose(cos_b.view(2, 16), expected_cos) and torch.allclose(sin_b.view(2, 16), expected_sin)
