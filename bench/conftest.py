"""pytest-benchmark suites (not part of the unit tests: run `pytest bench`).

Every timing runs with one torch thread (the steadiest per-step timings on a shared machine). Ratios between
methods are gated inside the run that measured them (see test_ratio*), since absolute times differ between
machines; `--benchmark-compare-fail=median:10%` gates against a stored run of the same machine.
"""

import os
import sys

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
