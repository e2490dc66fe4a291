"""What only a CUDA device can show (skipped without one). The oracles themselves run on CUDA too: every test that
takes the `device` fixture (test_oracle, test_cache_api) runs once on the CPU and once on the GPU.

- The decode step allocates nothing through the CUDA caching allocator once the cache is full.
- Positions travel to the GPU through one pinned buffer, copied asynchronously: they stay right while the host
  runs ahead of a busy stream.
- pystream-bench on `--device cuda` reports the GPU's memory and runs every method.
"""

import json

import pytest
import torch

from conftest import tiny_model
from pystream import SinkCache, WindowCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

S, W = 4, 64


def cuda_allocations(fn) -> int:
    """How many blocks the CUDA caching allocator handed out while `fn()` ran (reused blocks count too)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before


def decode_updates(cache, config, steps, k, v):
    def run():
        with torch.inference_mode():
            for _ in range(steps):
                positions = cache.position_ids(1)
                for layer in range(config.num_hidden_layers):
                    cache.update(k, v, layer, kwargs={"position_ids": positions})
    return run


@pytest.mark.parametrize("make", [lambda c: SinkCache(S, W, c, rebase_interval=16, device="cuda"),
                                  lambda c: WindowCache(W, c, device="cuda")], ids=["sink", "window"])
def test_decode_step_allocates_nothing_on_cuda(make):
    model = tiny_model("llama").cuda()
    config = model.config
    cache = make(config)
    with torch.inference_mode():
        for t in range(S + W + 5):
            model(torch.tensor([[t % 128]], device="cuda"), cache=cache, position_ids=cache.position_ids(1))
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    k, v = (torch.randn(1, heads, 1, head_dim, device="cuda") for _ in range(2))
    run = decode_updates(cache, config, 100, k, v)
    run()  # warm-up: the first step of each kind (re-base included) allocates its buffers
    assert cuda_allocations(run) == 0
    assert cache.ring.frame_base(0) > 0  # the timed steps re-based the frame


def test_allocation_counter_sees_a_concatenating_cache():
    from transformers import DynamicCache

    config = tiny_model("llama").config
    cache = DynamicCache(config=config)
    k = torch.randn(1, 2, 1, 16, device="cuda")

    def run():
        for _ in range(3):
            for layer in range(config.num_hidden_layers):
                cache.update(k, k, layer)

    assert cuda_allocations(run) > 0


def test_positions_stay_right_while_the_host_runs_ahead():
    """Keep the stream busy so that the host plans many steps before the GPU copies the first positions: each copy
    must still deliver its own step's positions (the pinned buffer is not overwritten under a pending copy)."""
    config = tiny_model("llama").config
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    on_gpu, on_cpu = SinkCache(S, W, config, device="cuda"), SinkCache(S, W, config)
    k = torch.randn(1, heads, 1, head_dim)
    k_gpu = k.cuda()
    steps = 3 * (S + W)  # past eviction and a re-base, so the positions change from step to step
    delivered, expected = [], []
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, against a few ms of host work below
    with torch.inference_mode():
        for _ in range(steps):
            positions = on_gpu.position_ids(1)
            delivered.append(positions.clone())  # queued behind the copy: holds what the copy delivered
            for layer in range(config.num_hidden_layers):
                on_gpu.update(k_gpu, k_gpu, layer, kwargs={"position_ids": positions})
            cpu_positions = on_cpu.position_ids(1)
            expected.append(int(cpu_positions))
            for layer in range(config.num_hidden_layers):
                on_cpu.update(k, k, layer, kwargs={"position_ids": cpu_positions})
    got = [int(p) for p in delivered]
    assert len(set(expected)) > S + W  # the positions did move
    assert got == expected


def test_bench_on_cuda_reports_gpu_memory(tmp_path, capsys):
    from conftest import save_tiny_model
    from conftest import read_records, run_cli

    folder = save_tiny_model(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "run"
    code, _, err = run_cli(["--model", folder, "--text", text, "--out", out, "--device", "cuda", "--dtype",
                            "bfloat16", "--lengths", "100,10k", "--cache-sizes", "32", "--steps", "4", "--warmup",
                            "1", "--ppl-tokens", "150", "--no-report"], capsys)
    assert code == 0, err
    records = read_records(out)
    cells = [r for r in records if r["record"] == "cell"]
    assert {c["method"] for c in cells} == {"sink", "window", "recompute", "dense"}
    for cell in cells:
        assert cell["status"] == "ok" and cell["device"].startswith("cuda")
        assert cell["cuda_max_allocated_bytes"] > 0
        assert cell["cuda_max_allocated_bytes"] >= cell["kv_bytes"]  # the GPU's peak, not the host's
    sink = next(c for c in cells if c["method"] == "sink" and c["length"] == 10 * 1024)
    assert sink["stream_position"] == 10 * 1024
    quality = {r["method"]: r["ppl"] for r in records if r["record"] == "quality"}
    assert set(quality) == {"sink", "window", "recompute", "dense"}
    assert all(p > 1 for p in quality.values())
    run = json.loads((out / "run.json").read_text())
    assert run["device"]["kind"] == "cuda" and run["device"]["name"] == torch.cuda.get_device_name(0)
