"""The positions half of `StreamingKV`: handing the model the positions of the next tokens (host-to-device staging
through buffers made once) and adopting the positions a caller used instead."""

from __future__ import annotations

import torch

from .rope import persistent


class PositionPlanner:
    """Mixin of `StreamingKV` (uses its `ring`, `rotary`, `logical_order`, `_planned` and `_device()`)."""

    def position_ids(self, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Model positions `[batch, num_tokens]` for the next tokens, kept below S + W - 1 + rebase_interval.

        Pass them as `position_ids=` to the model: the paper's positions-inside-the-cache at float32-exact angles,
        however long the stream. Before the first forward (no streams yet) they are `[1, num_tokens]`, valid for
        any batch.
        """
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        if self.logical_order:
            raise ValueError("this model takes no positions (ALiBi biases come from the order of the keys)")
        if self.rotary is None:
            raise ValueError("re-basing positions needs the model's rotary embedding: build the cache with config=")
        ring = self.ring
        if ring is None:
            # Fresh streams start at position 0 in frame 0: nothing to book yet.
            positions = torch.arange(num_tokens).unsqueeze(0)
            device = device if device is not None else self._device()
            self._planned = positions.to(device) if device is not None else positions
            return self._planned
        if device is None:
            device = self._device()
        if num_tokens == 1:
            # The decode step reuses one buffer (a tensor from an earlier step is overwritten: use it right away).
            host, on_device, host_np, copied = self._decode_positions(ring.num_streams, device)
            if copied is not None:
                # The last step's copy out of this pinned buffer runs asynchronously: it must have read the buffer
                # before the ring writes the next positions into it (no-op once the GPU has caught up).
                copied.synchronize()
        else:
            host = torch.empty(ring.num_streams, num_tokens, dtype=torch.int64)
            on_device, host_np, copied = None, host.numpy(), None
        for b in range(ring.num_streams):
            ring.plan(b, num_tokens, host_np[b])
        if on_device is None:
            positions = host.to(device) if device is not None else host
        elif on_device is host:
            positions = host
        else:
            positions = on_device.copy_(host, non_blocking=True)
            if copied is not None:
                copied.record()
        self._planned = positions
        return positions

    def _decode_positions(self, streams: int, device):
        key = (streams, None if device is None else str(device))
        buffers = self._position_buffers.get(key)
        if buffers is None:
            buffers = self._make_decode_positions(key, streams, device)
        return buffers

    @persistent
    def _make_decode_positions(self, key, streams: int, device):
        host = torch.empty(streams, 1, dtype=torch.int64)
        on_device = host if device is None or torch.device(device).type == "cpu" else \
            torch.empty(streams, 1, dtype=torch.int64, device=device)
        copied = None
        if on_device is not host and on_device.device.type == "cuda":
            host, copied = host.pin_memory(), torch.cuda.Event()
        buffers = self._position_buffers[key] = (host, on_device, host.numpy(), copied)
        return buffers

    def _adopt_positions(self, position_ids: torch.Tensor | None, n: int) -> None:
        """Make the ring's frame match the positions the model rotated the new tokens with."""
        if position_ids is None or position_ids is self._planned or self.logical_order:
            return
        ring = self.ring
        streams = ring.num_streams
        if position_ids.ndim == 1:
            position_ids = position_ids.unsqueeze(0)
        rows = position_ids.shape[0]
        if position_ids.ndim != 2 or position_ids.shape[-1] != n or rows not in (1, streams):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not match {streams} stream(s) of "
                f"{n} new token(s)"
            )
        values = position_ids.tolist()  # a handful of ints: no tensor is made
        for row in values:
            if row != list(range(row[0], row[0] + n)):
                raise ValueError("position_ids must be consecutive within each stream (a stream has no gaps)")
        for b in range(streams):
            p = values[b if rows > 1 else 0][0]
            if p != ring.next_position(b):
                if self.rotary is None:
                    raise ValueError(
                        f"stream {b}: the model used position {p}, the cache expected {ring.next_position(b)}; "
                        "moving the frame needs the model's rotary embedding: build the cache with config="
                    )
                ring.adopt(b, int(p))
