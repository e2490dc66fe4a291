"""The transformers adapter: the one module that touches transformers' cache and attention internals (its cache API
changes between releases: v5 renamed `past_key_values` to `cache`, removed `cache_position` and SinkCache, moved to
per-layer cache objects, and that breakage is the top complaint about every earlier StreamingLLM implementation).
Tested against transformers 5.x.

Public classes: `SinkCache` (StreamingLLM), `WindowCache` (the same with no sinks). Both are `transformers.Cache`s:
pass them as `cache=` (or the deprecated `past_key_values=`) to `model(...)` and `model.generate(...)`;
`streaming_cache(capacity, sinks, config)` builds either from the project's vocabulary (capacity = sinks + window).
Also here, for the drivers above: transformers' dense `DynamicCache` and what they read of it, the explicit decode
mask, RoPE scaling through transformers' rope types, and switching the attention implementation.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.autograd.profiler import record_function
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .compiled import CompiledDecoder, CompileUnsupported, StaticDecodeState
from .kv import CACHE_UPDATE, StreamingKV
from .rope import RotarySpec

__all__ = ["SinkCache", "WindowCache", "StreamingCache", "streaming_cache", "DynamicCache", "dense_cache",
           "dense_kv_bytes", "dense_layers", "decode_attention_mask", "rope_scaled", "eager_attention",
           "UnsupportedModelError", "rotary_spec", "check_supported", "StubLayer", "compiled_decoder",
           "CompiledStreamingCache", "CompileUnsupported", "static_cache"]

# Model types whose attention applies RoPE in the rotate-half layout before calling `cache.update`, verified against
# the reference implementation in tests/test_oracle.py.
ROPE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_neox")

# ALiBi models: they bias each key by its index among the keys the cache returns (BLOOM: arange over the key
# length, or the cumulative 2D mask; MPT: the last key_length columns of its bias table), so returning the keys in
# logical order gives the paper's contiguous linear bias, with nothing to rotate. Verified in tests/test_alibi.py.
ALIBI_MODEL_TYPES = ("bloom", "mpt")

# Why the others cannot be served, for the error message.
_UNSERVABLE = {
    "gpt2": "its learned absolute position embeddings are added to the input, so positions cannot be re-assigned "
            "inside the cache",
    "gptj": "it rotates interleaved pairs (rotate-every-two), a layout this cache does not re-rotate",
    "opt": "its learned absolute position embeddings cannot be re-assigned inside the cache",
}

# RoPE variants whose frequencies change with the sequence length: a key rotated earlier would not match a later
# query, so re-rotating inside a streaming cache is not well defined.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """The caches cannot serve this model (the message names its model type and why)."""


def _config_of(config_or_model):
    return getattr(config_or_model, "config", config_or_model)


def check_supported(config_or_model) -> None:
    """Raise `UnsupportedModelError` naming the model type unless the caches can serve it."""
    config = _config_of(config_or_model)
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if model_type in ALIBI_MODEL_TYPES:
        return
    if model_type in ROPE_MODEL_TYPES:
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            raise UnsupportedModelError(
                f"model type {model_type!r} with rope_type={rope_type!r}: its RoPE frequencies depend on the "
                "sequence length, so keys cached earlier cannot be re-rotated consistently; use a fixed scaling "
                "(linear, yarn, llama3) or none"
            )
        return
    why = _UNSERVABLE.get(model_type, "it is not one of the RoPE architectures these caches were verified on")
    raise UnsupportedModelError(
        f"SinkCache/WindowCache cannot serve model type {model_type!r}: {why}. "
        f"Supported model types: {', '.join(ROPE_MODEL_TYPES + ALIBI_MODEL_TYPES)}."
    )


# Models whose attention cannot reach past a fixed number of keys, whatever the cache: (the limit, why).
_KEY_LIMITS = {
    "mpt": lambda config: (config.max_seq_len, "its ALiBi bias table is max_seq_len long"),
}


def dense_length_limit(config_or_model) -> tuple[int, str] | None:
    """(most keys one forward can attend to, why) for a model with a hard limit (MPT), else None: past it a dense
    cache cannot run at all (a streaming cache never holds that many keys)."""
    config = _config_of(config_or_model)
    limit = _KEY_LIMITS.get(getattr(config, "model_type", None))
    return None if limit is None else limit(config)


def uses_alibi(config_or_model) -> bool:
    return getattr(_config_of(config_or_model), "model_type", None) in ALIBI_MODEL_TYPES


def sliding_window_of(config) -> int | None:
    """The model's own attention window (Mistral, Qwen2 with use_sliding_window), if it has one."""
    sliding = getattr(config, "sliding_window", None)
    if sliding is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(sliding)


def rotary_spec(config_or_model) -> RotarySpec:
    """The model's RoPE frequencies. From a model, read from its rotary module (the exact floats it uses); from a
    config, computed the way transformers does."""
    config = _config_of(config_or_model)
    check_supported(config)
    if uses_alibi(config):
        raise UnsupportedModelError(f"model type {config.model_type!r} uses ALiBi biases, not a rotary embedding")
    if config_or_model is not config:
        for module in config_or_model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor) and inv_freq.ndim == 1:
                inv = inv_freq.detach().to("cpu", torch.float64)
                return RotarySpec(inv_freq=inv, rotary_dim=2 * inv.numel())
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        base = rope["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        inv, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    inv = inv.to(torch.float32).to(torch.float64)  # the model holds float32 frequencies
    return RotarySpec(inv_freq=inv, rotary_dim=2 * inv.numel())


def _position_ids(kwargs) -> torch.Tensor | None:
    """The positions the model rotated the new tokens with, when its attention passes them to `update`.

    Llama, Mistral and Qwen2 call `cache.update(k, v, layer_idx, kwargs=kwargs)` with `position_ids` inside;
    GPT-NeoX passes nothing (then the cache assumes the positions it reported through `get_seq_length`)."""
    inner = kwargs.get("kwargs", kwargs)
    if isinstance(inner, dict):
        pos = inner.get("position_ids")
        if isinstance(pos, torch.Tensor):
            return pos
    return None


_DECODE_MASKS: dict = {}


def decode_attention_mask(model, batch: int, kv_length: int):
    """An explicit all-visible 4D attention mask for one decode step over `kv_length` keys, or None.

    Why: for a single query transformers skips the mask, and its sdpa path then runs grouped-query attention in
    torch's CPU kernel, which is ~40% slower at 4k keys (torch 2.13) than repeating the KV heads with a mask, which is
    what it does for a StaticCache. Passing this mask on CPU puts every cache on the same, faster kernel path; on GPU
    it returns None (the fused kernels want no mask), and for ALiBi models too (BLOOM builds its biases from a 2D
    mask, or from the key count when there is none). The mask is made once per shape and reused: no allocation per
    step."""
    device = model.device
    impl = getattr(model.config, "_attn_implementation", None)
    if device.type != "cpu" or impl not in ("sdpa", "eager") or uses_alibi(_config_of(model.config)):
        return None
    key = (impl, batch, kv_length, model.dtype)
    mask = _DECODE_MASKS.get(key)
    if mask is None:
        with torch.inference_mode(False):
            if impl == "sdpa":
                mask = torch.ones(batch, 1, 1, kv_length, dtype=torch.bool)
            else:  # eager adds the mask to the scores
                mask = torch.zeros(batch, 1, 1, kv_length, dtype=model.dtype)
        if len(_DECODE_MASKS) > 64:
            _DECODE_MASKS.clear()
        _DECODE_MASKS[key] = mask
    return mask


class StubLayer(CacheLayerMixin):
    """A placeholder layer for caches that keep their tensors themselves (the benchmark baselines)."""

    is_sliding = False
    supports_early_init = False

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, *args, **kwargs):
        raise NotImplementedError

    def get_mask_sizes(self, query_length):
        raise NotImplementedError

    def get_seq_length(self):
        return 0

    def get_max_length(self):
        return -1


class StreamingLayer(CacheLayerMixin):
    """transformers' view of one layer of a streaming cache; the buffers live in the shared `StreamingKV`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, kv: StreamingKV, layer_idx: int):
        super().__init__()
        self._kv = kv
        self.layer_idx = layer_idx

    @property
    def _layer(self):
        layers = self._kv.layers
        return layers[self.layer_idx] if self.layer_idx < len(layers) else None

    @property
    def keys(self):
        layer = self._layer
        return None if layer is None else layer.keys[:, :, : self._kv.occupied()]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None
        if value is not None:
            raise AttributeError("a streaming cache's keys are written through update()")

    @property
    def values(self):
        layer = self._layer
        return None if layer is None else layer.values[:, :, : self._kv.occupied()]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("a streaming cache's values are written through update()")

    @property
    def is_initialized(self):
        return self._layer is not None

    @is_initialized.setter
    def is_initialized(self, value):
        pass

    @property
    def batch_size(self):
        return self._kv.batch_size

    def lazy_initialization(self, key_states, value_states):
        pass  # buffers are allocated by StreamingKV on the first update

    def update(self, key_states, value_states, *args, **kwargs):
        return self._kv.update(self.layer_idx, key_states, value_states,
                               _position_ids(kwargs) if self.layer_idx == 0 else None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The returned keys are the occupied slots in slot order: offset 0, and a query offset (see
        # StreamingCache.get_query_offset) that lets every query see every returned key, since nothing evicted is
        # ever returned.
        return self._kv.attended(query_length), 0

    def get_seq_length(self) -> int:
        return self._kv.next_position(0)

    def get_max_length(self) -> int:
        return self._kv.capacity

    def reset(self) -> None:
        self._kv.reset()

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("streaming caches do not support beam search (num_beams > 1)")

    def offload(self):
        raise NotImplementedError("streaming caches keep their preallocated buffers on one device")

    prefetch = offload


class StreamingCache(Cache):
    """Base of `SinkCache` and `WindowCache`: a `transformers.Cache` over a preallocated `StreamingKV`."""

    def __init__(self, num_sinks: int, window: int, config=None, *, rebase_interval: int | None = None,
                 batch_size: int | None = None, device=None):
        alibi = False
        if device is None and isinstance(config, torch.nn.Module):
            device = next(config.parameters()).device
        if config is not None:
            cfg = _config_of(config)
            check_supported(cfg)
            alibi = uses_alibi(cfg)
            rotary = None if alibi else rotary_spec(config)
            num_layers = cfg.num_hidden_layers
            sliding = sliding_window_of(cfg)
            if sliding is not None and num_sinks + window > sliding:
                raise ValueError(
                    f"the cache holds {num_sinks + window} tokens but the model attends to at most {sliding} "
                    f"(config.sliding_window); use num_sinks + window <= {sliding}"
                )
        else:
            if num_sinks:
                raise ValueError(
                    f"{type(self).__name__} with sinks needs the model's config to place them: "
                    f"{type(self).__name__}(num_sinks={num_sinks}, window={window}, config=model.config)"
                )
            rotary, num_layers = None, None
        self.kv = StreamingKV(num_layers, num_sinks, window, rotary, rebase_interval=rebase_interval,
                              batch_size=batch_size, logical_order=alibi, device=device)
        layers = [StreamingLayer(self.kv, i) for i in range(num_layers)] if num_layers else []
        super().__init__(layers=layers)

    # ---- transformers' Cache API -----------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # config-less WindowCache: layers appear with the model's
            self.layers.append(StreamingLayer(self.kv, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The model position the next token is expected at (tokens seen, minus any re-basing of the frame)."""
        return self.kv.next_position(0)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.kv.attended(query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Queries come after every occupied slot they can see; see StreamingLayer.get_mask_sizes.
        return self.kv.query_offset()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.kv.capacity

    def reset(self):
        self.kv.reset()

    def crop(self, max_length: int):
        raise NotImplementedError("streaming caches cannot be cropped: evicted tokens are gone")

    # ---- streaming API ---------------------------------------------------------------------------------------------
    @property
    def num_sinks(self) -> int:
        return self.kv.num_sinks

    @property
    def window(self) -> int:
        return self.kv.window

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def ring(self):
        """The C++ `SinkRing` that does the bookkeeping (None before the first forward without batch_size)."""
        return self.kv.ring

    def seen(self, stream: int = 0) -> int:
        """Tokens fed to `stream` so far."""
        return self.kv.seen(stream)

    def position_ids(self, num_tokens: int = 1, device=None) -> torch.Tensor:
        """Positions `[batch, num_tokens]` for the next forward, kept small by re-basing (see `StreamingKV`)."""
        return self.kv.position_ids(num_tokens, device)

    def forward_positions(self, num_tokens: int = 1, device=None) -> torch.Tensor | None:
        """What to pass the model as `position_ids=` for the next forward: `position_ids(num_tokens)`, or None for a
        model that takes no positions (ALiBi: its biases come from the order of the keys), so that one driver loop
        serves both."""
        return None if self.kv.logical_order else self.kv.position_ids(num_tokens, device)

    def reset_stream(self, stream: int) -> None:
        """Empty one stream and keep the others: the batch becomes ragged, so pass `attention_mask=slot_mask()`
        and `position_ids=position_ids(1)` with each following step."""
        self.kv.reset_stream(stream)

    def slot_mask(self, device=None) -> torch.Tensor:
        """`[batch, keys]` bool attention mask for the next single-token step of a ragged batch."""
        return self.kv.slot_mask(device)

    def fast_forward(self, seen: int, *, keep_window: bool = False) -> None:
        """Jump every stream to `seen` tokens without feeding them; see `StreamingKV.fast_forward`."""
        self.kv.fast_forward(seen, keep_window=keep_window)

    def snapshot(self):
        return self.kv.snapshot()

    def restore(self, snapshot, device=None) -> None:
        self.kv.restore(snapshot, device)

    @property
    def kv_bytes(self) -> int:
        """Bytes held by the KV buffers (keys, values, sink copies, scratch) of every allocated layer."""
        return self.kv.nbytes

    def __repr__(self):
        return f"{type(self).__name__}(num_sinks={self.num_sinks}, window={self.window}, seen={self.seen()})"


class SinkCache(StreamingCache):
    """StreamingLLM's cache: the first `num_sinks` tokens plus the most recent `window` tokens (the one being decoded
    included), with positions assigned inside the cache, in buffers allocated once per layer and written in place.

    >>> cache = SinkCache(num_sinks=4, window=1020, config=model.config)
    >>> out = model.generate(input_ids, cache=cache, max_new_tokens=20_000)

    `config` may also be the model itself (its rotary frequencies and device are then read from it).
    `device`: where `position_ids()` puts positions before the first forward; on a GPU, pass the model's device
    (`SinkCache(4, 1020, model.config, device=model.device)`) or the model as `config`. Later the buffers' device.
    """

    def __init__(self, num_sinks: int = 4, window: int = 1020, config=None, *, rebase_interval: int | None = None,
                 batch_size: int | None = None, device=None):
        super().__init__(num_sinks, window, config, rebase_interval=rebase_interval, batch_size=batch_size,
                         device=device)


class WindowCache(StreamingCache):
    """The paper's window attention: `SinkCache` with no sinks (the `window` most recent tokens)."""

    def __init__(self, window: int = 1024, config=None, *, rebase_interval: int | None = None,
                 batch_size: int | None = None, device=None):
        super().__init__(0, window, config, rebase_interval=rebase_interval, batch_size=batch_size, device=device)


def streaming_cache(capacity: int, sinks: int, config=None, **kwargs) -> StreamingCache:
    """The one way the drivers build a streaming cache: `capacity` slots in all, the first `sinks` of them for the
    sinks and the rest for the window (the query included): `SinkCache(sinks, capacity - sinks)`, or with no sinks
    the paper's window attention, `WindowCache(capacity)`. Keyword arguments go to the cache."""
    if sinks:
        return SinkCache(sinks, capacity - sinks, config, **kwargs)
    return WindowCache(capacity, config, **kwargs)


# ---- dense attention: transformers' own DynamicCache, and what the drivers read of it ---------------------------------
class ProfiledDynamicCache(DynamicCache):
    """transformers' DynamicCache with its update in a named profiler range (a subclass, nothing patched)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        with record_function(CACHE_UPDATE):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def dense_cache(config, *, profiled: bool = False) -> DynamicCache:
    """An empty dense cache (with its update in a profiler range when `profiled`)."""
    return (ProfiledDynamicCache if profiled else DynamicCache)(config=config)


def dense_truncate(cache: DynamicCache, length: int) -> None:
    """Drop every token of a dense cache after its first `length` (to branch a stream and come back).
    transformers 5's `crop` takes the count to remove, as a negative number."""
    extra = cache.get_seq_length() - int(length)
    if extra < 0:
        raise ValueError(f"the cache holds {cache.get_seq_length()} tokens, fewer than {length}")
    if extra:
        cache.crop(-extra)


def dense_layers(cache: DynamicCache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(keys, values) of every layer of a dense cache (None before the layer's first update)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def dense_kv_bytes(cache: DynamicCache) -> int:
    """Bytes the keys and values of a dense cache hold."""
    return sum(keys.nbytes + values.nbytes for keys, values in dense_layers(cache) if keys is not None)


@contextlib.contextmanager
def eager_attention(model):
    """Within the block the model runs eager attention (the implementation that returns attention weights); the
    previous implementation is put back after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


# Context-window extension without fine-tuning, through transformers' own rope scaling types.
ROPE_SCALINGS = {"pi": "linear", "ntk": "dynamic", "yarn": "yarn"}


@contextlib.contextmanager
def rope_scaled(model, kind: str, factor: float):
    """Within the block, the model's RoPE is scaled by `factor` to a window `factor` times its own: "pi" (linear
    position interpolation), "ntk" (dynamic NTK) or "yarn". The model's rotary modules are rebuilt from a copy of its
    config with transformers' `rope_parameters` (its own implementations of those methods) and put back after."""
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"unknown RoPE scaling {kind!r}; choose from {', '.join(ROPE_SCALINGS)}")
    if not factor or factor < 1:
        raise ValueError(f"the scaling factor must be >= 1, got {factor}")
    config = model.config
    if uses_alibi(config) or not isinstance(getattr(config, "rope_parameters", None), dict):
        raise UnsupportedModelError(f"model type {config.model_type!r} has no RoPE to scale")
    scaled = copy.deepcopy(config)
    params = dict(config.rope_parameters)
    params.update(rope_type=ROPE_SCALINGS[kind], factor=float(factor))
    if kind == "yarn":
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    scaled.rope_parameters = params
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if "Rotary" in type(child).__name__ and hasattr(child, "inv_freq"):
                fresh = type(child)(config=scaled).to(child.inv_freq.device)
                setattr(parent, name, fresh)
                replaced.append((parent, name, child))
    if not replaced:
        raise UnsupportedModelError(f"found no rotary embedding module in model type {config.model_type!r}")
    try:
        yield scaled
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)


# ---- the compiled decode step (pystream.cache.compiled): what the model is handed, and the steps to compile ---------
class CompiledStreamingLayer(StubLayer):
    """transformers' view of one layer of a `CompiledStreamingCache` (the buffers live in the `StreamingKV`)."""

    is_compileable = True


class CompiledStreamingCache(Cache):
    """The `Cache` a compiled decode step hands the model: each layer's update is `StaticDecodeState.update`, fixed
    shapes and no Python number that changes between steps. Built by `compiled_decoder`, over the buffers and ring
    of a `SinkCache`/`WindowCache`; used with the positions and 4D mask of the state (never builds a mask itself)."""

    def __init__(self, state: StaticDecodeState):
        self.state = state
        super().__init__(layers=[CompiledStreamingLayer() for _ in range(len(state.kv.layers))])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.state.update(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("a compiled streaming step takes its positions from the cache: pass position_ids")


def _mask_dtype(model) -> torch.dtype:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        raise CompileUnsupported(f"the compiled streaming step passes a 4D mask, which attention {impl!r} may not "
                                 "take; use sdpa or eager")
    return torch.bool if impl == "sdpa" else model.dtype


def compiled_decoder(model, cache) -> CompiledDecoder:
    """A compiled decode step for `cache`: a `SinkCache`/`WindowCache` built with the model's config, or
    transformers' `StaticCache` (compileable as it is). `decoder(input_ids)` feeds one token per stream and returns
    the logits. Prefill a prompt eagerly first (the decoder feeds one token per stream); a streaming cache's first S
    tokens and ragged batches take an eager step, every other step the compiled one."""
    device = model.device
    if isinstance(cache, StreamingCache):
        state = StaticDecodeState(cache.kv, _mask_dtype(model))
        holder = {}

        def prepare():
            state.prepare()
            if "cache" not in holder:  # the layers exist only once the cache holds tokens
                holder["cache"] = CompiledStreamingCache(state)

        def forward(input_ids):
            return model(input_ids, position_ids=state.positions, cache=holder["cache"],
                         attention_mask=state.mask).logits

        def eager(input_ids):
            return model(input_ids, cache=cache, position_ids=cache.position_ids(1, device)).logits

        decoder = CompiledDecoder(forward, device, prepare=prepare, eager=eager,
                                  can_compile=state.can_compile_next)
        decoder.state = state
        return decoder
    if isinstance(cache, StaticCache):
        def forward(input_ids):
            return model(input_ids, cache=cache).logits

        return CompiledDecoder(forward, device)
    raise CompileUnsupported(f"no compiled decode step for {type(cache).__name__}: SinkCache, WindowCache and "
                             "StaticCache have fixed shapes; a cache that grows (DynamicCache, the paper's) does not")


def static_cache(model, capacity: int) -> StaticCache:
    """transformers' preallocated `StaticCache` of `capacity` slots (the compiled baseline)."""
    return StaticCache(config=model.config, max_cache_len=capacity)
