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

_NAME = "pystream._core"

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
    """A `SinkRing` and its step outputs: (ring, {name: int64 [streams]}), read-only views of the arrays the ring owns
    and each `step()` overwrites (slot, sink_shift, pending_shift, occupied); the core never writes into memory of
    ours, and the views keep the ring alive."""
    ring = core().SinkRing(num_streams, num_sinks, window, rebase_interval)
    return ring, ring.outputs
