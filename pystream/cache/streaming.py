"""Drivers that feed a model through a streaming cache: prompts of any length, greedy generation, per-token NLL.

They use only the public model API (`model(input_ids, cache=..., position_ids=...)`, `model.generate`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .hf import StreamingCache


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer tensor of shape [batch, tokens]")
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    return input_ids


@torch.inference_mode()
def prefill(model, cache: StreamingCache, input_ids: torch.Tensor, *, planned_positions: bool = True,
            on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Feed `input_ids` `[batch, n]` (any n) through `cache` with the same result as feeding them one at a time.

    The tokens that fit before the cache starts evicting go in one forward; the rest one per forward (a chunk that
    evicts its own tokens cannot be computed exactly through transformers' causal mask).

    Args:
        planned_positions: use the cache's re-based positions (small, float32-exact however long the stream); False
            uses the model's default (tokens seen), which `model.generate` needs to continue from this cache.
        on_token: called as `on_token(i, logits)` with the `[batch, vocab]` logits after every token i.

    Returns the logits after the last token, `[batch, vocab]`.
    """
    input_ids = _check_ids(input_ids)
    n = input_ids.shape[1]
    if n == 0:
        raise ValueError("nothing to prefill: input_ids has no tokens")
    first = max(1, min(n, cache.capacity - cache.seen()))
    done, logits = 0, None
    while done < n:
        chunk = input_ids[:, done:done + (first if done == 0 else 1)]
        positions = cache.forward_positions(chunk.shape[1], chunk.device) if planned_positions else None
        kwargs = {} if positions is None else {"position_ids": positions}
        out = model(chunk, cache=cache, use_cache=True, **kwargs)
        if on_token is not None:
            for i in range(chunk.shape[1]):
                on_token(done + i, out.logits[:, i])
        logits = out.logits[:, -1]
        done += chunk.shape[1]
    return logits


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, cache: StreamingCache, **generate_kwargs):
    """`model.generate` with a streaming cache and a prompt of any length.

    The prompt but its last token goes through `prefill` (exact, however long); `model.generate` then continues
    from the filled cache. Returns what `model.generate` returns (the prompt followed by the new tokens).
    """
    input_ids = _check_ids(input_ids)
    if cache.seen() != 0:
        raise ValueError("generate() starts from an empty cache; call cache.reset() first")
    if input_ids.shape[1] > 1:
        prefill(model, cache, input_ids[:, :-1], planned_positions=False)
    return model.generate(input_ids, cache=cache, **generate_kwargs)
