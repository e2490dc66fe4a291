"""Where the exact evaluator starts streaming (fact 2 of the evaluator: a finite receptive field). Plain integers, no
torch: the ETA's plan uses it too, and a plan is rebuilt from a run's log without loading torch."""


def warmup_start(num_layers: int, num_sinks: int, window: int, start: int) -> int:
    """The first token to stream (after the sinks) so that the logits predicting `start` on are exact:
    `start - 1 - num_layers x (window - 1)`, or 0 (the whole stream) when that is not past the sinks."""
    first = start - 1 - num_layers * (window - 1)
    return first if first > num_sinks else 0
