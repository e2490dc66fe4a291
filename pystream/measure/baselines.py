"""The baselines StreamingLLM is compared with: dense attention (transformers' own `DynamicCache`), sliding window
with re-computation, and the paper's own cache implementation (`PaperCache`, in `pystream.cache.paper`)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def recompute_logits(model, input_ids: torch.Tensor, context: int) -> torch.Tensor:
    """Sliding window with re-computation: run the model from scratch on the last `context` tokens of `input_ids`
    (`[batch, n]`), at positions 0..context-1, and return the logits of the last one, `[batch, vocab]`.

    Quality is the reference for any window method; cost is O(context^2) per token.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    tokens = input_ids[:, -context:]
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
    # Only the last position's logits are needed: skipping the other window-1 rows of the LM head is what any sane
    # implementation of this baseline does (for SmolLM2 at 1,024 tokens it saves 15% of the step).
    return model(tokens, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]



def compiled_recompute(model, context: int, batch: int, device):
    """Sliding window with re-computation as a compiled step (`pystream.cache.compiled.CompiledDecoder`):
    `decoder(tokens [batch, context]) -> logits [batch, vocab]`, the same computation as `recompute_logits` once the
    context is full (every step then has the same shapes)."""
    from ..cache.compiled import CompiledDecoder

    with torch.inference_mode(False):
        positions = torch.arange(context, device=device).unsqueeze(0).expand(batch, -1).contiguous()

    def forward(tokens):
        return model(tokens, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]

    return CompiledDecoder(forward, device)
