"""pystream: benchmark and profile streaming LLM inference with attention sinks (StreamingLLM).

`SinkCache` and `WindowCache` plug into Hugging Face transformers (`model(..., cache=...)`, `model.generate`);
`SinkRing` is the C++ bookkeeping core underneath them. Everything here loads on first use: `import pystream` (and
reading or reporting results) imports neither torch, transformers nor the C++ extension.

The package's layers, bottom to top (imports only go down; see ARCHITECTURE.md): `inputs` (models, texts),
`cache` (the engine), `measure` (the drivers), `results` (run directories), `report` (HTML), `cli`.
"""

__version__ = "0.1.0"

_LAZY = {
    "SinkCache": "cache.hf", "WindowCache": "cache.hf", "DynamicCache": "cache.hf",
    "UnsupportedModelError": "cache.hf", "streaming_cache": "cache.hf",
    "PaperCache": "cache.paper", "StreamBatch": "cache.batch",
    "StreamingKV": "cache.kv", "RotarySpec": "cache.rope",
    "prefill": "cache.streaming", "generate": "cache.streaming",
    "recompute_logits": "measure.baselines",
    "load_model": "inputs.models", "load_text": "inputs.texts",
}


def __getattr__(name):
    # transformers takes seconds to import, and a report needs neither it nor torch: load only what is asked for.
    if name == "SinkRing":
        from .cache.ring import core

        return core().SinkRing
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pystream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["SinkRing", "__version__", *_LAZY]
