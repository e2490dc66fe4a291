"""Where the time of a decode step goes: torch.profiler ranges around the model forward, the cache update, the C++
bookkeeping, the re-rotation of positions and the logits; a trace that opens in Perfetto or chrome://tracing; and a
per-step breakdown for the results."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from ..cache.kv import BOOKKEEPING, CACHE_UPDATE, REROTATE

# The driver's ranges; the cache's (update, bookkeeping, re-rotation) are named in pystream.cache.kv, and the dense
# cache's update range by pystream.cache.hf.ProfiledDynamicCache.
STEP, FORWARD, LOGITS = "pystream::step", "pystream::forward", "pystream::logits"


def split_forward(model, input_ids, **kwargs) -> torch.Tensor:
    """model(...) as its decoder then its LM head on the last position, each in its own range. Returns the
    `[batch, 1, vocab]` logits."""
    with record_function(FORWARD):
        hidden = model.get_decoder()(input_ids, **kwargs).last_hidden_state
    with record_function(LOGITS):
        return model.get_output_embeddings()(hidden[:, -1:])


def profile_steps(step, steps: int, device, trace_path: Path | None) -> dict:
    """Run `step(i)` `steps` times under torch.profiler; returns the per-step breakdown in milliseconds."""
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for i in range(steps):
            with record_function(STEP):
                step(i)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
    totals, device_totals = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.name.startswith("pystream::"):
            totals[event.name] += event.cpu_time_total / 1e3  # us -> ms, inclusive of what runs inside
            device_totals[event.name] += getattr(event, "device_time_total", 0.0) / 1e3
    per = {name: value / steps for name, value in totals.items()}
    update = per.get(CACHE_UPDATE, 0.0)
    bookkeeping, rerotate = per.get(BOOKKEEPING, 0.0), per.get(REROTATE, 0.0)
    forward, logits, total = per.get(FORWARD, 0.0), per.get(LOGITS, 0.0), per.get(STEP, 0.0)
    breakdown = {
        "model_ms": max(forward - update, 0.0),  # attention, MLP, norms, embeddings
        "cache_update_ms": max(update - bookkeeping - rerotate, 0.0),  # writing KV, slicing what to attend to
        "bookkeeping_ms": bookkeeping,  # the C++ ring and the per-step Python around it
        "rerotate_ms": rerotate,  # sink placement and re-basing of positions
        "logits_ms": logits,
        "other_ms": max(total - forward - logits, 0.0),  # position ids, masks, the driver
        "step_ms": total,
    }
    result = {"steps": steps, "ms_per_step": breakdown, **_launch_counts(prof, steps, device)}
    if torch.device(device).type == "cuda":
        # On a GPU the host only launches kernels: the ranges above are launch (host) time, and this is the time
        # the GPU spent in the kernels each range launched.
        result["gpu_ms_per_step"] = {name.removeprefix("pystream::"): value / steps
                                     for name, value in device_totals.items()}
    if trace_path is not None:
        result["trace"] = _export_gzipped(prof, trace_path)
    return result


def _launch_counts(prof, steps: int, device) -> dict:
    """How many operations a step launches: `aten_ops_per_step`, the top-level ATen operator calls (each one a trip
    through the dispatcher, and on a GPU one or more kernel launches; inside a compiled graph, inductor's fused
    kernels are not ATen calls, so only what it left to ATen, such as matrix multiplies, counts), and on a GPU
    `kernels_per_step`, the kernels that ran on the device (a CUDA graph replays its kernels with one launch)."""
    top_level = 0
    kernels = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            top_level += parent is None
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels += 1
    counts = {"aten_ops_per_step": top_level / steps}
    if torch.device(device).type == "cuda":
        counts["kernels_per_step"] = kernels / steps
    return counts


def _export_gzipped(prof, trace_path: Path) -> str:
    """The Chrome trace, gzipped (Perfetto and chrome://tracing open .json.gz; a few steps are ~10 MB raw): torch
    gzips a path ending in .gz itself."""
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    target = trace_path.with_name(trace_path.name + ".gz")
    prof.export_chrome_trace(str(target))
    return target.name
