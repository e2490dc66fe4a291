"""pystream-bench: sink caching against its baselines across stream lengths.

The top of the package: `main` parses the command line, `validate` checks everything that can be checked before
loading anything and returns an immutable `RunConfig`, and `run(config)` does the run. A bad argument is a
`UsageError`: one line, exit code 2, before anything is created.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = """\
examples:
  pystream-bench --lengths 4k,1M
      the main job: every method at caches 256 and 1024 (4 sinks), at 4,096 and 1,048,576 tokens, on the bundled
      SmolLM2-135M and King James Bible; results and report.html in runs/<date-time>/
  pystream-bench --methods sink,window --cache-sizes 1024 --lengths 8k,64k,512k --batch 4 --out runs/batch4
      only the streaming caches, four independent streams decoded together
  pystream-bench --model ./my-llama --text book.txt --lengths 16k --mode stream --ppl-tokens 12288
      your own model folder and text, streaming every token up to 16k for real
  pystream-bench --experiment paper
      the paper's five findings on the bundled model, with our numbers beside the paper's (about 42 minutes)
"""

DEFAULT_PPL_TOKENS = 1536
LENGTH_HELP = ("comma-separated stream lengths; k = 1024 and M = 1024*1024 (the context-length convention), plain "
               "integers too: 4k,64k,1M (default: 4k,1M)")


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


# Upper bounds of every number on the command line, checked before anything is created. Far above any real run
# (a stream of 2^40 tokens is ~400 years at 10k tokens/s) and small enough that no size overflows the int64
# counters and tensors they become. Memory is checked per cell, against the device, before anything is allocated.
MAX_TOKENS = 1 << 40  # --lengths, --ppl-tokens, --experiment-tokens, --cache-tokens, --stability-tokens
MAX_CAPACITY = 1 << 24  # --cache-sizes, --ppl-cache, --experiment-cache, --sinks: 16M slots
MAX_BOUNDS = {"sinks": MAX_CAPACITY, "steps": 1_000_000, "warmup": 1_000_000, "recompute_steps": 1_000_000,
              "batch": 4096, "threads": 1024,
              "ppl_tokens": MAX_TOKENS, "ppl_cache": MAX_CAPACITY, "recompute_samples": 1_000_000,
              "profile_steps": 10_000, "seed": (1 << 63) - 1, "experiment_cache": MAX_CAPACITY}
MAX_SCALING = 1024.0  # dense-pi:F and friends


def parse_size(text: str, what: str, maximum: int = MAX_TOKENS) -> int:
    match = re.fullmatch(r"\s*(\d{1,30})\s*([kKmM]?)\s*", text)  # 30 digits: int() never meets its digit limit
    if not match:
        raise UsageError(f"{what}: {text!r} is not a size (examples: 4096, 4k, 1M)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if value <= 0:
        raise UsageError(f"{what}: {text!r} must be positive")
    if value > maximum:
        raise UsageError(f"{what}: {text!r} is more than the {maximum:,} allowed")
    return value


def parse_capacity(text: str, what: str) -> int:
    return parse_size(text, what, MAX_CAPACITY)


def parse_list(text: str, what: str, parse) -> list:
    items = [t for t in text.split(",")]
    if not text.strip() or any(not t.strip() for t in items):
        raise UsageError(f"{what}: {text!r} must be a comma-separated list without empty items")
    values = [parse(t.strip(), what) for t in items]
    return list(dict.fromkeys(values))  # de-duplicated, in the given order


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the description to the terminal like every help text; keeps the indented example lines of the epilog as
    written (a paragraph with an indented line is laid out by hand)."""

    def _fill_text(self, text, width, indent):
        import textwrap

        paragraphs = text.split("\n\n")
        return "\n\n".join(p if any(line.startswith(" ") for line in p.splitlines()) or "\n" in p.strip()
                             else textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                                subsequent_indent=indent) for p in paragraphs)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from .measure.cells import METHODS

    p = Parser(
        prog="pystream-bench",
        description="Benchmark streaming LLM inference with attention sinks (StreamingLLM) against window "
                    "attention, sliding window with re-computation and dense attention: per-token latency, "
                    "tokens/s, memory and perplexity across stream lengths.",
        epilog=EXAMPLES, formatter_class=HelpFormatter,
    )
    what = p.add_argument_group("what to measure")
    what.add_argument("--lengths", default="4k,1M", help=LENGTH_HELP)
    what.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, any of {', '.join(METHODS)} (default: all), and the context-extension "
                           "baselines dense-pi:F (linear position interpolation), dense-ntk:F (dynamic NTK), "
                           "dense-yarn:F (YaRN): dense attention with the model's RoPE scaled by F")
    what.add_argument("--cache-sizes", default="256,1024",
                      help="total cache sizes, sinks included (the paper's 4+1020 is 1024); default 256,1024")
    what.add_argument("--sinks", type=int, default=4, help="attention sinks of the sink method (default 4)")
    what.add_argument("--mode", choices=("state", "stream"), default="state",
                      help="state: put each cache in the state a stream of L tokens leaves, then time decoding "
                           "(fast); stream: stream every token up to L for real (default state)")
    what.add_argument("--steps", type=int, default=32, help="timed decode steps per cell, after warm-up (default 32)")
    what.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default 3)")
    what.add_argument("--recompute-steps", type=int, default=8,
                      help="timed steps of recompute, at most --steps, after one warm-up step (default 8: each step "
                           "is a whole forward over its context, the same work every time, so a few give a steady "
                           "p50; 32 at a context of 1,024 take about 2 minutes here)")
    what.add_argument("--batch", type=int, default=1, help="independent streams decoded together (default 1)")
    quality = p.add_argument_group("quality")
    quality.add_argument("--ppl-tokens", type=int, default=None,
                         help="at each of --lengths L, per method, the per-token NLL of the N tokens ending at L "
                              "(tokens L-N..L-1 of the stream; exact for sink and window at any L); 0 skips "
                              f"(default {DEFAULT_PPL_TOKENS:,}, or the whole text if shorter)")
    quality.add_argument("--position-schemes", default="in-cache",
                         help="comma-separated, sink quality under each: in-cache (the paper: positions inside the "
                              "cache) and original (keys keep the positions they were computed at); default in-cache")
    quality.add_argument("--ppl-cache", type=int, default=None,
                         help="cache size for the quality pass (default: the smallest of --cache-sizes)")
    quality.add_argument("--recompute-ppl", choices=("auto", "all", "sample"), default="auto",
                         help="recompute at every position (exact), or at random positions paired with sink's NLL "
                              "there, until the 95%% interval of sink PPL / recompute PPL is within 5%%; auto "
                              "samples on CPU (default auto)")
    quality.add_argument("--recompute-samples", type=int, default=64,
                         help="first sample of recompute positions, grown until the interval is narrow enough "
                              "(default 64)")
    inputs = p.add_argument_group("model and text")
    inputs.add_argument("--model", default=None,
                        help="the bundled smollm2-135m (default), a local transformers folder, a .gguf file, or a "
                             "hub id (needs the network)")
    inputs.add_argument("--text", default=None, help="the bundled kjv (default) or a UTF-8 text file")
    inputs.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model folder or hub id to run its own code (off by default)")
    exp = p.add_argument_group("the paper's experiments (--experiment paper)")
    exp.add_argument("--experiment", choices=("paper", "recall"), default=None,
                     help="instead of cells: paper reproduces the paper's findings (perplexity past the "
                          "pre-training window, number of sinks, cache size, where attention goes, long-stream "
                          "stability); recall measures what each method remembers: recall of a planted random "
                          "passage against the distance to its repeat, at --cache-sizes")
    exp.add_argument("--parts", default="ppl,sinks,cache,attention,stability",
                     help="which findings (default all): ppl, sinks, cache, attention, stability")
    exp.add_argument("--experiment-tokens", default="64k",
                     help="tokens streamed for ppl and sinks (default 64k = 65,536 as the paper's Table 1, 8x the "
                          "bundled model's 8k pre-training)")
    exp.add_argument("--experiment-cache", type=int, default=256,
                     help="total cache for ppl, sinks and stability (default 256)")
    exp.add_argument("--cache-tokens", default="4k", help="tokens streamed for the cache-size finding (default 4k)")
    exp.add_argument("--stability-tokens", default="1M",
                     help="the stability finding's sink stream (default 1M = 1,048,576 tokens; 4M is the paper's)")
    rec = p.add_argument_group("what each method remembers (--experiment recall)")
    rec.add_argument("--recall-methods", default="dense,sink,window,recompute",
                     help="methods probed (default: dense, sink in both position schemes, window, recompute; add "
                          "the RoPE-scaled baselines dense-yarn:F, dense-pi:F, dense-ntk:F, each costing as much as "
                          "dense)")
    rec.add_argument("--recall-distances", default="16,64,256,1k,4k,9k",
                     help="tokens of text between the passage and its repeat (default 16,64,256,1k,4k,9k: past the "
                          "bundled model's 8k pre-training length); sink, window and recompute stop at "
                          "--recall-cache-reach times their cache")
    rec.add_argument("--recall-cache-reach", type=int, default=2,
                     help="sink, window and recompute: distances up to this many times their cache, where they have "
                          "forgotten (default 2; 0: every distance)")
    rec.add_argument("--recall-passages", type=int, default=3,
                     help="passages per distance, each its own seed, text and stream position (default 3)")
    rec.add_argument("--passage-tokens", type=int, default=64, help="random tokens per passage (default 64)")
    rec.add_argument("--far-position", default="32k",
                     help="stream position of the far probe's passages (sink in both position schemes, smallest "
                          "cache, 2 passages; default 32k)")
    rec.add_argument("--recall-probes", default="distance,far,placement",
                     help="distance (recall against distance), far (deep into a stream), placement (first copy "
                          "at the start, middle or end of what the cache holds); default all")
    run = p.add_argument_group("how to run")
    run.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="the model's weights, activations and KV cache (default float32; bfloat16 for "
                          "--experiment paper, as the paper ran half precision: on a CPU with bfloat16 matrix "
                          "units, or a GPU, its chunked forwards run about twice as fast)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default 1, the steadiest per-step timings; with --experiment, every "
                          "core, since it measures perplexity, not time)")
    run.add_argument("--seed", type=int, default=0,
                     help="seeds torch and the positions sampled for recompute's perplexity, so that a run repeats "
                          "(default 0)")
    run.add_argument("--out", default=None, metavar="RUN_DIR",
                     help="the run directory: run.json, results.jsonl, report.html (default runs/<date-time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished cells")
    run.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    run.add_argument("--profile", action="store_true",
                     help="after the timed steps of each cell, profile a few more: a per-step breakdown (model "
                          "forward, cache update, C++ bookkeeping, re-rotation, logits) in the results and a trace "
                          "for Perfetto or chrome://tracing in RUN_DIR/traces/")
    run.add_argument("--profile-steps", type=int, default=8, help="profiled steps per cell (default 8)")
    run.add_argument("--compile", action="store_true",
                     help="time the decode step compiled with torch.compile (CUDA graphs on a GPU, inductor on a "
                          "CPU): sink, window and recompute (once its context is full); dense grows every step and "
                          "runs eager. Records say compiled and compile_s (compile and warm-up, apart from the "
                          "timed steps)")
    cluster = p.add_argument_group("on a Ray cluster (pip install \"pystream[ray]\"; README: Running on a cluster)")
    cluster.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                         help="run each cell and quality pass as a Ray task: HEAD:PORT joins that cluster, local "
                              "starts one on this machine, no value joins the one `ray start` runs here; --model and "
                              "--text must exist on every node")
    cluster.add_argument("--ray-cpus", type=int, default=None,
                         help="--ray local: CPUs of the local cluster (default: this machine's)")
    cluster.add_argument("--ray-gpus", type=int, default=None,
                         help="--ray local: GPUs of the local cluster (default: this machine's)")
    return p


@dataclass(frozen=True)
class RunConfig:
    """A validated command line: what `run` does."""

    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    cache_sizes: tuple[int, ...]  # capacities: sinks + window
    sinks: int
    mode: str
    steps: int
    warmup: int
    recompute_steps: int
    batch: int
    ppl_tokens: int | None  # None: DEFAULT_PPL_TOKENS, or the whole text if shorter
    ppl_cache: int | None
    recompute_ppl: str
    recompute_samples: int
    model: str | None
    text: str | None
    trust_remote_code: bool
    device: str
    dtype: str
    threads: int
    seed: int
    out: Path
    resume: bool
    report: bool
    profile: bool
    profile_steps: int
    compile: bool = False
    experiment: str | None = None
    parts: tuple[str, ...] | None = None
    experiment_tokens: int | None = None
    experiment_cache: int | None = None
    cache_tokens: int | None = None
    stability_tokens: int | None = None
    ray: str | None = None  # --ray: "local" or the cluster's HEAD:PORT, resolved; None runs here, one cell at a time
    ray_cpus: int | None = None
    ray_gpus: int | None = None
    position_schemes: tuple[str, ...] = ("in-cache",)
    recall_methods: tuple[str, ...] | None = None
    recall_distances: tuple[int, ...] | None = None
    recall_passages: int | None = None
    passage_tokens: int | None = None
    far_position: int | None = None
    recall_probes: tuple[str, ...] | None = None
    recall_cache_reach: int | None = None
    argv: tuple[str, ...] | None = None  # the command line as given (None: sys.argv), for run.json and resuming


def validate(args, argv=None) -> RunConfig:
    """Everything that can be checked before loading anything; `args` is read, never changed."""
    import torch

    from .measure.cells import METHODS, is_dense

    lengths = parse_list(args.lengths, "--lengths", parse_size)
    cache_sizes = parse_list(args.cache_sizes, "--cache-sizes", parse_capacity)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS and not is_dense(m)]
    if unknown or not args.methods.strip():
        raise UsageError(f"--methods: unknown method {unknown[0] if unknown else args.methods!r}; choose from "
                         f"{', '.join(METHODS)}, or dense-pi:F, dense-ntk:F, dense-yarn:F (RoPE scaled by F >= 1)")
    for m in methods:
        if is_dense(m) and m != "dense" and not 1 <= float(m.split(":")[1]) <= MAX_SCALING:
            raise UsageError(f"--methods: {m}: the scaling factor must be >= 1 and <= {MAX_SCALING:g}")
    methods = list(dict.fromkeys(methods))
    threads = args.threads if args.threads is not None else ((os.cpu_count() or 1) if args.experiment else 1)
    for name, maximum in MAX_BOUNDS.items():
        minimum = 1 if name in ("steps", "recompute_steps", "batch", "threads", "recompute_samples", "profile_steps",
                                "ppl_cache") else 0
        value = threads if name == "threads" else getattr(args, name)
        if value is not None and not minimum <= value <= maximum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum} and <= {maximum:,}, got {value}")
    experiment = {}
    if args.experiment == "paper":
        experiment = _validate_experiment(args)
    elif args.experiment == "recall":
        experiment = _validate_recall(args, cache_sizes)
    if "sink" in methods:
        small = [c for c in cache_sizes if c <= args.sinks]
        if small:
            raise UsageError(f"--cache-sizes: {small[0]} is not larger than --sinks {args.sinks} (the cache holds "
                             "the sinks plus a window of at least one token)")
    if args.ppl_cache is not None and args.ppl_cache <= (args.sinks if "sink" in methods else 0):
        raise UsageError(f"--ppl-cache {args.ppl_cache} must be larger than --sinks {args.sinks}")
    if args.ppl_tokens == 1:
        raise UsageError("--ppl-tokens must be 0 (skip) or at least 2")
    schemes = _validate_schemes(args.position_schemes)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (this torch build: "
                         f"{torch.__version__}); use --device cpu")
    if args.compile and args.experiment:
        raise UsageError(f"--compile times the decode steps of a sweep; --experiment {args.experiment} runs eager")
    ray = _validate_ray(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    check_out_dir(out, args.resume)
    return RunConfig(
        lengths=tuple(lengths), methods=tuple(methods), cache_sizes=tuple(cache_sizes), sinks=args.sinks,
        mode=args.mode, steps=args.steps, warmup=args.warmup, recompute_steps=args.recompute_steps, batch=args.batch, ppl_tokens=args.ppl_tokens,
        ppl_cache=args.ppl_cache, recompute_ppl=args.recompute_ppl, recompute_samples=args.recompute_samples,
        model=args.model, text=args.text, trust_remote_code=args.trust_remote_code, device=device,
        dtype=args.dtype or ("bfloat16" if args.experiment == "paper" else "float32"), threads=threads,
        seed=args.seed, out=out, resume=args.resume, report=not args.no_report,
        profile=args.profile, profile_steps=args.profile_steps, compile=args.compile, experiment=args.experiment,
        ray=ray,
        ray_cpus=args.ray_cpus, ray_gpus=args.ray_gpus, position_schemes=schemes,
        argv=None if argv is None else tuple(str(a) for a in argv), **experiment)


def _validate_ray(args) -> str | None:
    """--ray: Ray installed and the cluster reachable, checked before anything is created."""
    if args.ray is None:
        if args.ray_cpus is not None or args.ray_gpus is not None:
            raise UsageError("--ray-cpus/--ray-gpus size a local cluster: pass --ray local too")
        return None
    if args.experiment:
        raise UsageError("--ray runs the cells and quality passes of a sweep; --experiment runs in one process")
    for name in ("ray_cpus", "ray_gpus"):
        value = getattr(args, name)
        if value is not None and (value < (1 if name == "ray_cpus" else 0) or args.ray != "local"):
            raise UsageError(f"--{name.replace('_', '-')} {value}: " + (
                "only sizes a local cluster (--ray local)" if args.ray != "local" else "out of range"))
    from .measure.cluster import ClusterError, check

    try:
        return check(args.ray) or "local"
    except ClusterError as err:
        raise UsageError(str(err)) from None


def _validate_schemes(text: str) -> tuple[str, ...]:
    from .measure.evaluator import POSITION_SCHEMES

    schemes = parse_list(text, "--position-schemes", lambda t, what: t)
    unknown = [s for s in schemes if s not in POSITION_SCHEMES]
    if unknown:
        raise UsageError(f"--position-schemes: unknown scheme {unknown[0]!r}; choose from "
                         f"{', '.join(POSITION_SCHEMES)}")
    return tuple(schemes)


def _validate_experiment(args) -> dict:
    from .measure.experiments import PARTS

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UsageError(f"--parts: unknown part {unknown[0] if unknown else args.parts!r}; choose from "
                         f"{', '.join(PARTS)}")
    values = {
        "parts": tuple(parts),
        "experiment_tokens": parse_size(args.experiment_tokens, "--experiment-tokens"),  # bounded too
        "experiment_cache": args.experiment_cache,
        "cache_tokens": parse_size(args.cache_tokens, "--cache-tokens"),
        "stability_tokens": parse_size(args.stability_tokens, "--stability-tokens"),
    }
    if values["stability_tokens"] < 2:
        raise UsageError("--stability-tokens must be at least 2 (one predicted token)")
    if args.experiment_cache <= 8:
        raise UsageError(f"--experiment-cache {args.experiment_cache} must be larger than the 8 sinks tried")
    if values["experiment_tokens"] <= args.experiment_cache:
        raise UsageError("--experiment-tokens must be longer than --experiment-cache, or nothing is evicted")
    return values


def _validate_recall(args, cache_sizes) -> dict:
    from .measure.cells import METHODS, is_dense
    from .measure.recall import PROBES

    methods = [m.strip() for m in args.recall_methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and not is_dense(m)]
    if unknown or not methods:
        raise UsageError(f"--recall-methods: unknown method {unknown[0] if unknown else args.recall_methods!r}; "
                         f"choose from {', '.join(METHODS)}, dense-pi:F, dense-ntk:F, dense-yarn:F")
    distances = parse_list(args.recall_distances, "--recall-distances", parse_size)
    probes = [p.strip() for p in args.recall_probes.split(",") if p.strip()]
    if not probes or any(p not in PROBES for p in probes):
        raise UsageError(f"--recall-probes: choose from {', '.join(PROBES)}")
    if not 2 <= args.recall_passages <= 10_000:
        raise UsageError("--recall-passages must be >= 2 (the interval is over passages) and <= 10,000, "
                         f"got {args.recall_passages}")
    if not 0 <= args.recall_cache_reach <= 1_000_000:
        raise UsageError(f"--recall-cache-reach must be >= 0 and <= 1,000,000, got {args.recall_cache_reach}")
    if not 2 <= args.passage_tokens <= MAX_CAPACITY:
        raise UsageError(f"--passage-tokens must be >= 2 and <= {MAX_CAPACITY:,}, got {args.passage_tokens}")
    if "sink" in methods and any(c <= args.sinks for c in cache_sizes):
        raise UsageError(f"--cache-sizes: every size must be larger than --sinks {args.sinks}")
    return {"recall_methods": tuple(dict.fromkeys(methods)), "recall_distances": tuple(sorted(set(distances))),
            "recall_passages": args.recall_passages, "passage_tokens": args.passage_tokens,
            "far_position": parse_size(args.far_position, "--far-position"), "recall_probes": tuple(probes),
            "recall_cache_reach": args.recall_cache_reach}


def check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if resume:
        if not (out / "run.json").is_file():
            raise UsageError(f"--resume: {out} holds no run to continue (no run.json)")
        from .results import ResultsError, load_run

        try:
            load_run(out)  # a damaged or newer results file is reported now, before any work
        except ResultsError as err:
            raise UsageError(str(err)) from None
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: already holds files; pass --resume to continue that run, or choose another "
                         "directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {existing}")


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(config: RunConfig, loaded, text, n_tokens) -> dict:
    import numpy
    import torch
    import transformers

    from . import __version__
    from .measure.clocks import cpu_model
    from .results import SCHEMA, SCHEMA_VERSION

    cfg = loaded.model.config
    device = config.device
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["pystream-bench", *(sys.argv[1:] if config.argv is None else config.argv)]),
        "config": {
            "lengths": list(config.lengths), "methods": list(config.methods), "cache_sizes": list(config.cache_sizes),
            "sinks": config.sinks, "mode": config.mode, "steps": config.steps, "warmup": config.warmup,
            "recompute_steps": config.recompute_steps,
            "batch": config.batch, "ppl_tokens": config.ppl_tokens, "ppl_cache": config.ppl_cache,
            "recompute_ppl": config.recompute_ppl, "recompute_samples": config.recompute_samples,
            "position_schemes": list(config.position_schemes), "model": loaded.name, "text": text.name, "device_kind": device, "dtype": config.dtype,
            "threads": config.threads, "seed": config.seed, "profile": config.profile, "compile": config.compile,
            "experiment": config.experiment, "parts": None if config.parts is None else list(config.parts),
            "experiment_tokens": config.experiment_tokens,
            "experiment_cache": config.experiment_cache if config.experiment == "paper" else None,
            **({"recall_methods": list(config.recall_methods), "recall_distances": list(config.recall_distances),
                "recall_passages": config.recall_passages, "passage_tokens": config.passage_tokens,
                "far_position": config.far_position, "recall_probes": list(config.recall_probes),
                "recall_cache_reach": config.recall_cache_reach}
               if config.experiment == "recall" else {}),
        },
        "versions": {"pystream": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__, "python": platform.python_version()},
        "git_commit": git_commit(),
        "device": {"kind": device, "name": device_name, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                   "threads": config.threads, "platform": platform.platform()},
        "model": {"name": loaded.name, "kind": loaded.kind, "source": loaded.source,
                  "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
                  "attention_heads": cfg.num_attention_heads,
                  "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
                  "hidden_size": cfg.hidden_size, "parameters": params,
                  "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
                  "load_s": round(loaded.load_seconds, 2)},
        "text": {"name": text.name, "source": text.source, "tokens": int(n_tokens)},
    }


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `docker stop`, `kill`): handled exactly as Ctrl-C, exit code 143 (128 + 15)."""


EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_WRITE_FAILED = 130, 143, 1


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While running, SIGTERM raises `Terminated`, so that it ends the run like Ctrl-C: what is finished is saved and
    the resume command is printed, instead of the process dying silently."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class saving_on_interrupt:
    """Ctrl-C or SIGTERM ends the run cleanly: the lock is released, what is finished is on disk, and the user is
    told how to resume. So does a record that cannot be written (a full disk): the results file ends at its last
    whole record. The `with` value is a list that holds the exit code after such an ending."""

    def __init__(self, writer, console, out: Path, argv):
        self.writer, self.console, self.out, self.argv = writer, console, out, argv
        self.interrupted: list = []

    def __enter__(self):
        return self.interrupted

    def __exit__(self, kind, value, traceback):
        from .results import ResultsWriteError

        self.writer.close()
        saved = f"{len(self.writer.records)} finished record(s) are saved in {self.out}"
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            terminated = issubclass(kind, Terminated)
            self.interrupted.append(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
            self.console.print(f"\n[yellow]interrupted{' (SIGTERM)' if terminated else ''}[/yellow]: {saved}. "
                               f"Resume with:\n  {resume_command(self.argv, self.out)}")
            return True
        if kind is not None and issubclass(kind, ResultsWriteError):
            self.interrupted.append(EXIT_WRITE_FAILED)
            # one line, as every error: what failed, what is safe, how to go on
            print(f"pystream-bench: error: {value}; {saved}; free space, then resume with: "
                  f"{resume_command(self.argv, self.out)}", file=sys.stderr)
            return True
        return False


def resume_command(argv, out: Path) -> str:
    words = list(sys.argv[1:] if argv is None else argv)
    if not any(w == "--out" or w.startswith("--out=") for w in words):
        words += ["--out", str(out)]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(["pystream-bench", *words])


def _run_experiment(config: RunConfig, loaded, ids, writer, console, out_console) -> int:
    from rich.table import Table

    from .measure.experiments import PaperConfig, PaperExperiment
    from .measure.progress import make_progress
    from .results.paper import paper_table

    cfg = PaperConfig(parts=config.parts, tokens=config.experiment_tokens, cache=config.experiment_cache,
                      cache_tokens=config.cache_tokens, stability_tokens=config.stability_tokens,
                      recompute_samples=max(config.recompute_samples, 96), seed=config.seed)
    needed = max(cfg.tokens, cfg.cache_tokens, cfg.stability_tokens if "stability" in cfg.parts else 0)
    if needed > len(ids):
        console.print(f"[yellow]note[/yellow]: the text has {len(ids):,} tokens; longer streams cycle it")
    progress = make_progress(console)
    started = time.perf_counter()
    with saving_on_interrupt(writer, console, config.out, config.argv) as interrupted, progress:
        PaperExperiment(cfg, loaded.model, ids, writer, progress, config.device, config.out).run()
    if interrupted:
        return interrupted[0]
    table = Table(title=f"the paper's findings on {loaded.name} (ours) beside the paper's", title_justify="left")
    for name in ("finding", "setting", "ours", "paper", "paper's setting"):
        table.add_column(name, justify="right" if name in ("ours", "paper") else "left")
    for row in paper_table(writer.records):
        digits = row.get("digits", 2)
        table.add_row(row["finding"], row["setting"], f"{row['ours']:.{digits}f}",
                      "-" if row["paper"] is None else f"{row['paper']:.{digits}f}", row["paper_setting"])
    out_console.print(table)
    console.print(f"experiment finished in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def _run_on_cluster(config: RunConfig, bench, cluster, writer, console, out_console, progress) -> int:
    from .measure.cluster import LoadSpec, Sweep
    from .measure.eta import plan_bench
    from .results.summary import print_summary

    spec = LoadSpec(model=config.model, text=config.text, device=config.device, dtype=config.dtype,
                    trust_remote_code=config.trust_remote_code, threads=config.threads, seed=config.seed)
    cells, quality = bench.cells(), bench.quality_plan()
    identity = {"cell": bench.cell_identity, "quality": bench.quality_identity}
    plan = plan_bench(bench, cells, quality, lambda kind, args: writer.done(identity[kind](*args)) is not None)
    # items that run at once: the cluster's CPUs over each task's threads (its GPUs on a GPU device)
    resources = cluster.describe()["resources"]
    slots = resources.get("GPU", 0) if config.device == "cuda" else resources.get("CPU", 0) // max(1, config.threads)
    plan.slots = max(1, int(slots))
    log_eta(plan, writer, console)
    with saving_on_interrupt(writer, console, config.out, config.argv) as interrupted, progress:
        skipped = Sweep(bench, spec).run(writer, progress, plan)
    if interrupted:
        return 130
    if skipped:
        console.print(f"resumed: {skipped} finished record(s) kept, not run again")
    print_summary(writer.records, out_console)
    return 0


def _run_recall(config: RunConfig, loaded, ids, writer, console, out_console) -> int:
    from rich.table import Table

    from .measure.progress import make_progress
    from .measure.recall import RecallConfig, RecallExperiment

    cfg = RecallConfig(passage_tokens=config.passage_tokens, distances=config.recall_distances,
                       passages=config.recall_passages, methods=config.recall_methods,
                       cache_sizes=config.cache_sizes, sinks=config.sinks, probes=config.recall_probes,
                       far_position=config.far_position, cache_reach=config.recall_cache_reach, seed=config.seed)
    progress = make_progress(console)
    started = time.perf_counter()
    with saving_on_interrupt(writer, console, config.out, config.argv) as interrupted, progress:
        RecallExperiment(cfg, loaded.model, ids, writer, progress).run()
    if interrupted:
        return 130
    recs = [r for r in writer.records if r.get("record") == "recall" and r.get("probe") == "distance"]
    curves = sorted({(r["method"], r.get("cache_size") or 0, r.get("position_scheme") or "") for r in recs})
    table = Table(title=f"recall against distance on {loaded.name} (1 = remembered, 0 = unseen)",
                  title_justify="left")
    table.add_column("method")
    for d in cfg.distances:
        table.add_column(f"{d:,}", justify="right")
    for method, cache, scheme in curves:
        by = {r["distance"]: r["recall"] for r in recs
              if (r["method"], r.get("cache_size") or 0, r.get("position_scheme") or "") == (method, cache, scheme)}
        name = " ".join(str(x) for x in (method, cache or "", scheme) if x)
        table.add_row(name, *("-" if by.get(d) is None else f"{by[d]:.2f}" for d in cfg.distances))
    out_console.print(table)
    console.print(f"experiment finished in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def _run_bench(config: RunConfig, loaded, ids, writer, console, out_console, cluster=None) -> int:
    from .measure.eta import plan_bench
    from .measure.progress import make_progress
    from .measure.runner import Bench, BenchConfig
    from .results.summary import print_summary

    cfg = BenchConfig(lengths=config.lengths, methods=config.methods, cache_sizes=config.cache_sizes,
                      sinks=config.sinks, mode=config.mode, batch=config.batch, steps=config.steps,
                      warmup=config.warmup, recompute_steps=config.recompute_steps, seed=config.seed,
                      ppl_tokens=config.ppl_tokens,
                      ppl_cache=config.ppl_cache, recompute_ppl=config.recompute_ppl,
                      recompute_samples=config.recompute_samples, device=config.device, dtype=config.dtype,
                      profile=config.profile, profile_steps=config.profile_steps,
                      position_schemes=config.position_schemes, compile=config.compile)
    progress = make_progress(console)
    bench = Bench(cfg, loaded.model, ids, progress, run_dir=config.out)
    if cluster is not None:
        return _run_on_cluster(config, bench, cluster, writer, console, out_console, progress)
    cells, quality = bench.cells(), bench.quality_plan()
    identity = {"cell": bench.cell_identity, "quality": bench.quality_identity}
    plan = plan_bench(bench, cells, quality, lambda kind, args: writer.done(identity[kind](*args)) is not None)
    skipped = len(plan.items) - len(plan.pending)
    if skipped and plan.resume_message():
        console.print(plan.resume_message())
    log_eta(plan, writer, console)
    with saving_on_interrupt(writer, console, config.out, config.argv) as interrupted, progress:
        overall = progress.add_task("[bold]cells", total=len(plan.pending), plan=plan)
        for item in list(plan.pending):
            plan.start(item)
            if item.quality:
                rec = bench.run_quality(item.run, writer.records)
            else:
                rec = bench.run_cell(*item.run, writer.records)
            writer.append(rec)
            # an OOM or a result taken from another pass says nothing about rates
            plan.finish(item, setup_s=rec.get("setup_s"), measured=rec.get("status") == "ok" and bool(item.parts),
                        scale=item.scale(rec))
            progress.advance(overall)
    if interrupted:
        return interrupted[0]
    if skipped:
        console.print(f"resumed: {skipped} finished record(s) kept, not run again")
    print_summary(writer.records, out_console)
    return 0


def log_eta(plan, writer, console) -> None:
    """What the ETA predicts against what each item takes, in the run directory's eta.jsonl (bench/eta_accuracy.py
    reads it): the plan first, then a line per finished item. A log that cannot be written is a warning, once."""
    from .results import ETA_LOG

    def write(entry):
        if not writer.log(ETA_LOG, entry):
            plan.log = None
            console.print(f"[yellow]warning: {writer.path / ETA_LOG} cannot be written; the ETA is not logged "
                          "(the results are not affected)[/yellow]")

    plan.log = write
    write(plan.header())


def write_final_report(out: Path, console) -> None:
    """report.html beside the results. The results are already safe on disk: a report that cannot be written is a
    warning (rebuild it with pystream-report), not a failed run."""
    from .report import write_report
    from .results import ResultsError

    try:
        console.print(f"report: {write_report([out], out / 'report.html')}")
    except (ResultsError, OSError) as err:
        console.print(f"[yellow]warning: report.html not written ({err}); the results are complete: "
                      f"pystream-report {out}[/yellow]")


def main(argv=None) -> int:
    try:
        with sigterm_as_interrupt():
            config = validate(build_parser().parse_args(argv), argv)
            return run(config)
    except UsageError as err:
        print(f"pystream-bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # while loading or tokenizing: nothing was written yet (cells handle their own)
        terminated = isinstance(err, Terminated)
        print(f"pystream-bench: interrupted{' (SIGTERM)' if terminated else ''}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def load_inputs(config: RunConfig, console):
    """The text, the model and the token ids; problems with them are UsageErrors."""
    from .cache.hf import UnsupportedModelError, check_supported
    from .inputs.models import ModelLoadError, load_model
    from .inputs.texts import TextError, load_text, tokenize

    try:
        text = load_text(config.text)
    except TextError as err:
        raise UsageError(f"--text {err}") from None
    with console.status("loading the model"):
        try:
            loaded = load_model(config.model, device=config.device, dtype=config.dtype,
                                trust_remote_code=config.trust_remote_code,
                                progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
        except ModelLoadError as err:
            raise UsageError(f"--model: {err}") from None
    streaming = [m for m in config.methods if m in ("sink", "window")]
    if streaming or config.experiment:  # the experiment always streams through sink and window caches
        try:
            check_supported(loaded.model.config)
        except UnsupportedModelError as err:
            raise UsageError(f"--model: {err}") from None
    with console.status("tokenizing the text"):
        try:
            ids = tokenize(text, loaded.tokenizer)
        except TextError as err:
            raise UsageError(f"--text {err}") from None
    return text, loaded, ids


def connect_cluster(config: RunConfig, console):
    from .measure.cluster import ClusterError, connect

    with console.status("starting a local Ray cluster" if config.ray == "local" else f"joining {config.ray}"):
        try:
            cluster = connect(None if config.ray == "local" else config.ray, config.ray_cpus, config.ray_gpus)
        except ClusterError as err:
            raise UsageError(str(err)) from None
    info = cluster.describe()
    console.print(f"Ray cluster: {len(info['nodes'])} node(s), {info['resources'].get('CPU', 0):g} CPU(s), "
                  f"{info['resources'].get('GPU', 0):g} GPU(s); {'started' if cluster.local else 'joined'} in "
                  f"{cluster.started_s:.1f} s")
    return cluster


def run(config: RunConfig) -> int:
    """Run what `config` says: load, open the run directory, measure, summarise, report. Returns the exit code."""
    import torch
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from .results import ResultsError, RunWriter

    console = Console(stderr=True)
    # The result tables go to stdout, wide enough to read when piped to a file.
    out_console = Console(width=None if sys.stdout.isatty() else 160)
    hf_logging.disable_progress_bar()  # our own progress bars say what is going on
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    text, loaded, ids = load_inputs(config, console)
    console.print(f"model [bold]{loaded.name}[/bold] ({loaded.kind}, loaded in {loaded.load_seconds:.1f} s), "
                  f"text [bold]{text.name}[/bold] ({len(ids):,} tokens), device {config.device}, "
                  f"{config.threads} thread(s)")
    if config.ppl_tokens is None:
        config = dataclasses.replace(config, ppl_tokens=min(DEFAULT_PPL_TOKENS, len(ids)))
    elif config.ppl_tokens > len(ids):
        raise UsageError(f"--ppl-tokens {config.ppl_tokens} is more than the text's {len(ids)} tokens")
    meta, cluster = run_metadata(config, loaded, text, len(ids)), None
    if config.ray:
        cluster = connect_cluster(config, console)
        meta["cluster"] = cluster.describe()
    try:
        try:
            writer = RunWriter(config.out, meta, resume=config.resume)
        except ResultsError as err:
            raise UsageError(str(err)) from None
        if config.experiment:
            measure = {"paper": _run_experiment, "recall": _run_recall}[config.experiment]
            code = measure(config, loaded, ids, writer, console, out_console)
        else:
            code = _run_bench(config, loaded, ids, writer, console, out_console, cluster)
    finally:
        if cluster is not None:
            cluster.shutdown()
    if code != 0:
        return code
    if config.report:
        write_final_report(config.out, console)
    console.print(f"results: {config.out / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
