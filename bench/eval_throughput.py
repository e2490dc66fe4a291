"""One-off measurement (not a CI step): what bounds a long exact-perplexity run of the chunked evaluator.

    python bench/eval_throughput.py --threads 2 --tokens 16384            # float32 and bfloat16, 4+252

Prints the evaluator's tokens/s on the bundled SmolLM2-135M over the bundled text (a progress line with tokens/s and
ETA while it runs), the model's FLOPs per token (2 x the parameters of every matrix multiply, the LM head included;
the attention's own FLOPs at the cache size beside it), and the float32 / bfloat16 matmul rate this CPU reaches with
the same threads (torch.matmul of two 4096 x 4096 matrices), so that the time of a 1M-token run can be read as
compute-bound or not. On a shared machine, run it when nothing else is.
"""

import argparse
import sys
import time

import numpy as np
import torch


def matmul_gflops(dtype, size=4096, repeats=5):
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pystream.inputs.texts import load_text, tokenize
    from pystream.measure.evaluator import stream_nll
    from pystream.inputs.models import load_model

    loaded = load_model(None)
    text_ids = tokenize(load_text(), loaded.tokenizer)
    # the text cycles when the stream is longer than it (the bundled one is 1,022,545 tokens), as in pystream-bench
    ids = torch.from_numpy(np.resize(text_ids, args.tokens + 1).astype(np.int64))
    config = loaded.model.config
    matmul_params = sum(m.weight.numel() for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = config.hidden_size // config.num_attention_heads
    attention_flops = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * (args.sinks + args.window)
    print(f"model: {matmul_params / 1e6:.1f} M matmul parameters -> {2 * matmul_params / 1e6:.0f} MFLOP/token "
          f"+ attention {attention_flops / 1e6:.0f} MFLOP/token at {args.sinks}+{args.window}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = loaded.model.to(dtype)
        stream_nll(model, ids[:1024], num_sinks=args.sinks, window=args.window)  # warm the kernels
        started = time.perf_counter()

        def progress(done, total):
            rate = done / (time.perf_counter() - started)
            sys.stderr.write(f"\r{name}: {done}/{total} tokens, {rate:.0f} tokens/s, ETA {(total - done) / rate:.0f} s")

        result = stream_nll(model, ids, num_sinks=args.sinks, window=args.window, on_progress=progress)
        seconds = time.perf_counter() - started
        rate = result.tokens_fed / seconds
        gflops = matmul_gflops(dtype)
        needed = (2 * matmul_params + attention_flops) * rate / 1e9
        sys.stderr.write("\n")
        print(f"{name}, {args.threads} threads, {args.sinks}+{args.window}: {result.tokens_fed:,} tokens in "
              f"{seconds / 60:.1f} min, {rate:.0f} tokens/s (1M tokens: {2 ** 20 / rate / 60:.1f} min), PPL {result.ppl:.3f}; model FLOPs at that rate "
              f"{needed:.0f} GFLOP/s, matmul reaches {gflops:.0f} GFLOP/s ({needed / gflops:.0%} of it)")
    loaded.model.to(torch.float32)


if __name__ == "__main__":
    main()
