"""The packed RDKV cache: one `RDKVLayer` per full-attention layer inside a `DynamicCache`.

Layout of one layer:

* ``segments``: one per compressed multi-token forward (the prompt, then follow-up turns). A
  segment holds one :class:`PackedHead` per (batch row, KV head); heads are ragged. All heads of
  a segment live in one set of flat buffers (see ``storage.py``), which the kernels walk.
* ``keys`` / ``values``: the full-precision tail ``[B, kv_heads, n_tail, D]`` (decoded tokens and
  the tokens of the forward being compressed); V's width may differ from K's.
* ``latent``: for a cache that holds a latent rather than keys and values (DeepSeek's multi-head
  latent attention since Transformers 5), how the attention reads it (``model_patches``); None
  otherwise.

A :class:`PackedHead` stores its kept tokens sorted by V width (16 first, then 8, 4, 2, ...):

* V groups: for each width, codes packed along head_dim ``[n_w, words]`` with a float16 scale and
  minimum per token; width 16 is raw ``[n_16, D]`` in the keep dtype.
* K: channels sorted by width (``k_perm``, evicted channels dropped); for each width, codes of all
  kept tokens packed along that group's channels ``[n, words]`` with a float16 scale and minimum
  per channel; width 16 raw ``[c_16, n]``. K rows follow the V token order.

Attention never needs token positions (every stored prompt token precedes every later query, and
RoPE is already applied), so none are stored.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import warnings
import weakref
from pathlib import Path

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from . import cache_cap, cache_io, compat, decode_blocks, observe
from .config import RDKVConfig
from .model_patches import compressed_layers, latent_attention
from .parallel import kv_head_range
from .planners import Planner, make_planner
from .state import patch_state
from .storage import Group, PackedHead, Segment, SegmentBuffers, pack_head, pack_segment  # noqa: F401 (re-exported)
from .summary import CacheSummary
from .weights import head_shape

logger = logging.getLogger(__name__)

ATTN_NAME = "rdkv"  # the attention implementation patch() registers; the only reader of packed segments

# How the "rdkv" attention finds its cache layer: `RDKVLayer.update` offers the layer, and the attention
# of the same module call takes it back by the identity of the key tensor it receives (the tensor that
# update returned). The offers are per thread, so concurrent generate() calls on one model, each with
# its own cache, never see each other's layers; nothing is stored on the model or its modules, and it
# works whatever name Transformers passes the cache under (`cache=` since 5.24, `past_key_values=` before).
_offers = threading.local()


def _offered() -> weakref.WeakSet:
    if not hasattr(_offers, "layers"):
        _offers.layers = weakref.WeakSet()
    return _offers.layers


def take_layer(layer_idx: int, key: torch.Tensor) -> RDKVLayer | None:
    """The :class:`RDKVLayer` whose ``update`` returned `key` in this thread (None if none did).

    Raises ``RuntimeError`` if layer `layer_idx` of a cache holding compressed tokens offered other
    keys: the model changed what its cache returned before attending, so it would not see them."""
    offered = _offered()
    for layer in list(offered):
        # A latent layer's attention receives keys expanded from what update returned: its index binds it.
        if layer.keys is key or (layer.latent is not None and layer.layer_idx == layer_idx):
            offered.discard(layer)
            layer.unread = False
            return layer
    for layer in list(offered):
        if layer.layer_idx == layer_idx and layer.segments:
            raise RuntimeError(
                f"layer {layer_idx} attends to other keys than its RDKV cache layer returned, so it would not see "
                "the compressed tokens; this architecture is not supported by rdkv_hf (see rdkv_hf.model_patches)"
            )
    return None


class RDKVLayer(CacheLayerMixin):
    """A full-attention layer whose prompt tokens are stored packed (see the module docstring).

    Contract (as Transformers' sliding-window layer): ``get_seq_length()`` is the number of tokens
    seen; ``get_mask_sizes(q)`` covers only the full-precision tail plus the new tokens, because
    every compressed token is visible to every later query.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, planner: Planner, text_config=None, latent=None):
        """`planner`: turns the weights of this layer's tokens into widths; its ``config`` holds
        every setting the layer and its attention use. `text_config`: the model's (text) config,
        to check that its attention reads the packed segments (an unpatched attention would attend
        to the full-precision tail only). `latent`: how to attend a latent cache (see the module
        docstring), None for keys and values."""
        super().__init__()
        self.layer_idx = layer_idx
        self.planner = planner
        self.config = planner.config
        self.text_config = text_config
        self.latent = latent
        self.segments: list[Segment] = []
        self.seen = 0
        self.pending = 0  # tokens of a multi-token forward that the attention has yet to compress
        self.unread = False  # update() returned K/V that no RDKV attention has read yet
        decode_blocks.init_state(self)  # compressed decoding (config.decode_block)
        observe.init_state(self)  # tokens waiting for decoded queries (config.observe)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        # Under tensor parallelism a rank holds a block of the KV heads: a divisor of the model's. A
        # latent layer (DeepSeek's MLA) caches one latent "head" of its own width.
        expected = _kv_heads_and_dim(self.text_config) if self.latent is None else None
        if expected is not None and (D != expected[1] or expected[0] % H):
            raise ValueError(
                f"this RDKVCache was built for a model with {expected[0]} KV heads of dimension {expected[1]}, but layer "
                f"{self.layer_idx} gives {H} of dimension {D}; build the cache for the model you run: RDKVCache(model)"
            )
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.is_initialized = True

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending or (self.unread and self.segments):
            raise RuntimeError(
                "the last forward through this RDKVCache did not read it with RDKV attention (the model is not "
                "patched, or was unpatched while the cache was in use); call rdkv_hf.patch(model, ...) before "
                "using RDKVCache"
            )
        if self.segments and self.text_config is not None:
            attn = getattr(self.text_config, "_attn_implementation", None)
            if attn != ATTN_NAME:
                raise RuntimeError(
                    f"this RDKVCache holds compressed tokens that only RDKV attention reads, but the model "
                    f"attends with {attn!r} (it would see the uncompressed tail only); call "
                    "rdkv_hf.patch(model, ...) before using RDKVCache, and do not unpatch while a cache is in use"
                )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"this RDKVCache holds {self.keys.shape[0]} batch rows and the forward has {key_states.shape[0]}; for several "
                f"questions over one context use cache.fork({key_states.shape[0]}) (rows sharing its packed segments)"
            )
        if key_states.shape[-2] > 1:
            self.pending = key_states.shape[-2]
        if self.keys.shape[-2] == 0:  # the usual prompt case: no copy of a whole layer's K/V
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        self.unread = True
        _offered().add(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        tail = self.keys.shape[-2] if self.is_initialized else 0
        return tail + compat.query_length(query_length), self.seen - tail

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the abstract method's name before Transformers 5.13

    @classmethod
    def replacing(cls, layer, layer_idx: int, planner: Planner, text_config=None, latent=None) -> RDKVLayer:
        """The RDKV layer for Transformers' cache layer `layer` of a full-attention layer: this
        class, or :class:`RDKVHybridLayer` where the layer also keeps a linear-attention state."""
        hybrid = compat.LinearAttentionAndFullAttentionLayer
        if hybrid is not None and isinstance(layer, hybrid):
            return RDKVHybridLayer(layer_idx, planner, text_config, latent, number_of_states=layer.number_of_states)
        return cls(layer_idx, planner, text_config, latent)

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.segments = []
        self.seen = 0
        self.pending = 0
        self.unread = False
        decode_blocks.init_state(self)
        observe.init_state(self)
        _offered().discard(self)

    def restore(self, segments: list[Segment], keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Put back the state of a saved layer (:meth:`RDKVCache.from_pretrained`): its packed
        segments, its full-precision tail ``[B, kv_heads, n_tail, D]`` and the tokens it saw."""
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.segments, self.seen = keys, values, list(segments), seen

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "RDKVCache cannot roll tokens back (compressed tokens are gone); assisted or speculative "
            "decoding needs an uncompressed cache: call rdkv_hf.unpatch(model) first."
        )

    def _select(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys = self.keys.index_select(0, index.to(self.keys.device))
        self.values = self.values.index_select(0, index.to(self.values.device))
        stack = decode_blocks.current_stack(self)
        self.segments = [s.select(index) for s in self.segments]
        decode_blocks.select_state(self, index, stack)
        observe.select_state(self, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices, device=self.keys.device if self.is_initialized else None))

    # -- compression ---------------------------------------------------------------------------

    def compress_tail(self, n_new: int, w_tok: torch.Tensor, w_ch: torch.Tensor, real: torch.Tensor, keep_last: int = 0,
                      decoded: bool = False) -> None:
        """Pack the last `n_new` tail tokens but the newest `keep_last` into a new segment and drop
        them from the tail.

        Args:
            w_tok: ``[B, kv_heads, n]`` token weights (``n = n_new - keep_last``); w_ch: ``[B, kv_heads, D]``
                (K's channels as attended: a latent layer's absorbed ones).
            real: ``[B, n]`` bool, non-padding tokens.
            decoded: the tokens are a block of decoded tokens (``config.decode_block``).
        """
        keys, values = (self.keys, self.values) if self.latent is None else self.latent.keys_values(self)
        B, H, n_tail, D = keys.shape
        Dv = values.shape[-1]
        start, end = n_tail - n_new, n_tail - keep_last
        n = end - start
        k_new, v_new = keys[:, :, start:end], values[:, :, start:end]
        v_bits, k_bits = self.planner.widths(self.layer_idx, w_tok, w_ch, real, v_dim=Dv)  # [B, H, n], [B, H, D]
        self._warn_if_emptied(v_bits, k_bits, real)
        keep = self.planner.keep_dtype(self.dtype)
        heads, buffers = pack_segment(
            k_new.reshape(B * H, n, D), v_new.reshape(B * H, n, Dv),
            v_bits.reshape(B * H, n), k_bits.reshape(B * H, D), keep,
        )
        if self.config.max_cache_bytes is not None:  # re-allocation under the cap needs the weights
            positions = torch.arange(start, end, device=w_tok.device) + (self.seen - n_tail)
            cache_cap.attach_weights(heads, v_bits.reshape(B * H, n), self.planner.cap_weights(w_tok, real, positions),
                                     w_ch.reshape(B * H, D), positions if self.planner.cap_layer_share else None)
        self.segments.append(Segment(heads, B, H, real.sum(1).cpu(), buffers, decoded=decoded))
        # Copy what stays: a slice would keep the whole full-precision tensor alive.
        self.keys = torch.cat([self.keys[:, :, :start], self.keys[:, :, end:]], dim=-2)
        self.values = torch.cat([self.values[:, :, :start], self.values[:, :, end:]], dim=-2)
        self.pending = 0
        self.unread = False
        _offered().discard(self)

    def _warn_if_emptied(self, v_bits: torch.Tensor, k_bits: torch.Tensor, real: torch.Tensor) -> None:
        """Loudly say when a head with real tokens keeps no V token or no K channel: the model then
        attends to nothing there (an extreme `k_share` or a tiny budget on a short prompt)."""
        has_tokens = real.any(1)[:, None]  # [B, 1]
        no_v = ((v_bits > 0).sum(-1) == 0) & has_tokens
        no_k = ((k_bits > 0).sum(-1) == 0) & has_tokens & ~no_v
        if bool(no_v.any() or no_k.any()):
            what = "every V token" if bool(no_v.any()) else "every K channel"
            cfg = self.config
            warnings.warn(
                f"rdkv_hf: layer {self.layer_idx} evicted {what} of {int((no_v | no_k).sum())} head(s) holding "
                f"{int(real.sum(1).max())} tokens (budget={cfg.budget}, tokens={cfg.tokens}, k_share={cfg.k_share}): "
                "attention there sees none of them; raise `budget` or keep `k_share` away from 0 and 1",
                stacklevel=2,
            )

    @property
    def nbytes(self) -> int:
        """Bytes the layer holds: packed codes, scales, minima and channel orders, the segments'
        tables, the full-precision tail, and what compressed decoding keeps (its pending sums,
        the stacked tables, the weights kept for a byte cap) and the sums of tokens waiting for
        decoded queries (``observe``)."""
        if not self.is_initialized:
            return 0
        tail = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return cache_cap.packed_nbytes(self.segments + decode_blocks.stack_of(self)) + tail + decode_blocks.state_nbytes(self) + observe.state_nbytes(self)


if compat.LinearAttentionLayer is not None:

    class RDKVHybridLayer(compat.LinearAttentionLayer, RDKVLayer):
        """An RDKV layer that also keeps the linear-attention (Mamba) state of a layer running both
        side by side (Falcon-H1), as Transformers' ``LinearAttentionAndFullAttentionLayer`` does
        for a ``DynamicLayer``: the state's methods come from the linear layer, the K/V's from RDKV."""

        is_compileable = False
        is_croppable = False

        def __init__(self, layer_idx, planner, text_config=None, latent=None, number_of_states: int = 1):
            RDKVLayer.__init__(self, layer_idx, planner, text_config, latent)
            compat.LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

        def lazy_initialization(self, *args, **kwargs) -> None:
            if len(args) == 2 and not kwargs:  # from update(keys, values)
                RDKVLayer.lazy_initialization(self, *args)
            else:  # from update_conv_state / update_recurrent_state
                compat.LinearAttentionLayer.lazy_initialization(self, **kwargs)

        def reset(self) -> None:
            compat.LinearAttentionLayer.reset(self)
            RDKVLayer.reset(self)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            compat.LinearAttentionLayer.reorder_cache(self, beam_idx)
            RDKVLayer.reorder_cache(self, beam_idx)

        def offload(self) -> None:
            compat.LinearAttentionLayer.offload(self)
            RDKVLayer.offload(self)

        def prefetch(self) -> None:
            compat.LinearAttentionLayer.prefetch(self)
            RDKVLayer.prefetch(self)

        crop = RDKVLayer.crop  # compressed tokens cannot be rolled back
        get_max_length = RDKVLayer.get_max_length


def _tensor_bytes(t) -> int:
    """Bytes of a tensor, or of every inner tensor of a tensor subclass (quanto's packed tensors)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _kv_heads_and_dim(text_config) -> tuple[int, int] | None:
    """``(kv_heads, head_dim)`` a model config promises (None when it does not say)."""
    if text_config is None:
        return None
    try:
        return head_shape(text_config)
    except (AttributeError, TypeError):  # no head count, or neither head_dim nor hidden_size
        return None


def layer_nbytes(cache) -> list[int]:
    """Bytes each layer of a cache holds: RDKVLayer.nbytes, or every stored tensor of a
    Transformers layer (QuantizedCache: packed codes, scales and shifts, plus its full-precision
    residual; a sliding-window layer: the last ``window - 1`` tokens it keeps; a linear-attention
    layer of a hybrid model: its convolution and recurrent states)."""
    out = []
    for layer in cache.layers:
        states = sum(_tensor_bytes(t) for name in ("conv_states", "recurrent_states") for t in (getattr(layer, name, None) or {}).values())
        if isinstance(layer, RDKVLayer):
            out.append(states + layer.nbytes)
        elif not getattr(layer, "is_initialized", False):
            out.append(states)
        else:
            n = _tensor_bytes(getattr(layer, "_quantized_keys", None)) + _tensor_bytes(getattr(layer, "_quantized_values", None))
            out.append(states + n + _tensor_bytes(layer.keys) + _tensor_bytes(layer.values))
    return out


class RDKVCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers store the prompt packed by RDKV.

    ``RDKVCache(model)`` on a patched model uses the planner :func:`rdkv_hf.patch` built for its
    settings. Otherwise give the settings: ``RDKVCache(model_or_config, RDKVConfig(...),
    profile=...)`` builds the planner of ``config.mode``, or ``RDKVCache(model_or_config,
    planner=...)`` takes one ready (the planner's ``config`` is then the settings). Sliding-window
    layers keep Transformers' own bounded cache.
    """

    def __init__(self, model_or_config, config: RDKVConfig | None = None, *, profile=None, planner: Planner | None = None):
        model_config = getattr(model_or_config, "config", model_or_config)
        if not hasattr(model_config, "get_text_config"):
            raise TypeError(
                "RDKVCache needs a patched model, or a Transformers model or config with an RDKVConfig; got "
                f"{type(model_or_config).__name__}"
            )
        if config is not None and planner is not None:
            raise ValueError("give RDKVCache either `config` (and `profile`) or a `planner`, not both")
        if config is not None and not isinstance(config, RDKVConfig):
            raise TypeError(f"`config` must be an RDKVConfig, got {type(config).__name__}")
        layers = compressed_layers(model_config)
        latent = latent_attention(model_config)
        if planner is None and config is not None:
            planner = make_planner(config, profile, layers, heads=kv_head_range(model_or_config))
        if planner is None:
            state = patch_state(model_or_config)
            if state is None:
                raise ValueError(
                    "RDKVCache(model) needs a patched model (rdkv_hf.patch(model, ...)); or pass the settings: "
                    "RDKVCache(model, RDKVConfig(budget=2.5))"
                )
            planner = state.planner
        decode_blocks.check_latent(planner.config, latent, model_config.model_type)
        super().__init__(config=model_config)
        self.planner = planner
        # save_pretrained records the fingerprint of the model that filled the cache.
        self._model = weakref.ref(model_or_config) if isinstance(model_or_config, torch.nn.Module) else None
        self.context_ids: torch.Tensor | None = None  # [batch, tokens] ids of the saved context (from_pretrained)
        text_config = model_config.get_text_config(decoder=True)
        for i in layers:
            self.layers[i] = RDKVLayer.replacing(self.layers[i], i, planner, text_config, latent)
        self._first_rdkv = min(layers, default=None)  # where a forward starts to update the compressed layers

    @property
    def rdkv_config(self) -> RDKVConfig:
        """The settings of this cache (its planner's)."""
        return self.planner.config

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"this RDKVCache was built for a model with {len(self.layers)} layers, but layer {layer_idx} writes to "
                "it; build the cache for the model you run: RDKVCache(model)"
            )
        share = self.planner.cap_layer_share
        if share and layer_idx == self._first_rdkv and self.planner.config.max_cache_bytes is not None:
            # every layer has packed what the last forward packed: share its weights across them
            cache_cap.share_across_layers([self.layers[i] for i in self.rdkv_layers], share)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def rdkv_layers(self) -> list[int]:
        return [i for i, l in enumerate(self.layers) if isinstance(l, RDKVLayer)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache: packed codes, scales, minima, channel orders, raw zones and
        the full-precision tail of every layer (sliding-window layers included)."""
        return sum(layer_nbytes(self))

    def summary(self) -> CacheSummary:
        """What the cache kept, per layer and KV head (print it for a table)."""
        return CacheSummary.from_cache(self)

    def flush(self) -> int:
        """Pack now the tokens that wait for decoded queries (``RDKVConfig.observe``), weighed by the
        queries seen so far; returns how many tokens each layer packed (0: none waited).
        :meth:`save_pretrained` does it first; call it before measuring what a prompt's packing costs."""
        if any(getattr(layer, "pending", 0) for layer in self.layers):
            raise RuntimeError("the cache is in the middle of a forward (tokens not yet compressed); flush it after the forward returns")
        return max([observe.pack(layer) for layer in self.layers if isinstance(layer, RDKVLayer)], default=0)

    # -- compress once, ask many ---------------------------------------------------------------

    def fork(self, repeats: int = 1) -> RDKVCache:
        """A new cache over the same tokens, for another continuation (another question).

        The packed segments are shared, not copied; the full-precision tails and Transformers' own
        layers (sliding windows) are copied, so forks decode independently of each other and of
        this cache. Each batch row is repeated `repeats` times (a batch of questions over one
        context). Memory for N forks: the packed context once plus N tails (:func:`held_nbytes`);
        tokens waiting for decoded queries (``observe``) are packed first (:meth:`flush`).
        """
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"`repeats` must be a positive int (rows per row of this cache), got {repeats!r}")
        if any(getattr(layer, "pending", 0) for layer in self.layers):
            raise RuntimeError("the cache is in the middle of a forward (tokens not yet compressed); fork it after the forward returns")
        self.flush()  # tokens waiting for decoded queries (`observe`) are packed once, for every fork to share
        new = copy.copy(self)
        new.layers = [_fork_layer(layer) for layer in self.layers]
        if repeats > 1:
            new.batch_repeat_interleave(repeats)
            if self.context_ids is not None:
                new.context_ids = self.context_ids.repeat_interleave(repeats, 0)
        return new

    def save_pretrained(self, save_directory: str | os.PathLike, *, input_ids: torch.Tensor | None = None, model=None,
                        metadata: dict | None = None) -> Path:
        """Save this cache into a folder (tokens waiting for decoded queries are packed first,
        :meth:`flush`): packed segments and tails in safetensors, a JSON with the
        schema version, the model's fingerprint, the RDKV settings and the token count (see
        :mod:`rdkv_hf.cache_io`). Written to a temporary folder and renamed into place; a saved
        cache already there is replaced, any other existing folder is refused.

        Args:
            input_ids: ``[batch, tokens]`` the token ids the cache holds (default: ``context_ids``),
                saved so that questions can be appended to them in ``generate()``.
            model: the model that filled the cache (default: the one it was built for).
            metadata: JSON-serializable notes saved as they are.
        Returns:
            the folder.
        """
        model = model if model is not None else (self._model() if self._model is not None else None)
        if model is None:
            raise ValueError("this cache was built from a config, not a model: pass save_pretrained(dir, model=model) to record its fingerprint")
        ids = input_ids if input_ids is not None else self.context_ids
        return cache_io.save(self, save_directory, model, ids, metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model, *, profile=None, **decode) -> RDKVCache:
        """Load a cache saved by :meth:`save_pretrained` for `model`, a patched model (only RDKV
        attention reads packed segments).

        The cache keeps the settings it was compressed with, whatever the model's patch settings,
        so it continues exactly as the saved one would, except for the decode settings given here
        (a warning says when the model's patch compresses decoded tokens and the loaded cache
        would not); ``context_ids`` holds the saved token ids (None if none were saved). Raises
        ``ValueError`` for another model (its fingerprint differs), a damaged or inconsistent
        file, or a missing profile.

        Args:
            profile: the :class:`~rdkv_hf.RDKVProfile` it was compressed with, for the modes that
                need one (default: the patched model's, or the one its settings name).
            decode: ``decode_block``, ``decode_window``, ``decode_novelty`` (:class:`RDKVConfig`)
                for the tokens generated from the loaded cache (a cache is saved without them).
                ``max_cache_bytes`` is refused: the saved segments lack the weights it re-allocates by.
        """
        if patch_state(model) is None:
            raise ValueError(
                "RDKVCache.from_pretrained needs a patched model (only RDKV attention reads packed tokens): call "
                "rdkv_hf.patch(model) first; the loaded cache keeps the settings it was compressed with"
            )
        loaded = cache_io.load(directory, model, profile, decode)
        cache = cls(model, planner=loaded.planner)
        loaded.fill(cache)
        return cache


def _fork_layer(layer):
    """A copy of a cache layer sharing its packed segments: tensors cloned, lists copied."""
    new = copy.copy(layer)
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            setattr(new, name, value.clone())
        elif isinstance(value, list):
            setattr(new, name, list(value))
    return new


def held_nbytes(caches) -> int:
    """Bytes of memory the caches hold together: every tensor storage counted once, whole (forks
    share their packed segments; a view keeps its whole storage alive). Scales, tables and tails
    included."""
    seen: dict[tuple, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()

    for cache in caches:
        for layer in cache.layers:
            for value in vars(layer).values():
                add(value)
            for seg in getattr(layer, "segments", ()):
                for t in (seg.buffers.words, seg.buffers.meta, seg.buffers.raw, seg.buffers.perm, seg.buffers.heads,
                          seg.buffers.groups, seg.real_tokens):
                    add(t)
    return sum(seen.values())
