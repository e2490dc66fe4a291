"""Quality at the stream lengths asked: for each length L of `pystream-bench --lengths`, each method's per-token NLL
over the `ppl_tokens` tokens ending at L, i.e. the predicted tokens `[L - ppl_tokens, L)` (0-based, half-open; from
token 1 when L is shorter), of the text cycled to L tokens like the cells' streams.

- sink and window: exact, in chunked forwards (`evaluator.stream_nll`), streaming from the warm-up start of issue 13's
  fact 2 with the sinks in front, so PPL at 1M costs what it costs at 64k. Per position scheme asked ("in-cache", the
  paper; "original", keys keep the positions they were computed at). A window cache has no sinks, so both schemes
  are the same for it: it is measured once, under the first scheme asked.
  ALiBi models (BLOOM, MPT) compute their attention outside transformers' registry, so the chunked evaluator cannot
  serve them: they stream token by token through `SinkCache` / `WindowCache` from the same warm-up start (exact for
  the same reason; in-cache positions only) and their records say `evaluator: "token-by-token"`.
- dense (and the RoPE-scaled dense baselines): exact chunks over the whole prefix, when its KV cache fits in memory;
  otherwise a record with `status: "oom"` and the predicted need (`kv_bytes_needed`), like the cells.
- recompute: at sampled positions, paired with sink's NLL at the same tokens (window's without sink): its PPL and the
  ratio sink PPL / recompute PPL with a 95% interval whose half-width the sample grows to meet (`recompute_target`).
  `recompute_ppl="all"` (and "auto" on a GPU) computes every position: exact, a zero-width interval.

Every function returns a measurement (`{"record": "quality", ...}`) for `pystream.results` to stamp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..cache.hf import streaming_cache, uses_alibi
from . import clocks
from .cells import is_dense, method
from .evaluator import StreamNLL, dense_nll, paired_recompute, recompute_nll_at, stream_nll, warmup_start
from .quality import nll_streaming, summarise

QUALITY_MODE = "quality"
BUCKET_TOKENS = 256  # a quality record's PPL per bucket of this many predicted tokens
DEFAULT_SCHEME = "in-cache"


@dataclass(frozen=True)
class QualityItem:
    """One quality record to measure: a method (at a capacity, None for dense) at a stream length, under a position
    scheme (None for dense and recompute, which evict nothing / re-read their window at positions 0..C-1)."""

    method: str
    capacity: int | None
    length: int
    scheme: str | None


def quality_range(length: int, ppl_tokens: int) -> tuple[int, int]:
    """The predicted tokens measured at stream length `length`: `[length - ppl_tokens, length)`, from token 1 (the
    first one anything predicts) when the stream is shorter."""
    return max(1, length - ppl_tokens), length


def quality_plan(cfg) -> list[QualityItem]:
    """In run order: per length, sink and window per scheme, dense, then recompute (paired with what ran before)."""
    if cfg.ppl_tokens <= 1:
        return []
    capacity = cfg.quality_cache
    schemes = tuple(cfg.position_schemes)
    plan = []
    for length in cfg.lengths:
        for scheme in schemes:
            if "sink" in cfg.methods:
                plan.append(QualityItem("sink", capacity, length, scheme))
        if "window" in cfg.methods:
            plan.append(QualityItem("window", capacity, length, schemes[0]))
        plan += [QualityItem(m, None, length, None) for m in cfg.methods if is_dense(m)]
        if "recompute" in cfg.methods:
            plan.append(QualityItem("recompute", capacity, length, None))
    return plan


def quality_identity(cfg, item: QualityItem) -> dict:
    """The first fields of a quality record, which identify it (`pystream.results.record_key`): the stream length
    and the position scheme tell records at different lengths and schemes apart."""
    return {"record": "quality", "method": item.method, "cache_size": item.capacity, "length": item.length,
            "mode": QUALITY_MODE, "sinks": method(item.method).sinks(cfg), "position_scheme": item.scheme}


def stream_ids(bench, end: int) -> torch.Tensor:
    """Tokens 0..end-1 of stream 0 (the text, cycled past its end), on the CPU: the evaluator moves what it reads."""
    ids = bench.tokens.ids
    return ids[torch.arange(end) % ids.numel()]


def _pairing(cfg) -> tuple[str, str] | None:
    """(method, scheme) recompute is paired with: sink under the first scheme asked, else window."""
    for name in ("sink", "window"):
        if name in cfg.methods:
            return name, cfg.position_schemes[0]
    return None


def pair_candidates(cfg, plan: list[QualityItem], item: QualityItem) -> list[QualityItem]:
    """The items of `plan` whose record `item` reads when it runs: recompute's pair (`_pairing`) at its capacity and
    length; none for the others. A scheduler that runs items out of order (pystream-bench --ray) waits for these."""
    pairing = _pairing(cfg)
    if item.method != "recompute" or pairing is None:
        return []
    name, scheme = pairing
    return [p for p in plan if (p.method, p.capacity, p.length, p.scheme) == (name, item.capacity, item.length, scheme)]


def run_quality(bench, item: QualityItem, records: list[dict]) -> dict:
    """Measure one quality record; `records` are the run's finished ones (recompute reads its pair there)."""
    cfg = bench.cfg
    start, end = quality_range(item.length, cfg.ppl_tokens)
    identity = quality_identity(cfg, item)
    common = dict(identity, start=start, end=end, tokens=end - start, window=None if item.capacity is None else
                  item.capacity - identity["sinks"], text_cycled=bench.tokens.cycles(end),
                  pretraining_length=getattr(bench.config, "max_position_embeddings", None))
    kind = method(item.method)
    if kind.rope_scaling:
        common["rope_scaling"] = {"type": kind.rope_scaling[0], "factor": kind.rope_scaling[1]}
    label = f"quality: {item.method}" + (f" {item.capacity}" if item.capacity else "") + f" @ {item.length:,}" + (
        f" ({item.scheme})" if item.scheme and len(cfg.position_schemes) > 1 else "")
    task = bench.progress.add_task(label, total=end - start,
                                   unit="positions" if item.method == "recompute" else "tokens")

    def progress(done, total):
        bench.progress.update(task, completed=done, total=total)

    started = time.perf_counter()
    try:
        if is_dense(item.method):
            fields = _dense(bench, item, start, end, progress)
        elif item.method == "recompute":
            fields = _recompute(bench, item, start, end, records, progress)
        else:
            fields = _streaming(bench, item, start, end, progress)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        # any allocator failure is an oom record, on CPU as on CUDA, and the run goes on
        if not clocks.is_allocation_failure(err):
            raise
        bench.free_memory()
        fields = dict(status="oom", error=clocks.oom_message(err))
    finally:
        bench.progress.remove_task(task)
    return dict(common, **fields, wall_s=time.perf_counter() - started)


def _summary(nll: np.ndarray, start: int, sampled: bool) -> dict:
    return summarise(nll, sampled=sampled, bucket_tokens=BUCKET_TOKENS, first=start)


def _streaming(bench, item, start, end, progress) -> dict:
    model, cfg = bench.model, bench.cfg
    sinks = method(item.method).sinks(cfg)
    window = item.capacity - sinks
    ids = stream_ids(bench, end)
    if uses_alibi(model):
        if item.scheme != "in-cache":
            return {"status": "unsupported", "evaluator": "token-by-token",
                    "error": f"{item.scheme} positions: ALiBi models ({model.config.model_type}) are evaluated token "
                             "by token through SinkCache / WindowCache, which keep in-cache positions only"}
        nll, first, fed = _alibi_token_by_token(bench, ids, sinks, item.capacity, start, end, progress)
        evaluator = "token-by-token"
    else:
        result = stream_nll(model, ids, num_sinks=sinks, window=window, position_scheme=item.scheme, start=start,
                            end=end, on_progress=progress)
        nll, first, fed, evaluator = result.nll, result.streamed_from, result.tokens_fed, "chunked"
    return dict(status="ok", evaluator=evaluator, streamed_from=first, tokens_fed=fed, sampled=False,
                sample_size=None, **_summary(nll, start, sampled=False))


def _alibi_token_by_token(bench, ids, sinks, capacity, start, end, progress):
    """Token by token through a streaming cache, from the warm-up start with the sinks in front. ALiBi biases a key by
    its index among the cache's keys, not by a position, so the sinks followed by tokens `first..end-1` stream
    exactly as the whole stream would from there on (fact 2)."""
    model = bench.model
    first = warmup_start(model.config.num_hidden_layers, sinks, capacity - sinks, start)
    seq = torch.cat([ids[:sinks], ids[first:end]]) if first else ids[:end]
    offset = (first - sinks) if first else 0  # stream index = sequence index + offset, past the sinks
    cache = streaming_cache(capacity, sinks, model.config, device=bench.device)
    total = seq.numel() - 1
    nll = nll_streaming(model, cache, seq.to(bench.device), on_step=lambda i: progress(i + 1, total))
    return nll[start - offset - 1:end - offset - 1], first, total


def _oom(needed: int, message: str) -> dict:
    return {"status": "oom", "error": message, "kv_bytes_needed": needed, "evaluator": "chunked"}


def _dense(bench, item, start, end, progress) -> dict:
    kind = method(item.method)
    why = kind.unsupported(bench, end)
    if why is not None:
        return {"status": "unsupported", "error": why, "evaluator": "chunked"}
    needed = kind.kv_bytes_needed(bench, end, 1)
    ok, message = clocks.fits(needed, bench.device)
    if not ok:
        return _oom(needed, message)
    try:
        result = dense_nll(bench.model, stream_ids(bench, end), start=start, end=end,
                           rope_scaling=kind.rope_scaling, on_progress=progress)
    except (torch.OutOfMemoryError, MemoryError) as err:
        return _oom(needed, f"OOM: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return dict(status="ok", evaluator="chunked", streamed_from=0, tokens_fed=result.tokens_fed, sampled=False,
                sample_size=None, **_summary(result.nll, start, sampled=False))


def pair_of(records: list[dict], name: str, capacity: int, length: int, scheme: str) -> StreamNLL | None:
    """The finished record of `name` at this capacity, length and scheme, as a StreamNLL (its NLL as recorded)."""
    for rec in records:
        if (rec.get("record") == "quality" and rec.get("status") == "ok" and rec.get("method") == name
                and rec.get("cache_size") == capacity and rec.get("length") == length
                and rec.get("position_scheme") == scheme and rec.get("start") is not None
                and not rec.get("sampled")):
            nll = np.array([np.nan if v is None else v for v in rec["nll"]], dtype=np.float64)
            return StreamNLL(nll=nll, start=rec["start"], end=rec["end"], method=name, num_sinks=rec.get("sinks"),
                             position_scheme=scheme)
    return None


def _recompute(bench, item, start, end, records, progress) -> dict:
    cfg, model = bench.cfg, bench.model
    population = end - start
    exact = cfg.recompute_ppl == "all" or (cfg.recompute_ppl == "auto" and bench.device.type != "cpu")
    ids = stream_ids(bench, end)
    pairing = _pairing(cfg)
    against = None if pairing is None else pair_of(records, pairing[0], item.capacity, item.length, pairing[1])
    nll = np.full(population, np.nan)
    if against is None:  # nothing to pair with: recompute alone, at a uniform sample (or everywhere)
        count = population if exact else min(population, cfg.recompute_samples)
        positions = np.sort(start + np.random.default_rng(cfg.seed).permutation(population)[:count])
        nll[positions - start] = recompute_nll_at(model, ids, positions, item.capacity)
        sampled = count < population
        fields = _summary(nll, start, sampled=sampled)
        return dict(status="ok", evaluator="batched-windows", sampled=sampled, sample_size=count, **fields)
    paired = paired_recompute(
        model, ids, against, context=item.capacity, target_rel_half_width=cfg.recompute_target,
        pilot_positions=population if exact else cfg.recompute_samples,
        max_positions=None if exact else cfg.recompute_max_positions, seed=cfg.seed, on_progress=progress)
    return dict(status="ok", **paired_fields(paired, against, BUCKET_TOKENS))


def paired_fields(paired, against: StreamNLL, bucket_tokens: int) -> dict:
    """A paired recompute's record fields: its NLL where sampled, its PPL with the paired design's interval, and the
    ratio `against` PPL / recompute PPL with its interval (shared by quality at lengths and the paper experiment)."""
    start, population = paired.start, paired.end - paired.start
    nll = np.full(population, np.nan)
    n = paired.positions.size
    sampled = n < population
    nll[paired.positions - start] = paired.recompute_nll
    fields = summarise(nll, sampled=sampled, bucket_tokens=bucket_tokens, first=start)
    if sampled:  # the paired design's interval (finite-population corrected) rather than the plain one
        fields["ppl"], fields["ppl_ci95"] = paired.recompute_ppl, list(paired.recompute_ppl_ci)
    return dict(evaluator="batched-windows", sampled=sampled, sample_size=n, **fields,
                ratio_to=against.method, ratio_position_scheme=against.position_scheme, ratio=paired.ratio,
                ratio_ci95=list(paired.ratio_ci), ratio_rel_half_width=paired.rel_half_width,
                ratio_target=paired.target_rel_half_width, ratio_met_target=paired.met_target,
                ratio_rounds=[[int(k), float(h)] for k, h in paired.rounds])


__all__ = ["QualityItem", "pair_candidates", "paired_fields", "quality_range", "quality_plan", "quality_identity", "run_quality",
           "pair_of", "QUALITY_MODE", "DEFAULT_SCHEME"]
