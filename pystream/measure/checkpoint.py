"""Checkpoints of a cache in the middle of a long `--mode stream` cell, so that `--resume` picks the stream up where
it stopped. Tensors in safetensors (never pickle), the rest in its JSON metadata; written atomically."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..cache.hf import DynamicCache, StreamingCache, dense_layers
from .._files import write_atomic


def save(path: Path, cache) -> None:
    tensors, meta = {}, {}
    if isinstance(cache, StreamingCache):
        snap = cache.snapshot()
        meta = {"kind": "streaming", "geometry": list(snap["geometry"]),
                "ring": base64.b64encode(snap["ring"]).decode(), "present": [s is not None for s in snap["layers"]],
                "sink_shift": [None if s is None else s[3] for s in snap["layers"]],
                "valid": None if snap["valid"] is None else snap["valid"].tolist()}
        for i, state in enumerate(snap["layers"]):
            if state is not None:
                tensors[f"{i}.keys"], tensors[f"{i}.values"] = state[0], state[1]
                if state[2] is not None:
                    tensors[f"{i}.sinks"] = state[2]
    elif isinstance(cache, DynamicCache):
        layers = dense_layers(cache)
        meta = {"kind": "dynamic", "layers": len(layers)}
        for i, (keys, values) in enumerate(layers):
            tensors[f"{i}.keys"], tensors[f"{i}.values"] = keys, values
    else:
        raise TypeError(f"cannot checkpoint a {type(cache).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"pystream": json.dumps(meta)}))


def load(path: Path, cache, device) -> None:
    """Fill a fresh `cache` of the same kind and geometry from the checkpoint at `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["pystream"])
    tensors = load_file(str(path), device=str(device))
    if meta["kind"] == "streaming":
        layers = []
        for i, present in enumerate(meta["present"]):
            layers.append(None if not present else (tensors[f"{i}.keys"], tensors[f"{i}.values"],
                                                    tensors.get(f"{i}.sinks"), meta["sink_shift"][i]))
        snap = {"geometry": tuple(meta["geometry"]), "ring": base64.b64decode(meta["ring"]), "layers": layers,
                "valid": None if meta["valid"] is None else torch.tensor(meta["valid"], dtype=torch.bool)}
        cache.restore(snap, device)
    else:
        with torch.inference_mode():
            for i in range(meta["layers"]):
                cache.update(tensors[f"{i}.keys"], tensors[f"{i}.values"], i)
