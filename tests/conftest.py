import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# One thread: steadier timings and no oversubscription on the 2-core CI machine.
torch.set_num_threads(1)

ARCHS = ("llama", "mistral", "qwen2", "gpt_neox")
# Tests that take `device` run on the CPU everywhere and again on a CUDA device where there is one.
DEVICES = ("cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]))


def tiny_config(arch: str, **overrides):
    """A tiny random-weight config of one of the supported architectures. The weights are drawn wide enough
    (initializer_range=0.1) that attention is peaked and positions matter, small enough that float32 stays tame."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, intermediate_size=128, initializer_range=0.1)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        return MistralConfig(**{"num_key_value_heads": 2, "sliding_window": None, **common})
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, **common)  # partial rotary: 4 of 16 features per head
    raise ValueError(arch)


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.eval()
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
