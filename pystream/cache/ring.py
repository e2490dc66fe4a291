"""The adapter to the C++ core (`pystream._core`, nanobind): loaded on first use, never at `import pystream`, so that
reading results or rendering a report needs neither the extension nor torch.

`PYSTREAM_CORE=/path/to/_core.so` loads the core from another build, e.g. the sanitizer build that .ci/run tests
(see CMakeLists.txt).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import numpy as np

_NAME = "pystream._core"

# The per-stream outputs `SinkRing.step()` writes into bound arrays (one int64 per stream), read by StreamingKV.
OUTPUTS = ("slot", "evicted", "position", "sink_shift", "pending_shift", "occupied")


def core():
    """The C++ extension module, loaded once."""
    module = sys.modules.get(_NAME)
    if module is not None:
        return module
    path = os.environ.get("PYSTREAM_CORE")
    if not path:
        return importlib.import_module(_NAME)
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = sys.modules[_NAME] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_ring(num_streams: int, num_sinks: int, window: int, rebase_interval: int):
    """A `SinkRing` with its step outputs bound to numpy arrays it fills in place: (ring, {name: int64 [streams]})."""
    ring = core().SinkRing(num_streams, num_sinks, window, rebase_interval)
    outputs = {name: np.zeros(num_streams, dtype=np.int64) for name in OUTPUTS}
    ring.bind_outputs(**outputs)
    return ring, outputs
