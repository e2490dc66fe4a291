"""Soak: stream a million real tokens through SinkCache and check that nothing is lost, leaks or drifts.

A tiny random-weight Llama on the CPU, token by token through the model, with the cache's own positions. Every
`--sample-every` tokens it samples the process RSS and checks the core's counters against exact arithmetic; at the
end it checks that RSS stayed flat (within 1% of the first sample), and that over the last 500 steps the logits
equal the paper's algorithm (tests/reference.py) started from the same cache contents.

    python bench/soak.py                      # 1,048,576 tokens (~20 minutes on a 2-core CPU)
    python bench/soak.py --tokens 65536       # the short version CI runs

Prints one JSON line per sample and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from conftest import tiny_model  # noqa: E402
from pystream import SinkCache  # noqa: E402
from pystream.measure.clocks import rss_bytes  # noqa: E402
from reference import reference_from  # noqa: E402

S, W = 4, 60
CHECK_STEPS = 500


def check_counters(cache, seen):
    ring = cache.ring
    capacity = S + W
    problems = []
    if ring.seen(0) != seen:
        problems.append(f"seen {ring.seen(0)} != {seen}")
    if ring.evicted_count(0) != max(0, seen - capacity):
        problems.append(f"evicted {ring.evicted_count(0)} != {max(0, seen - capacity)}")
    # positions handed out stay <= max_position; after the step that used the last one, the next is one more
    if not 0 <= ring.next_position(0) <= ring.max_position + 1:
        problems.append(f"next position {ring.next_position(0)} outside 0..{ring.max_position + 1}")
    held = sorted(ring.token_in_slot(0, s) for s in range(capacity))
    expected = list(range(min(S, seen))) + list(range(max(S, seen - W), seen))
    if held != expected:
        problems.append("the slots do not hold the first S and the last W tokens")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--sample-every", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tokens <= CHECK_STEPS + S + W:
        parser.error(f"--tokens must be more than {CHECK_STEPS + S + W}")
    torch.set_num_threads(1)
    model = tiny_model("llama", seed=args.seed)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    cache = SinkCache(S, W, model.config)
    samples, failures = [], []
    start = time.perf_counter()
    compare_from = args.tokens - CHECK_STEPS
    reference, worst = None, 0.0
    # One token buffer, refilled in place: the soak itself must not churn the allocator it is watching.
    block = torch.empty(1, args.sample_every, dtype=torch.long)
    with torch.inference_mode():
        for t in range(args.tokens):
            i = t % args.sample_every
            if i == 0:
                torch.randint(0, vocab, (1, args.sample_every), generator=generator, out=block)
            x = block[:, i:i + 1]
            if t == compare_from:
                reference = reference_from(cache, model)
            logits = model(x, cache=cache, position_ids=cache.position_ids(1)).logits
            if reference is not None:
                expected = model(x, cache=reference).logits
                worst = max(worst, (expected - logits).abs().max().item())
            if (t + 1) % args.sample_every == 0 or t + 1 == args.tokens:
                problems = check_counters(cache, t + 1)
                sample = {"tokens": t + 1, "rss_bytes": rss_bytes(), "elapsed_s": round(time.perf_counter() - start, 1),
                          "frame_base": cache.ring.frame_base(0), "next_position": cache.ring.next_position(0),
                          "counters_ok": not problems}
                samples.append(sample)
                failures += [f"at {t + 1} tokens: {p}" for p in problems]
                print(json.dumps(sample), flush=True)
    first = samples[0]["rss_bytes"]
    drift = max(abs(s["rss_bytes"] - first) / first for s in samples[1:]) if len(samples) > 1 else 0.0
    if drift > 0.01:
        failures.append(f"RSS moved {100 * drift:.2f}% from the first sample (allowed 1%)")
    if worst > 1e-4:
        failures.append(f"last {CHECK_STEPS} steps: logits differ from the reference by {worst:.2e} (allowed 1e-4)")
    summary = {"tokens": args.tokens, "wall_s": round(time.perf_counter() - start, 1),
               "rss_bytes": [s["rss_bytes"] for s in samples], "rss_max_drift_pct": round(100 * drift, 3),
               "last_steps_max_abs_logit_diff": worst, "ok": not failures}
    print(json.dumps({"summary": summary}), flush=True)
    for failure in failures:
        print(f"soak: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
