"""Clocks and memory: device synchronisation before every clock read, percentiles, peak memory per cell, and the
prediction that keeps a dense cache from taking the machine down."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager

import numpy as np
import torch

GIB = 1024**3


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """Run `fn()` and return (its result, wall milliseconds), the device synchronised before both clock reads."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def latency_summary(latencies_ms: list[float]) -> dict:
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


# ---- memory -----------------------------------------------------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


@contextmanager
def peak_memory(device):
    """Measures the peak memory of the block: process RSS on the CPU (the kernel's high-water mark, reset at the
    start where Linux allows it), torch's max allocated/reserved on CUDA. Yields a dict filled on exit."""
    device = torch.device(device)
    out: dict = {}
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    start_rss = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        peak = _status_bytes("VmHWM") if reset else None
        out["peak_rss_bytes"] = peak if peak is not None else max(start_rss or 0, rss_bytes() or 0)
        out["peak_rss_exact"] = reset
        if device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)


def available_bytes(device) -> int:
    """Memory a new allocation can still get on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * element


def fits(needed_bytes: int, device, *, headroom: float = 0.15, reserve_bytes: int = GIB) -> tuple[bool, str]:
    """Whether `needed_bytes` more fit on `device`, keeping a margin for activations; with the message to record
    when they do not."""
    available = available_bytes(device)
    ok = needed_bytes * (1 + headroom) + reserve_bytes <= available
    return ok, f"OOM: needs {needed_bytes / GIB:.1f} GiB, {available / GIB:.1f} GiB available"


# What allocators say when they fail: torch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't
# allocate memory"), CUDA's torch.OutOfMemoryError, Python MemoryError. All mean the same for a cell: it did not fit.
_ALLOCATION_FAILURE = ("can't allocate memory", "out of memory", "cannot allocate memory", "not enough memory")


def is_allocation_failure(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err).lower() for s in _ALLOCATION_FAILURE)


def oom_message(err: BaseException) -> str:
    """The `error` of an oom record: the allocator's own words, one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = next((line for line in lines if any(s in line.lower() for s in _ALLOCATION_FAILURE)),
                lines[0] if lines else type(err).__name__)
    return f"OOM: {text[:300]}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
