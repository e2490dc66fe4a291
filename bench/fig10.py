"""The paper's Figure 10 (per-token decoding latency and memory: StreamingLLM against sliding window with
re-computation, at caches 256..4,096), compiled, on a model of Llama-2-7B's shape with random bfloat16 weights built
on the device (a step's cost does not depend on the weights' values; nothing is downloaded).

    python bench/fig10.py --device cuda --out OUT_DIR             # the H200 run (bench/gpu_compile_check.sh)
    python bench/fig10.py --device cpu --tiny --out /tmp/fig10    # the same code paths on a tiny model, any machine

Writes OUT_DIR/fig10.jsonl, one line per (method, cache) as it finishes (a run cut short keeps what it measured),
and prints a table with the sink-over-recompute ratio at each cache beside the paper's (22.2x at 4,096: Llama-2-13B
on an A6000). Cells run largest cache first, so the headline ratio comes first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PAPER_RATIO_4096 = 22.2  # Figure 10: 65.0 ms (StreamingLLM) vs 1,411 ms (sliding window with re-computation)
SINKS = 4


def build_model(device: str, tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096)
        dtype = torch.float32
    else:  # Llama-2-7B's shape
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                             rope_theta=10000.0)
        dtype = torch.bfloat16
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built on the device: 13.5 GB of bfloat16 never crosses the bus
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, device) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def sink_cell(model, config, capacity: int, steps: int, device) -> dict:
    from pystream import SinkCache
    from pystream.cache.hf import compiled_decoder

    gen = torch.Generator().manual_seed(capacity)
    ids = torch.randint(0, config.vocab_size, (1, capacity + steps + 2), generator=gen).to(device)
    cache = SinkCache(SINKS, capacity - SINKS, model.config, device=device)
    with torch.inference_mode():
        model(ids[:, :capacity], cache=cache, position_ids=cache.position_ids(capacity, device))
        decoder = compiled_decoder(model, cache)
        position = capacity

        def step():
            nonlocal position
            decoder(ids[:, position:position + 1])
            position += 1

        _timed(step, 2, device)  # compile, record the graph
        times = _timed(step, steps, device)
    return dict(method="sink", cache=capacity, compile_s=decoder.compile_s, compiled=decoder.eager_steps == 0,
                kv_bytes=cache.kv_bytes, times_ms=times)


def recompute_cell(model, config, capacity: int, steps: int, device) -> dict:
    from pystream.measure.baselines import compiled_recompute

    gen = torch.Generator().manual_seed(capacity)
    ids = torch.randint(0, config.vocab_size, (1, capacity + steps + 2), generator=gen).to(device)
    decoder = compiled_recompute(model, capacity, 1, device)
    with torch.inference_mode():
        position = capacity

        def step():
            nonlocal position
            decoder(ids[:, position - capacity + 1:position + 1])
            position += 1

        _timed(step, 2, device)
        times = _timed(step, steps, device)
    return dict(method="recompute", cache=capacity, compile_s=decoder.compile_s, compiled=True, kv_bytes=0,
                times_ms=times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama in float32 (checks the code paths anywhere)")
    p.add_argument("--caches", default="4096,2048,1024,512,256")
    p.add_argument("--sink-steps", type=int, default=32)
    p.add_argument("--recompute-steps", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("fig10: no CUDA device here; use --device cpu --tiny to check the code paths", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cpu":
        # one thread: inductor's kernels spin in OpenMP barriers when another process holds a core
        torch.set_num_threads(1)
    caches = [int(c) for c in args.caches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, config = build_model(args.device, args.tiny)
    print(f"model built in {time.perf_counter() - started:.1f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {next(model.parameters()).dtype}",
          flush=True)
    rows = {}
    with open(out / "fig10.jsonl", "a") as results:
        for capacity in caches:
            for cell in (sink_cell, recompute_cell):
                _reset_peak(args.device)
                steps = args.sink_steps if cell is sink_cell else args.recompute_steps
                rec = cell(model, config, capacity, steps, args.device)
                rec.update(p50_ms=statistics.median(rec["times_ms"]), min_ms=min(rec["times_ms"]),
                           peak_allocated_bytes=_peak(args.device), device=args.device,
                           model="tiny-llama" if args.tiny else "llama-2-7b-shape-random-bf16",
                           elapsed_s=time.perf_counter() - started)
                results.write(json.dumps(rec) + "\n")
                results.flush()
                rows[(rec["method"], capacity)] = rec
                print(f"{rec['method']:>9} {capacity:>5}: p50 {rec['p50_ms']:8.2f} ms/token, compile "
                      f"{rec['compile_s']:.1f} s, peak {(rec['peak_allocated_bytes'] or 0) / 2**30:.2f} GiB "
                      f"[{rec['elapsed_s']:.0f} s]", flush=True)
    print("\ncache | sink ms | recompute ms | ratio | paper")
    for capacity in sorted(caches):
        sink, rec = rows.get(("sink", capacity)), rows.get(("recompute", capacity))
        if sink and rec:
            ratio = rec["p50_ms"] / sink["p50_ms"]
            paper = f"{PAPER_RATIO_4096}x (Llama-2-13B, A6000)" if capacity == 4096 else ""
            print(f"{capacity:>5} | {sink['p50_ms']:7.2f} | {rec['p50_ms']:12.2f} | {ratio:5.1f}x | {paper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
