"""The alternatives a user would pick instead of sink caching: context-window extension by RoPE scaling (through
transformers' own rope types), and the attention implementations the caches run with."""

import copy

import pytest
import torch

from conftest import tiny_model
from pystream import SinkCache, UnsupportedModelError
from pystream.cache.hf import rope_scaled
from conftest import run_cli


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def test_position_interpolation_divides_the_frequencies():
    """dense-pi:4 is exactly the model with every RoPE frequency divided by 4 (positions interpolated 4x)."""
    model = tiny_model("llama")
    manual = copy.deepcopy(model)
    manual.model.rotary_emb.inv_freq /= 4
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    rotary = model.model.rotary_emb
    with rope_scaled(model, "pi", 4):
        scaled = logits(model, ids)
        assert model.model.rotary_emb is not rotary
    assert model.model.rotary_emb is rotary  # put back
    assert (scaled - logits(manual, ids)).abs().max().item() <= 1e-5
    assert (scaled - logits(model, ids)).abs().max().item() > 1e-2


def test_dynamic_ntk_changes_nothing_inside_the_window_and_yarn_scales_attention():
    model = tiny_model("qwen2")  # max_position_embeddings 64
    short = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    long = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    with rope_scaled(model, "ntk", 4):
        ntk_short, ntk_long = logits(model, short), logits(model, long)
    assert (ntk_short - logits(model, short)).abs().max().item() <= 1e-6
    assert (ntk_long - logits(model, long)).abs().max().item() > 1e-3
    with rope_scaled(model, "yarn", 4):
        assert model.model.rotary_emb.attention_scaling > 1.0
        assert model.model.rotary_emb.rope_type == "yarn"


def test_scaling_refuses_what_it_cannot_do():
    from conftest import tiny_alibi_model

    with pytest.raises(ValueError, match="unknown RoPE scaling"):
        with rope_scaled(tiny_model("llama"), "longer", 2):
            pass
    with pytest.raises(UnsupportedModelError, match="no RoPE"):
        with rope_scaled(tiny_alibi_model("bloom"), "pi", 2):
            pass


def test_scaled_dense_methods_in_the_cli(tmp_path, capsys):
    from conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("And God saw the light, that it was good. " * 20)
    out = tmp_path / "run"
    args = ["--model", folder, "--text", text, "--out", out, "--methods", "dense,dense-pi:2,dense-yarn:2.5",
            "--lengths", "100", "--steps", "2", "--ppl-tokens", "150", "--no-report"]
    assert run_cli(args, capsys)[0] == 0
    import json

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scaling = {(r["record"], r["method"]): r.get("rope_scaling") for r in records}
    assert scaling[("cell", "dense-pi:2")] == {"type": "pi", "factor": 2.0}
    assert scaling[("quality", "dense-yarn:2.5")] == {"type": "yarn", "factor": 2.5}
    assert scaling[("cell", "dense")] is None
    ppl = {r["method"]: r["ppl"] for r in records if r["record"] == "quality"}
    assert len(set(ppl.values())) == 3  # the scalings change the model
    for bad, message in (("dense-pi:0.5", "factor must be >= 1"), ("dense-rope:2", "unknown method")):
        code, _, stderr = run_cli(["--methods", bad, "--out", tmp_path / "bad"], capsys)
        assert code == 2 and message in stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA device")
def test_flash_attention_matches_sdpa():
    pytest.importorskip("flash_attn")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2)).cuda()
    results = []
    for impl in ("sdpa", "flash_attention_2"):
        model = tiny_model("llama").cuda().to(torch.bfloat16)
        model.set_attn_implementation(impl)
        cache = SinkCache(4, 64, model.config)
        with torch.inference_mode():
            results.append(torch.stack([model(ids[:, t:t + 1], cache=cache,
                                              position_ids=cache.position_ids(1)).logits[0, -1].float()
                                        for t in range(ids.shape[1])]))
    assert (results[0] - results[1]).abs().max().item() <= 5e-2
