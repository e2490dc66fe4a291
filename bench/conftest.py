"""pytest-benchmark suites (not part of the unit tests: run `pytest bench`).

Every timing runs with one torch thread (the steadiest per-step timings on a shared machine). Ratios between
methods are gated inside the run that measured them (see test_ratio*), since absolute times differ between
machines; `--benchmark-compare-fail=median:10%` gates against a stored run of the same machine.
"""

import math
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
torch.set_num_threads(1)

# Fastest rounds measured in this session, by benchmark name, for the ratio gates. Gates compare minimums: on a
# shared machine interference only ever adds time, so the fastest of N rounds is the steadiest estimate of a cost,
# and a ratio of minimums moves with a real regression, not with a noisy neighbour.
MINIMUMS: dict[str, float] = {}
DISABLED: set[str] = set()  # benchmarks that ran with timing off (--benchmark-disable): no minimum to compare


@pytest.fixture
def record(benchmark):
    """Run the benchmark and keep its fastest round for the ratio gates; tag it with what it measured."""

    def run(fn, *, key: str, **info):
        benchmark.extra_info.update(info, threads=torch.get_num_threads(), torch=torch.__version__)
        result = benchmark(fn)
        if benchmark.stats is not None:
            MINIMUMS[key] = benchmark.stats.stats.min
        else:
            DISABLED.add(key)
        return result

    return run


def ratio(slow: str, fast: str) -> float:
    """min(slow) / min(fast), both measured in this run."""
    missing = [k for k in (slow, fast) if k not in MINIMUMS]
    if missing and all(k in DISABLED for k in missing):
        pytest.skip(f"timing is off (--benchmark-disable): nothing to compare for {missing}")
    if missing:  # a gate that quietly skips would pass a regression: not measured in this run is a failure
        pytest.fail(f"the ratio needs the benchmarks {missing} measured in the same run (run the whole module, "
                    "without -k narrowing it)")
    return MINIMUMS[slow] / MINIMUMS[fast]


def interleaved_gate(steps: dict, rounds: int, passes, trials: int = 3) -> None:
    """Time `steps` (name -> zero-argument callable) side by side, in interleaved rounds whose order alternates, so a
    slow spell of a shared machine lands on all of them; keep each one's fastest round (interference only ever adds
    time) and pass as soon as `passes(fastest)` holds for one trial. Ratios of minimums taken from separate
    benchmarks a minute apart drift by 2x on a busy CI machine (the sink update at 4,096 never hit its fast mode in
    954 rounds while the one at 256 did); a real regression fails every trial."""
    names = list(steps)
    measured = []
    for _ in range(trials):
        fastest = dict.fromkeys(names, math.inf)
        for round_ in range(rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                start = time.perf_counter()
                steps[name]()
                fastest[name] = min(fastest[name], time.perf_counter() - start)
        measured.append({k: f"{v * 1e6:.1f} us" for k, v in fastest.items()})
        if passes(fastest):
            return
    raise AssertionError(f"the gate failed in every one of {trials} trials; fastest rounds: {measured}")
