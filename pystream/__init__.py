"""pystream: benchmark and profile streaming LLM inference with attention sinks (StreamingLLM).

`SinkCache` and `WindowCache` plug into Hugging Face transformers (`model(..., cache=...)`, `model.generate`);
`SinkRing` is the C++ bookkeeping core underneath them.
"""

from ._core import SinkRing

__version__ = "0.1.0"

_LAZY = {
    "SinkCache": "hf", "WindowCache": "hf", "PaperCache": "hf", "DynamicCache": "hf", "UnsupportedModelError": "hf",
    "StreamingKV": "kv", "RotarySpec": "kv",
    "prefill": "streaming", "generate": "streaming",
    "recompute_logits": "baselines",
}


def __getattr__(name):
    # transformers takes seconds to import: load it only when a cache is asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pystream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["SinkRing", "__version__", *_LAZY]
