"""Per-token negative log-likelihood of a text under each method: the quality half of the comparison.

Every function returns `nll[i]` = -log p(ids[i + 1] | what the method keeps of ids[:i + 1]), float64, natural log.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .baselines import recompute_logits
from ..cache.batch import StreamBatch
from ..cache.hf import StreamingCache, dense_cache, uses_alibi
from ..cache.streaming import prefill


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").double()


@torch.inference_mode()
def nll_streaming(model, cache: StreamingCache, ids: torch.Tensor, *, on_step: Callable[[int], None] | None = None
                  ) -> np.ndarray:
    """Token by token through a streaming cache (sink or window), exactly as a stream would see the text.
    `ids`: `[n]` or `[batch, n]`; the result is `[n - 1]` or `[batch, n - 1]`."""
    squeeze = ids.ndim == 1
    ids = ids.view(1, -1) if squeeze else ids
    n = ids.shape[1]
    out = torch.empty(ids.shape[0], n - 1, dtype=torch.float64)

    def record(i, logits):
        if i < n - 1:
            out[:, i] = _token_nll(logits, ids[:, i + 1])
        if on_step is not None:
            on_step(i)

    # ALiBi models take no positions (their bias comes from the order of the keys the cache returns)
    prefill(model, cache, ids[:, : n - 1] if n > 1 else ids, planned_positions=not uses_alibi(model), on_token=record)
    result = out.numpy()
    return result[0] if squeeze else result


@torch.inference_mode()
def nll_dense(model, ids: torch.Tensor, *, chunk: int = 1024, on_step: Callable[[int], None] | None = None
              ) -> np.ndarray:
    """Dense attention over the whole prefix (transformers' DynamicCache), in chunks: exact, since a chunk attends
    to everything before it."""
    ids = ids.view(1, -1)
    n = ids.shape[1]
    cache = dense_cache(model.config)
    out = np.empty(n - 1, dtype=np.float64)
    for start in range(0, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        logits = model(ids[:, start:stop], cache=cache, use_cache=True).logits[0]
        out[start:stop] = _token_nll(logits, ids[0, start + 1:stop + 1]).cpu().numpy()
        if on_step is not None:
            on_step(stop - 1)
    return out


@torch.inference_mode()
def nll_recompute(model, ids: torch.Tensor, context: int, positions=None, *,
                  on_step: Callable[[int], None] | None = None) -> np.ndarray:
    """Sliding window with re-computation over a `context` of tokens, at the given prediction indices (default:
    all); NaN elsewhere."""
    ids = ids.view(1, -1)
    n = ids.shape[1]
    out = np.full(n - 1, np.nan)
    indices = range(n - 1) if positions is None else positions
    for i in indices:
        logits = recompute_logits(model, ids[:, : i + 1], context)
        out[i] = _token_nll(logits, ids[0, i + 1:i + 2]).item()
        if on_step is not None:
            on_step(i)
    return out


def stream_batch_nll_step(model, batch: StreamBatch, token: torch.Tensor, next_token: torch.Tensor) -> np.ndarray:
    """One token of a text through every row of `batch` (each row a different cache over the same text): the NLL
    of `next_token` per row, `[rows]`. Call under torch.inference_mode."""
    rows = len(batch.caches)
    logits = model(token.view(1, 1).expand(rows, 1), cache=batch, position_ids=batch.position_ids(),
                   attention_mask=batch.attention_mask(), use_cache=True).logits[:, -1]
    return _token_nll(logits, next_token.view(1).expand(rows)).cpu().numpy()


def _exp(x: float) -> float:
    """exp that overflows to infinity instead of raising: a model can be that wrong (a perplexity past ~1e308 is
    stored as null in JSON, which the report and summaries show as infinite)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity(nll: np.ndarray) -> float:
    values = nll[~np.isnan(nll)]
    return float(_exp(values.mean())) if values.size else float("nan")


def sampled_perplexity(nll: np.ndarray) -> tuple[float, float, float]:
    """PPL of a random sample of positions with a 95% confidence interval (normal approximation on the mean NLL)."""
    values = nll[~np.isnan(nll)]
    if values.size < 2:
        return float("nan"), float("nan"), float("nan")
    mean = values.mean()
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    return _exp(mean), _exp(mean - half), _exp(mean + half)


def summarise(nll: np.ndarray, *, sampled: bool, bucket_tokens: int, first: int = 1) -> dict:
    """The quality fields of a results record from per-token NLL: `ppl` (with `ppl_ci95` when `sampled`), PPL per
    bucket of `bucket_tokens` positions (numbered by stream index: `nll[0]` predicts token `first`, 1 for a stream
    measured from its start), and the NLL itself rounded (None where not computed)."""
    if sampled:
        ppl, low, high = sampled_perplexity(nll)
        ci = [low, high]
    else:
        ppl, ci = perplexity(nll), None
    buckets = []
    for start in range(0, len(nll), bucket_tokens):
        part = nll[start:start + bucket_tokens]
        count = int((~np.isnan(part)).sum())
        buckets.append({"start": start + first, "end": start + len(part) + first, "tokens": count,
                        "ppl": perplexity(part) if count else None})
    return {"ppl": ppl, "ppl_ci95": ci, "buckets": buckets,
            "nll": [None if math.isnan(v) else round(float(v), 5) for v in nll]}
