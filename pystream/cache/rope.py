"""RoPE maths for the cache: the model's frequencies (`RotarySpec`), in-place rotations in the rotate-half layout,
and rotation tables built from buffers allocated once (`RotationAngles`). Nothing here knows about caches or
transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class RotarySpec:
    """RoPE as the model applies it, in the rotate-half layout (Llama, Mistral, Qwen2, GPT-NeoX).

    `inv_freq` is `[rotary_dim // 2]` float64 on the CPU; the first `rotary_dim` features of each head are rotated
    (GPT-NeoX rotates only part of the head).
    """

    inv_freq: torch.Tensor
    rotary_dim: int

    def __post_init__(self):
        if self.inv_freq.ndim != 1 or 2 * self.inv_freq.numel() != self.rotary_dim:
            raise ValueError(
                f"inv_freq must be 1-D with rotary_dim // 2 = {self.rotary_dim // 2} entries, "
                f"got shape {tuple(self.inv_freq.shape)}"
            )

    def cos_sin(self, shifts: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """cos and sin of `shifts[..., None] * inv_freq`, computed in float64 then cast: `[*shifts.shape, rot/2]`."""
        angles = shifts.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(torch.float64)
        # float64: the angle is exact to ~1e-16 of the shift, far below float32 rounding for the shifts the cache
        # uses (small with its own positions); reducing it before the cast keeps sin/cos of large angles exact.
        angles = torch.remainder(angles, 2 * math.pi)
        return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)

    def full_cos_sin(self, shifts: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """The full-width tables `rotate_into` / `rotate_inplace` take: `cat(cos, cos)` and `cat(-sin, sin)`,
        `[*shifts.shape, rotary_dim]`."""
        cos, sin = self.cos_sin(shifts, dtype, device)
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


# Buffers that outlive one forward are made outside inference mode: tensors made inside it could never again be
# written outside it (a user may switch between inference_mode and no_grad), while normal tensors can be written in
# both.
persistent = torch.inference_mode(False)


def rotate_into(out: torch.Tensor, src: torch.Tensor, src_swapped: torch.Tensor, cos: torch.Tensor,
                sin_signed: torch.Tensor) -> None:
    """out = RoPE-rotate(src), in two ops and no allocation.

    Rotate-half RoPE maps [x1, x2] to [x1 cos - x2 sin, x2 cos + x1 sin], which is
    src * cat(cos, cos) + cat(x2, x1) * cat(-sin, sin): with `src_swapped` = cat(x2, x1) kept beside `src`, and the
    full-width `cos` and `sin_signed` tables, one multiply and one multiply-add do it.
    `src`, `src_swapped`, `out`: `[..., rotary_dim]`, `out` not overlapping the others.
    """
    torch.mul(src, cos, out=out)
    out.addcmul_(src_swapped, sin_signed)


def rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, scratch: torch.Tensor) -> None:
    """x = RoPE-rotate(x) in place (full-width tables as for `rotate_into`); `scratch` is shaped like
    `x[..., :rotary_dim // 2]`."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin_signed[..., half:]
    x1, x2 = x[..., :half], x[..., half:]
    scratch.copy_(x1)
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).addcmul_(scratch, sin)


class RotationAngles:
    """Full-width rotation tables for `shift * inv_freq` per stream, `cat(cos, cos)` and `cat(-sin, sin)`, each
    `[batch or 1, 1, 1, rotary_dim]` in the model's dtype and device (see `rotate_into`), from buffers allocated once:
    the decode step allocates nothing.

    Shifts in [0, table_size) shared by every stream (the common case with the cache's own positions) are views of a
    precomputed table; others are computed in float64 on the CPU into preallocated buffers, then copied over.
    """

    @persistent
    def __init__(self, rotary: RotarySpec, batch: int, dtype: torch.dtype, device: torch.device, table_size: int):
        half = rotary.rotary_dim // 2
        self.inv_freq = rotary.inv_freq.to(torch.float64)
        self.shift = torch.zeros(batch, 1, dtype=torch.float64)
        self.shift_np = self.shift.numpy()[:, 0]
        self.angle = torch.empty(batch, half, dtype=torch.float64)
        # cos/sin in float64 land here first: an out= of another dtype would make a temporary every call.
        self.cos64, self.sin64 = torch.empty_like(self.angle), torch.empty_like(self.angle)
        self.cos = torch.empty(batch, 1, 1, 2 * half, dtype=dtype, device=device)
        self.sin = torch.empty_like(self.cos)
        # Assembled on the host in the model's dtype, then one contiguous copy each: a copy into a strided slice of a
        # GPU tensor, or one that converts dtypes on the way, would allocate a temporary on the device every call.
        on_host = torch.device(device).type == "cpu"
        self.cos_host = self.cos.view(batch, 2 * half) if on_host else torch.empty(batch, 2 * half, dtype=dtype)
        self.sin_host = self.sin.view(batch, 2 * half) if on_host else torch.empty(batch, 2 * half, dtype=dtype)
        table_cos, table_sin = rotary.full_cos_sin(torch.arange(table_size), dtype, device)
        self.table_cos, self.table_sin = table_cos[:, None, None, :], table_sin[:, None, None, :]
        self.table_size = table_size
        self.half = half

    def __call__(self, shifts: list[int]):
        first = shifts[0]
        if 0 <= first < self.table_size and all(v == first for v in shifts):
            return self.table_cos[first:first + 1], self.table_sin[first:first + 1]
        self.shift_np[:] = shifts
        torch.mul(self.shift, self.inv_freq, out=self.angle)
        torch.remainder(self.angle, 2 * math.pi, out=self.angle)
        half = self.half
        torch.cos(self.angle, out=self.cos64)
        torch.sin(self.angle, out=self.sin64)
        self.cos_host[:, :half].copy_(self.cos64)
        self.cos_host[:, half:].copy_(self.cos64)
        self.sin_host[:, half:].copy_(self.sin64)
        torch.neg(self.sin_host[:, half:], out=self.sin_host[:, :half])
        if self.cos_host.data_ptr() != self.cos.data_ptr():
            # From pageable host memory: the copy has read the host buffer when it returns, so the next call may
            # overwrite it right away.
            self.cos.view_as(self.cos_host).copy_(self.cos_host, non_blocking=True)
            self.sin.view_as(self.sin_host).copy_(self.sin_host, non_blocking=True)
        return self.cos, self.sin


def fill_swapped(swapped: torch.Tensor, store: torch.Tensor, rotary_dim: int) -> None:
    """swapped = cat(x2, x1) of the rotated part of `store` (the twin `rotate_into` takes)."""
    half = rotary_dim // 2
    swapped[..., :half].copy_(store[..., half:2 * half])
    swapped[..., half:].copy_(store[..., :half])
