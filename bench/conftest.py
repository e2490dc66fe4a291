"""pytest-benchmark suites (not part of the unit tests: run `pytest bench`).

Every timing runs with one torch thread (the steadiest per-step timings on a shared machine). Ratios between
methods are gated inside the run that measured them (see test_ratios_*), since absolute times differ between
machines; `--benchmark-compare-fail=median:10%` gates against a stored run of the same machine.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
torch.set_num_threads(1)

# Medians measured in this session, by benchmark name, for the ratio gates.
MEDIANS: dict[str, float] = {}


@pytest.fixture
def record(benchmark):
    """Run the benchmark and keep its median for the ratio gates; tag it with what it measured."""

    def run(fn, *, key: str, **info):
        benchmark.extra_info.update(info, threads=torch.get_num_threads(), torch=torch.__version__)
        result = benchmark(fn)
        if benchmark.stats is not None:
            MEDIANS[key] = benchmark.stats.stats.median
        return result

    return run


def median_ratio(slow: str, fast: str) -> float:
    missing = [k for k in (slow, fast) if k not in MEDIANS]
    if missing:
        pytest.skip(f"needs the benchmarks {missing} in the same run")
    return MEDIANS[slow] / MEDIANS[fast]
