"""pystream: benchmark and profile streaming LLM inference with attention sinks (StreamingLLM).

`SinkCache` and `WindowCache` plug into Hugging Face transformers (`model(..., cache=...)`, `model.generate`);
`SinkRing` is the C++ bookkeeping core underneath them.
"""

import os as _os

if _os.environ.get("PYSTREAM_CORE"):
    # Load the C++ core from another build, e.g. the sanitizer build that .ci/run tests (see CMakeLists.txt).
    import importlib.util as _util
    import sys as _sys

    _spec = _util.spec_from_file_location(f"{__name__}._core", _os.environ["PYSTREAM_CORE"])
    _sys.modules[_spec.name] = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules[_spec.name])

from ._core import SinkRing  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "SinkCache": "cache.hf", "WindowCache": "cache.hf", "PaperCache": "cache.hf", "DynamicCache": "cache.hf",
    "UnsupportedModelError": "cache.hf",
    "StreamingKV": "cache.kv", "RotarySpec": "cache.kv",
    "prefill": "cache.streaming", "generate": "cache.streaming",
    "recompute_logits": "measure.baselines",
}


def __getattr__(name):
    # transformers takes seconds to import: load it only when a cache is asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pystream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["SinkRing", "__version__", *_LAZY]
