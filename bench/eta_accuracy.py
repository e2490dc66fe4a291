"""How honest the overall ETA is: runs pystream-bench in this process, samples the ETA the bar shows (the plan's
remaining seconds) every 0.25 s, and compares it at 25/50/75% of the run's time with the time that really remained;
beside it the old estimate from counting items (elapsed / items done x items left).

    python bench/eta_accuracy.py --lengths 2k,8k --cache-sizes 256,512 --steps 16 --ppl-tokens 512 --out /tmp/r
"""

import sys
import threading
import time

import pystream.measure.eta as eta
from pystream.cli import main

plans, samples, stop = [], [], threading.Event()
original = eta.plan_bench


def capture(*args, **kwargs):
    plan = original(*args, **kwargs)
    plans.append(plan)
    return plan


def sample(started):
    while not stop.wait(0.25):
        if plans:
            plan = plans[0]
            try:
                samples.append((time.perf_counter() - started, plan.remaining_s(), len(plan.finished),
                                len(plan.finished) + len(plan.pending)))
            except (ValueError, RuntimeError):  # lists changing under us: skip this sample
                pass


eta.plan_bench = capture
argv = sys.argv[1:] + ["--no-report"]
thread = None
started = time.perf_counter()
thread = threading.Thread(target=sample, args=(started,), daemon=True)
thread.start()
code = main(argv)
stop.set()
thread.join()
# the bar's clock: from the plan's first item to the end of its last
first = min(t for t, *_ in samples)
end = time.perf_counter() - started
plan = plans[0]
bar_start = end - sum(s for _, s in plan.finished)
total = end - bar_start
print(f"exit {code}; items {len(plan.finished)}; bar from {bar_start:.1f} s to {end:.1f} s ({total:.1f} s)")
print(f"{'at':>5} {'elapsed_s':>9} {'actual_left_s':>13} {'eta_shown_s':>11} {'error':>7} {'count_eta_s':>11} "
      f"{'error':>7}")
for share in (0.25, 0.5, 0.75):
    t = bar_start + share * total
    at, remaining, done, items = min(samples, key=lambda s: abs(s[0] - t))
    actual = end - at
    spent = at - bar_start
    counted = spent / done * (items - done) if done else float("nan")
    print(f"{share:5.0%} {spent:9.1f} {actual:13.1f} {remaining:11.1f} {(remaining - actual) / actual:+7.0%} "
          f"{counted:11.1f} {(counted - actual) / actual:+7.0%}")
