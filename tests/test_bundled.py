"""The bundled SmolLM2-135M on the bundled KJV text, offline (CI runs these; they take a few minutes)."""

import numpy as np
import pytest
import torch

from pystream import SinkCache, WindowCache
from pystream.inputs.texts import load_text, tokenize
from pystream.inputs.models import load_model
from pystream.measure.quality import nll_dense, nll_streaming, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    loaded = load_model(None)
    ids = tokenize(load_text(), loaded.tokenizer)
    return loaded, ids


def test_bundled_model_and_text_load_offline(bundled):
    loaded, ids = bundled
    assert loaded.kind == "bundled" and loaded.model.config.model_type == "llama"
    assert loaded.model.config.max_position_embeddings == 8192
    assert ids.size > 1_000_000  # the whole Bible, about a million tokens
    assert loaded.tokenizer.decode(ids[:5].tolist()).startswith("In the beginning God")


def test_sinks_rescue_window_attention_on_real_text(bundled):
    """1,280 tokens streamed with a cache of 256: window attention collapses once the first tokens are evicted,
    sink attention stays close to dense (the paper's central finding, on our bundled model)."""
    loaded, ids = bundled
    model = loaded.model
    x = torch.from_numpy(ids[:1280].astype(np.int64))
    dense = perplexity(nll_dense(model, x)[256:])
    sink = perplexity(nll_streaming(model, SinkCache(4, 252, model.config), x)[256:])
    window = perplexity(nll_streaming(model, WindowCache(256, model.config), x)[256:])
    print(f"PPL over tokens 257..1280: dense {dense:.3f}, sink 4+252 {sink:.3f}, window 256 {window:.3f}")
    assert window >= 1.5 * sink
    assert abs(sink - dense) <= 0.15 * dense


def test_readme_example_runs(bundled):
    """The README's example, as written, except for the number of new tokens (10,000 takes ~10 minutes here)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "max_new_tokens=10_000" in code
    code = code.replace("max_new_tokens=10_000", "max_new_tokens=300, min_new_tokens=300")
    code = code.replace("SinkCache(num_sinks=4, window=1020,", "SinkCache(num_sinks=4, window=60,")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out, prompt = namespace["out"], namespace["prompt"]
    assert out.shape[1] == prompt.shape[1] + 300
    assert namespace["cache"].seen() > namespace["cache"].capacity  # it streamed past the cache


def test_paper_findings_direction_on_a_short_stream(bundled):
    """Findings 1 and 2 through the experiment's own code, over 768 tokens at a total cache of 128: window attention
    (0 sinks) is far worse than 4 sinks, and one sink already recovers most of the gap."""
    from pystream.measure.experiments import PaperConfig, PaperExperiment
    from conftest import InterruptAfter, Writer

    loaded, ids = bundled
    cfg = PaperConfig(parts=("sinks",), tokens=768, cache=128, sink_counts=(0, 1, 4))
    writer = Writer()
    PaperExperiment(cfg, loaded.model, ids, writer, InterruptAfter(), "cpu", None).run()
    ppl = {r["sinks"]: r["ppl"] for r in writer.records}
    print("PPL over 768 tokens, cache 128, by sinks:", ppl)
    assert ppl[0] >= 1.5 * ppl[4]
    assert ppl[1] < ppl[0]
