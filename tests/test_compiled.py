"""The compiled decode step (pystream.cache.compiled, torch.compile) against the eager one: same logits over 2,000
steps through every wrap-around and re-base, for sink and window; and a broken variant of the compiled step's
bookkeeping that the same check catches."""

import json

import pytest
import torch

from pystream import SinkCache, WindowCache
from pystream.cache.hf import CompileUnsupported, compiled_decoder, static_cache

from conftest import DEVICES, tiny_model

SINKS, WINDOW, REBASE = 4, 28, 12  # capacity 32: the ring wraps every 28 tokens and re-bases every 12
STEPS = 2000
PREFILL = 6
TOL = 1e-4


def _pair(kind, model, device):
    make = (lambda: SinkCache(SINKS, WINDOW, model.config, rebase_interval=REBASE, device=device)) \
        if kind == "sink" else (lambda: WindowCache(SINKS + WINDOW, model.config, rebase_interval=REBASE,
                                                    device=device))
    return make(), make()


def _stream(model, kind, device, steps, broken=frozenset()):
    """Largest |compiled - eager| logit difference per step, over `steps` decode steps after a short prefill."""
    eager, compiled = _pair(kind, model, device)
    tokens = torch.randint(0, model.config.vocab_size, (1, PREFILL + steps),
                           generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        for cache in (eager, compiled):
            model(tokens[:, :PREFILL], cache=cache, position_ids=cache.position_ids(PREFILL, device))
        decoder = compiled_decoder(model, compiled)
        decoder.state._skip = frozenset(broken)
        diffs, rebases = [], 0
        for t in range(PREFILL, PREFILL + steps):
            x = tokens[:, t:t + 1]
            want = model(x, cache=eager, position_ids=eager.position_ids(1, device)).logits
            got = decoder(x)
            diffs.append((got - want).abs().max().item())
            rebases += eager.kv._step.rebase is not None
    return diffs, decoder, eager, rebases


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("kind", ["sink", "window"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matches_eager_over_2000_steps(kind, device):
    model = tiny_model("llama").to(device)  # its own copy: the module's model stays on the CPU
    diffs, decoder, eager, rebases = _stream(model, kind, device, STEPS)
    assert max(diffs) <= TOL, f"step {diffs.index(max(diffs))}: {max(diffs):.2e}"
    # The stream wrapped the ring and re-based its frame many times, and (past the sinks) took the compiled step.
    assert eager.seen() == PREFILL + STEPS and eager.seen() > 50 * WINDOW
    assert rebases >= 100
    assert decoder.compiled_steps == STEPS and decoder.eager_steps == 0
    assert decoder.compile_s > 0


def test_partial_rotary_model(arch_partial="gpt_neox"):
    """GPT-NeoX rotates a quarter of each head: the compiled sink placement keeps the rest as stored."""
    model = tiny_model(arch_partial)
    diffs, decoder, *_ = _stream(model, "sink", "cpu", 4 * (SINKS + WINDOW))
    assert max(diffs) <= TOL and decoder.compiled_steps == 4 * (SINKS + WINDOW)


def test_eager_attention_takes_an_additive_mask():
    """With eager attention the static mask is additive (0 / the dtype's lowest): same logits as the eager step."""
    model = tiny_model("llama", attn="eager")
    diffs, decoder, *_ = _stream(model, "sink", "cpu", 4 * (SINKS + WINDOW))
    assert max(diffs) <= TOL and decoder.state.mask.dtype == torch.float32


@pytest.mark.parametrize("broken", ["slot", "sinks", "rebase", "positions"])
def test_check_fails_on_broken_compiled_step(model, broken):
    """Each piece the bookkeeping hands the compiled step, left stale, makes the check above fail (sink cache; the
    same stream passes in test_compiled_matches_eager_over_2000_steps)."""
    diffs, *_ = _stream(model, "sink", "cpu", 3 * (SINKS + WINDOW), broken={broken})
    assert max(diffs) > 1e-2, f"a stale {broken} went unnoticed: {max(diffs):.2e}"


def test_compiled_step_has_no_graph_break(model):
    """The whole step is one graph (fullgraph=True would raise otherwise); checked here with dynamo's explain."""
    cache = SinkCache(SINKS, WINDOW, model.config, rebase_interval=REBASE)
    with torch.inference_mode():
        model(torch.arange(PREFILL)[None], cache=cache, position_ids=cache.position_ids(PREFILL))
        decoder = compiled_decoder(model, cache)
        decoder.state.prepare()
        from pystream.cache.hf import CompiledStreamingCache

        static = CompiledStreamingCache(decoder.state)

        def forward(x):
            return model(x, position_ids=decoder.state.positions, cache=static,
                         attention_mask=decoder.state.mask).logits

        explained = torch._dynamo.explain(forward)(torch.tensor([[3]]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_first_tokens_go_eager_then_compiled(model):
    """A cache with no tokens yet: the sinks are written by eager steps, then the compiled step takes over."""
    eager, compiled = _pair("sink", model, "cpu")
    decoder = compiled_decoder(model, compiled)
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for t in range(40):
            x = tokens[:, t:t + 1]
            want = model(x, cache=eager, position_ids=eager.position_ids(1)).logits
            assert (decoder(x) - want).abs().max().item() <= TOL
    assert decoder.eager_steps == SINKS and decoder.compiled_steps == 40 - SINKS


def test_static_cache_compiles(model):
    """transformers' StaticCache through the same decoder equals its eager step."""
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    eager, compiled = static_cache(model, 16), static_cache(model, 16)
    with torch.inference_mode():
        for cache in (eager, compiled):
            model(tokens[:, :4], cache=cache)
        decoder = compiled_decoder(model, compiled)
        for t in range(4, 12):
            want = model(tokens[:, t:t + 1], cache=eager).logits
            assert (decoder(tokens[:, t:t + 1]) - want).abs().max().item() <= TOL


def test_uncompilable_caches_are_refused(model):
    from transformers import DynamicCache

    with pytest.raises(CompileUnsupported, match="DynamicCache"):
        compiled_decoder(model, DynamicCache(config=model.config))
    with pytest.raises(CompileUnsupported, match="config="):
        compiled_decoder(model, WindowCache(8))
    from conftest import tiny_alibi_model

    bloom = tiny_alibi_model("bloom")
    cache = SinkCache(SINKS, WINDOW, bloom.config)
    with pytest.raises(CompileUnsupported, match="ALiBi"):
        compiled_decoder(bloom, cache)


# ---- pystream-bench --compile -------------------------------------------------------------------------------------
def test_bench_compile_records_and_profile(tiny_model_dir, text_file, tmp_path, capsys):
    """--compile: sink, window and recompute time the compiled step (records say so, compile time apart), dense
    runs eager and says so; --profile counts the ATen ops of a step, eager beside compiled."""
    from conftest import read_records, run_cli, tiny_args

    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, text_file, out, "--lengths", "200", "--cache-sizes", "32", "--ppl-tokens",
                     "0", "--compile", "--profile", "--profile-steps", "2", "--methods", "sink,window,recompute,dense")
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    cells = {r["method"]: r for r in read_records(out)}
    for name in ("sink", "window", "recompute"):
        cell = cells[name]
        assert cell["status"] == "ok" and cell["compiled"] is True and cell["compile_s"] > 0, cell
        assert cell["timed_steps"] == 4
        eager_ops = cell["profile"]["aten_ops_per_step"]
        compiled_ops = cell["profile"]["compiled"]["aten_ops_per_step"]
        assert 0 < compiled_ops < eager_ops / 2, (name, eager_ops, compiled_ops)
    assert cells["dense"]["compiled"] is False and cells["dense"]["compile_s"] is None
    assert json.loads((out / "run.json").read_text())["config"]["compile"] is True


def test_bench_compile_refuses_experiments(tiny_model_dir, text_file, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "run"
    code, _, stderr = run_cli(["--model", tiny_model_dir, "--text", text_file, "--out", out, "--experiment",
                               "paper", "--compile"], capsys)
    assert code == 2 and "--compile" in stderr and stderr.strip().count("\n") == 0, stderr
    assert not out.exists()
