"""Exact StreamingLLM attention for a whole chunk of a stream in one forward, through transformers' public
attention-function registry (`AttentionInterface`): no model code is patched, no cache object is involved.

Why it is exact (the two facts of issue 13). With the paper's in-cache positions, the query of stream token t sees
the S sinks and the W most recent tokens (itself included). The window is contiguous and ends at the query, so every
window key sits at its true distance from the query: ordinary banded causal attention at true positions. Only the sink
term differs: the query sees sink i at distance min(t, S + W - 1) - i, i.e. as if the query sat at position
min(t, S + W - 1). So each query row is rotated once more for the sink term, and the sink and window scores share
one softmax. Every token's keys and values are then exactly those token-by-token streaming computes (up to float
rounding), whatever the chunk size.

Position schemes (named in results):
- "in-cache": the paper (and `SinkCache` / `WindowCache`): sink i at distance min(t, S + W - 1) - i.
- "original": keys keep the positions they were computed at (ExecuTorch's ring buffer, kvpress without
  re-rotation): sink i at its true distance t - i; the window is the same in both schemes.

Float precision: each chunk is fed to the model at positions relative to a frame base, the oldest window key it
needs (only distances matter for RoPE), so positions stay below `window - 1 + chunk` and float32 RoPE angles are as
exact at token 1G as at token 1k. The carried window keys are kept exactly as the model computed them, each with the
base of its own chunk, and rotated into the new frame once per chunk from that copy (float64 angles, reduced modulo
2 pi before the cast): no rounding accumulates however often the frame moves. The extra sink rotation of the query is
computed the same way.

Scope: batch 1; the RoPE architectures Llama, Mistral, Qwen2, GPT-NeoX (partial rotary), any dtype and device.
BLOOM and MPT (ALiBi) compute their attention in their own modules, outside the registry, and build their bias from
the key index (BLOOM: from a 2D mask) in a way a public 4D mask cannot override without also breaking that bias:
they are token-by-token only (`UnsupportedModelError`).

This is the only module of the evaluator that touches transformers' attention internals.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import AttentionInterface

from pystream.cache.hf import UnsupportedModelError, check_supported, rotary_spec, sliding_window_of, uses_alibi

__all__ = ["ATTENTION_NAME", "POSITION_SCHEMES", "ChunkedStream", "chunked_attention_enabled"]

ATTENTION_NAME = "pystream_chunked"
POSITION_SCHEMES = ("in-cache", "original")
# The keyword under which the stream reaches the attention function: transformers forwards unknown keyword arguments
# of `model(...)` through the decoder layers to the attention function (TransformersKwargs).
_STREAM_KWARG = "pystream_chunked_stream"


def _chunked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. `query` `[1, heads, C, head_dim]`, `key`/`value` `[1, kv_heads, C,
    head_dim]` (rotated by the model at the frame positions `ChunkedStream` passed); returns `[1, C, heads,
    head_dim]` and no weights, like transformers' sdpa function. The mask transformers builds is ignored (it makes
    none for an implementation outside its mask registry): the stream knows the exact visibility."""
    stream = kwargs.get(_STREAM_KWARG)
    if stream is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} runs only inside ChunkedStream.forward")
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError("chunked streaming attention does not implement attention logit soft-capping")
    return stream._attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, _chunked_attention)


@contextlib.contextmanager
def chunked_attention_enabled(model):
    """Within the block the model runs `ATTENTION_NAME` (through `set_attn_implementation`, transformers' public
    switch); its previous implementation is put back after."""
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        yield model
        return
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def check_chunkable(model) -> None:
    """Raise `UnsupportedModelError` unless `ChunkedStream` can evaluate this model exactly."""
    check_supported(model)
    if uses_alibi(model):
        raise UnsupportedModelError(
            f"model type {model.config.model_type!r} computes its ALiBi attention in its own code, outside "
            "transformers' attention registry, so the chunked evaluator cannot serve it: evaluate it token by token "
            "(pystream.measure.quality.nll_streaming)"
        )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE by the angles whose cos/sin are given (`[..., rot // 2]`, broadcast against `x`'s leading
    dims) on the first `rot` features of `x` `[..., head_dim]`; the rest pass through (GPT-NeoX's partial rotary)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class _Layer:
    # win_k holds the carried window keys as the model rotated them, each in the frame of the chunk that computed it
    __slots__ = ("sink_k", "sink_v", "win_k", "win_v")

    def __init__(self):
        self.sink_k = self.sink_v = self.win_k = self.win_v = None


class ChunkedStream:
    """One stream (batch 1) under a sink (`num_sinks` > 0) or window (`num_sinks` == 0) cache of `num_sinks +
    window` slots, the window counting the query (the paper's 4+1020 is `ChunkedStream(model, 4, 1020)`), evaluated
    a chunk of tokens per forward with exactly the logits token-by-token streaming through `SinkCache` /
    `WindowCache` gives (in-cache scheme), or a cache that keeps original positions ("original").

    State kept per layer: the sinks' keys/values (rotated at positions 0..S-1) and the last `window - 1` non-sink
    tokens' keys/values (rotated in the current frame): O(capacity) memory, like the cache.

    >>> stream = ChunkedStream(model, 4, 252)
    >>> logits = stream.forward(ids[:512], first_token=0)        # [512, vocab]
    >>> logits = stream.forward(ids[512:1024], first_token=512)  # continues

    `forward(..., first_token=L0)` with L0 past the next token (once the sinks are in) skips ahead: the window is
    emptied and the stream continues from L0, as a cache whose window held nothing before L0 (the warm-up of fact 2:
    after `num_hidden_layers * (window - 1)` tokens the state equals the full stream's exactly).
    """

    def __init__(self, model, num_sinks: int, window: int, *, position_scheme: str = "in-cache"):
        check_chunkable(model)
        if num_sinks < 0 or window < 1:
            raise ValueError(f"need num_sinks >= 0 and window >= 1, got {num_sinks} and {window}")
        if position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"unknown position scheme {position_scheme!r}; choose from {', '.join(POSITION_SCHEMES)}")
        sliding = sliding_window_of(model.config)
        if sliding is not None and num_sinks + window > sliding:
            raise ValueError(f"the cache holds {num_sinks + window} tokens but the model attends to at most "
                             f"{sliding} (config.sliding_window)")
        self.model = model
        self.num_sinks, self.window = int(num_sinks), int(window)
        self.capacity = self.num_sinks + self.window
        self.position_scheme = position_scheme
        self.rotary = rotary_spec(model)
        self.num_layers = model.config.num_hidden_layers
        self.reset()

    # ---- state ---------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: the next forward starts the stream at token 0."""
        self.next_token = 0          # stream index of the next token expected
        self.base = 0                # frame base: stream token j is fed to the model at position j - base
        self.win_count = 0           # carried window keys (the last window - 1 non-sink tokens)
        self.win_bases = torch.zeros(0, dtype=torch.int64)  # frame base each carried key was computed in
        self.rebases = 0             # chunks whose carried keys had to be rotated into a new frame
        self._layers = [_Layer() for _ in range(self.num_layers)]
        self._chunk = None

    def snapshot(self) -> tuple:
        """The stream's state, to `restore` later (to branch a stream: feed a probe, then go back). Cheap: a chunk
        never writes into a stored tensor (it stores new ones), so the state holds references, not copies."""
        layers = tuple((l.sink_k, l.sink_v, l.win_k, l.win_v) for l in self._layers)
        return (self.next_token, self.base, self.win_count, self.win_bases, self.rebases, layers)

    def restore(self, state: tuple) -> None:
        self.next_token, self.base, self.win_count, self.win_bases, self.rebases, layers = state
        for layer, (sk, sv, wk, wv) in zip(self._layers, layers):
            layer.sink_k, layer.sink_v, layer.win_k, layer.win_v = sk, sv, wk, wv

    @property
    def carried(self) -> int:
        """Window keys carried into the next chunk (at most `window - 1`)."""
        return self.win_count

    # ---- frame ---------------------------------------------------------------------------------------------------
    def _angles(self, shifts: torch.Tensor, like: torch.Tensor):
        """cos, sin of `shifts[:, None] * inv_freq` (float64, reduced mod 2 pi, then cast like `like`)."""
        angles = shifts.to(torch.float64)[:, None] * self.rotary.inv_freq[None, :]
        angles = torch.remainder(angles, 2 * math.pi)
        return angles.cos().to(like.device, like.dtype), angles.sin().to(like.device, like.dtype)

    def _carried_shift(self, new_base: int) -> torch.Tensor:
        """Per carried key `[win_count]`: the rotation taking it from the frame it was computed in to the frame
        `new_base` (a key computed at position j - b sits at j - new_base after a rotation by b - new_base)."""
        return self.win_bases - new_base

    def _sink_query_shift(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per query (stream index `tokens` `[C]`, int64): the extra rotation of its query for the sink term,
        position-the-sinks-should-see minus frame position. Sinks are stored rotated at positions 0..S-1."""
        frame = tokens - self.base
        if self.position_scheme == "in-cache":
            return tokens.clamp(max=self.capacity - 1) - frame
        return tokens - frame  # original: the query at its true position t, so sink i at distance t - i

    # ---- forward -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, first_token: int | None = None) -> torch.Tensor:
        """Feed stream tokens `first_token .. first_token + C - 1` (`ids` `[C]` or `[1, C]`, on the model's device)
        in one forward; returns their logits `[C, vocab]` (row r predicts token `first_token + r + 1`).

        `first_token` defaults to the next token; a larger value (only once every sink is in) skips ahead and empties
        the window (warm-up)."""
        ids = ids.reshape(1, -1)
        count = ids.shape[1]
        if count == 0:
            raise ValueError("empty chunk")
        first = self.next_token if first_token is None else int(first_token)
        if first < self.next_token:
            raise ValueError(f"the stream is at token {self.next_token}; cannot go back to {first} (reset() first)")
        if first > self.next_token:
            if self.next_token < self.num_sinks:
                raise ValueError(f"feed the {self.num_sinks} sink tokens before skipping ahead to token {first}")
            self.win_count = 0
            self.win_bases = self.win_bases[:0]
            for layer in self._layers:
                layer.win_k = layer.win_v = None
        tokens = torch.arange(first, first + count, dtype=torch.int64)
        oldest = first - self.win_count
        last = first + count - 1
        # The frame starts at the oldest key this chunk needs, so positions are 0 .. window - 2 + count; a chunk
        # holding sinks is at the stream's start (frame base 0), so the sinks are rotated at positions 0..S-1.
        new_base = 0 if first < self.num_sinks else oldest
        carry_shift = self._carried_shift(new_base)
        carry_angles = None
        if self.win_count and bool((carry_shift != 0).any()):
            carry_angles = carry_shift
            self.rebases += 1
        self.base = new_base
        n_sinks_here = max(0, min(self.num_sinks - first, count))
        sinks_total = min(self.num_sinks, last + 1)
        device = ids.device
        # Visibility (stream indices): sink i for i <= t; window key j (non-sink) for t - W + 1 <= j <= t.
        # window keys in the order `_attend` concatenates them: carried, then the chunk's non-sink tokens; a
        # contiguous run of stream indices
        win_start = max(oldest, self.num_sinks)
        win_tokens = torch.arange(win_start, max(win_start, last + 1), dtype=torch.int64)
        t = tokens[:, None]
        sink_mask = torch.arange(sinks_total)[None, :] <= t
        win_mask = (win_tokens[None, :] <= t) & (win_tokens[None, :] > t - self.window)
        shift = self._sink_query_shift(tokens)
        self._chunk = {
            "tokens": tokens, "n_sinks_here": n_sinks_here, "win_start": win_start, "first": first,
            "sink_mask": sink_mask, "win_mask": win_mask, "biases": {},
            "shift": shift, "angles": {}, "carry_shift": carry_angles, "carry_angles": {},
        }
        positions = (tokens - self.base).to(device).view(1, -1)
        try:
            with chunked_attention_enabled(self.model):
                out = self.model(ids, position_ids=positions, use_cache=False, **{_STREAM_KWARG: self})
        finally:
            self._chunk = None
        keep = min(self.window - 1, int(win_tokens.numel()))
        fresh = int(win_tokens.numel()) - self.win_count  # the chunk's own window keys, computed in this frame
        bases = torch.cat((self.win_bases, torch.full((fresh,), new_base, dtype=torch.int64)))
        self.win_bases = bases[bases.numel() - keep:]
        self.win_count = keep
        self.next_token = last + 1
        return out.logits[0]

    # ---- attention -----------------------------------------------------------------------------------------------
    # None: fused (torch's scaled_dot_product_attention) for half precision, the blocked float32 softmax otherwise;
    # True / False force one (the float32 oracles run both, so each path is checked exactly).
    fused: bool | None = None
    fused_block = 256  # query rows per fused call (measured: 256 beats 64, 128 and 512 at 4+252 and 4+1020)

    def _fused(self, dtype) -> bool:
        # Half precision: the fused kernel keeps the scores in float32 inside and runs the matrix products on the
        # CPU's bfloat16 units; the blocked path would copy every score block to float32. In float32 the blocked path
        # is as fast and needs no padding.
        return dtype in (torch.float16, torch.bfloat16) if self.fused is None else self.fused

    def _attend_fused(self, chunk, layer, query, win_k, win_v, scaling):
        """The same attention as the blocked path, by `scaled_dot_product_attention` per query block. The sink term
        needs the query rotated once more, so sink and window share one softmax through a doubled head dimension:
        query `[q | q_sink]`, window keys `[k | 0]`, sink keys `[0 | k_sink]` (a score is then exactly one of the
        two dot products); values are padded to the same width, as the fused kernels want, and the padding dropped
        from the output."""
        batch, heads, count, head_dim = query.shape
        sink_k = layer.sink_k
        win_mask = chunk["win_mask"].to(query.device)
        if sink_k is not None:
            q = torch.cat((query, self._rotate_cached(chunk, "sink", query)), dim=-1)
            win_k = torch.cat((win_k, torch.zeros_like(win_k)), dim=-1)
            win_v = torch.cat((win_v, torch.zeros_like(win_v)), dim=-1)
            sink_k = torch.cat((torch.zeros_like(sink_k), sink_k), dim=-1)
            sink_v = torch.cat((layer.sink_v, torch.zeros_like(layer.sink_v)), dim=-1)
            sink_mask = chunk["sink_mask"].to(query.device)
        else:
            q = query
        out = torch.empty(batch, heads, count, head_dim, dtype=query.dtype, device=query.device)
        block = self.fused_block
        first, win_start = chunk["first"], chunk["win_start"]
        for a in range(0, count, block):
            b = min(count, a + block)
            lo = max(0, first + a - self.window + 1 - win_start)  # window keys rows a..b-1 can see
            hi = max(lo, first + b - win_start)
            keys, values, mask = win_k[:, :, lo:hi], win_v[:, :, lo:hi], win_mask[a:b, lo:hi]
            if sink_k is not None:
                keys, values = torch.cat((sink_k, keys), dim=2), torch.cat((sink_v, values), dim=2)
                mask = torch.cat((sink_mask[a:b], mask), dim=1)
            res = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a:b], keys, values, attn_mask=mask, scale=scaling, enable_gqa=heads != keys.shape[1])
            out[:, :, a:b] = res[..., :head_dim]
        return out.transpose(1, 2).contiguous()

    def _biases(self, chunk, dtype, device):
        """The chunk's visibility as additive biases (0 visible, -inf hidden): window `[C, window keys]` and sinks
        `[C, sinks]`, made once per chunk and reused by every layer."""
        key = (dtype, device)
        cached = chunk["biases"].get(key)
        if cached is None:
            def bias(mask):
                return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).to(device)
            cached = chunk["biases"][key] = (bias(chunk["win_mask"]), bias(chunk["sink_mask"]))
        return cached

    def _rotate_cached(self, chunk, which: str, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x` (`[..., n, head_dim]`) row by row by the chunk's "sink" shifts (one per query) or "carry"
        shifts (one per carried key); the cos/sin tables are made once per chunk and reused by every layer.
        Half-precision inputs are rotated in float32 and cast back once."""
        tables = chunk["angles" if which == "sink" else "carry_angles"]
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        key = (work, x.device)
        if key not in tables:
            tables[key] = self._angles(chunk["shift" if which == "sink" else "carry_shift"],
                                       torch.empty(0, dtype=work, device=x.device))
        cos, sin = tables[key]  # [n, rot/2], broadcast over the leading dims
        return _rotate(x.to(work), cos, sin).to(x.dtype)

    def _attend(self, layer_idx: int, query, key, value, scaling):
        chunk = self._chunk
        layer = self._layers[layer_idx]
        n_s = chunk["n_sinks_here"]
        if n_s:  # the chunk's sink tokens join the sink store (rotated at positions i: frame base 0)
            ks, vs = key[:, :, :n_s], value[:, :, :n_s]
            layer.sink_k = ks if layer.sink_k is None else torch.cat((layer.sink_k, ks), dim=2)
            layer.sink_v = vs if layer.sink_v is None else torch.cat((layer.sink_v, vs), dim=2)
            key, value = key[:, :, n_s:], value[:, :, n_s:]
        if layer.win_k is not None and layer.win_k.shape[2]:
            carried = layer.win_k
            if chunk["carry_shift"] is not None:
                carried = self._rotate_cached(chunk, "carry", carried)
            win_k = torch.cat((carried, key), dim=2)
            stored_k = torch.cat((layer.win_k, key), dim=2)  # as computed, each in its own frame
            win_v = torch.cat((layer.win_v, value), dim=2)
        else:
            win_k = stored_k = key
            win_v = value
        # carry the last window - 1 keys to the next chunk (contiguous copies: the chunk's tensors can go)
        keep = min(self.window - 1, win_k.shape[2])
        layer.win_k = stored_k[:, :, stored_k.shape[2] - keep:].contiguous() if keep else None
        layer.win_v = win_v[:, :, win_v.shape[2] - keep:].contiguous() if keep else None

        batch, heads, count, head_dim = query.shape
        kv_heads = win_k.shape[1]
        group = heads // kv_heads
        if scaling is None:
            scaling = head_dim ** -0.5
        if self._fused(value.dtype):
            return self._attend_fused(chunk, layer, query, win_k, win_v, scaling)
        # grouped-query attention without repeating keys: query heads k*group .. k*group+group-1 use kv head k
        q = query.reshape(batch, kv_heads, group, count, head_dim)
        sink_k = layer.sink_k
        if sink_k is not None:
            q_sink = self._rotate_cached(chunk, "sink", q)  # the query rows at the sinks' distances
        # Scores in float32 for half-precision models (as torch's CPU sdpa kernels accumulate), else native.
        work = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
        win_bias, sink_bias = self._biases(chunk, work, value.device)
        q, win_k, win_v = q.to(work), win_k.to(work), win_v.to(work)
        if sink_k is not None:
            q_sink, sink_k, sink_v = q_sink.to(work), sink_k.to(work), layer.sink_v.to(work)
        out = torch.empty(kv_heads, group, count, head_dim, dtype=work, device=value.device)
        # Query blocks: each needs only the window keys its rows can see, so the work per block is
        # O(block x (block + window)), not O(block x chunk). The sink and window scores share one softmax, done by
        # hand (max, exp, sums) so that neither score tensor is copied into a concatenation.
        block = max(64, min(256, self.window // 2))
        first, win_start = chunk["first"], chunk["win_start"]
        for a in range(0, count, block):
            b = min(count, a + block)
            rows = group * (b - a)
            # window keys rows a..b-1 can see: stream indices t_a - W + 1 .. t_{b-1}
            lo = max(0, first + a - self.window + 1 - win_start)
            hi = max(lo, first + b - win_start)
            parts = []  # (exp-scores [kv, rows, keys], values [kv, keys, d])
            if hi > lo:
                qb = q[0, :, :, a:b].reshape(kv_heads, rows, head_dim)
                bias = win_bias[a:b, lo:hi].repeat(group, 1)
                parts.append((torch.baddbmm(bias, qb, win_k[0, :, lo:hi].transpose(1, 2), alpha=scaling),
                              win_v[0, :, lo:hi]))
            if sink_k is not None:
                qb = q_sink[0, :, :, a:b].reshape(kv_heads, rows, head_dim)
                bias = sink_bias[a:b].repeat(group, 1)
                parts.append((torch.baddbmm(bias, qb, sink_k[0].transpose(1, 2), alpha=scaling), sink_v[0]))
            top = parts[0][0].amax(-1, keepdim=True)
            for scores, _ in parts[1:]:
                top = torch.maximum(top, scores.amax(-1, keepdim=True))
            total = None
            res = None
            for scores, values in parts:
                scores.sub_(top).exp_()
                part_sum = scores.sum(-1, keepdim=True)
                total = part_sum if total is None else total.add_(part_sum)
                res = torch.bmm(scores, values) if res is None else res.baddbmm_(scores, values)
            out[:, :, a:b] = res.div_(total).view(kv_heads, group, b - a, head_dim)
        out = out.to(value.dtype).view(batch, heads, count, head_dim)
        return out.reshape(batch, heads, count, head_dim).transpose(1, 2).contiguous()
