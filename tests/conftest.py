import json
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


def tiny_alibi_model(arch, attn="eager", seed=0):
    from transformers import AutoModelForCausalLM, BloomConfig, MptConfig

    if arch == "bloom":
        config = BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.1)
    else:
        config = MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=256,
                           initializer_range=0.1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# ---- a tiny model folder and a short text, for pystream-bench end to end ----

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
        "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ") * 4


def char_tokenizer():
    """A character-level tokenizer built offline (ids 0..127 = ASCII), for the tiny models."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab["[UNK]"] = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def save_tiny_model(folder, arch="llama"):
    """A tiny random model and the character tokenizer, saved as a transformers folder."""
    tiny_model(arch).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "genesis.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ---- driving pystream-bench and the drivers from tests ----

def run_cli(args, capsys):
    """pystream-bench in this process: (exit code, stdout, stderr)."""
    from pystream.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def tiny_args(model_dir, text, out, *extra):
    return ["--model", model_dir, "--text", text, "--out", out, "--lengths", "100,1k", "--cache-sizes", "16,32",
            "--steps", "4", "--warmup", "1", "--ppl-tokens", "120", "--no-report", *extra]


class InterruptAfter:
    """A stand-in for the rich progress bar that interrupts the run after some steps."""

    def __init__(self, steps=None):
        self.steps, self.count = steps, 0

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        self.count += 1
        if self.steps is not None and self.count == self.steps:
            raise KeyboardInterrupt

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass


class Writer:
    def __init__(self):
        self.records = []

    def done(self, key):
        return None

    def append(self, rec):
        self.records.append(rec)
