"""The baselines StreamingLLM is compared with: dense attention (transformers' own `DynamicCache`), sliding window
with re-computation, and the paper's own cache implementation (`PaperCache`, in `pystream.hf`)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def recompute_logits(model, input_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding window with re-computation: run the model from scratch on the last `window` tokens of `input_ids`
    (`[batch, n]`), at positions 0..window-1, and return the logits of the last one, `[batch, vocab]`.

    Quality is the reference for any window method; cost is O(window^2) per token.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    context = input_ids[:, -window:]
    positions = torch.arange(context.shape[1], device=context.device).unsqueeze(0).expand(context.shape[0], -1)
    # Only the last position's logits are needed: skipping the other window-1 rows of the LM head is what any sane
    # implementation of this baseline does (for SmolLM2 at 1,024 tokens it saves 15% of the step).
    return model(context, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]

