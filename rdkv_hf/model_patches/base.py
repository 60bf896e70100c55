"""The generic patcher: what rdkv_hf needs to know about a decoder family, and the checks it runs.

Every supported model calls its cache's ``update`` and then the attention interface with post-RoPE
(post-q/k-norm, post-temperature) queries and keys, so the shared ``"rdkv"`` attention does the
work: soft-capping (``softcap``), attention sinks (``s_aux``) and K/V of different widths reach it
as arguments and shapes. A patcher says where the decoder layers are, which layers RDKV compresses
(the full-attention ones; sliding-window, chunked and linear-attention layers keep Transformers'
cache), what the support table says about the family, and refuses what it cannot serve.
"""

from __future__ import annotations

import sys
from collections import Counter

from torch import nn

from .. import compat
from ..compat import layer_types

# What the support table says a family compresses.
EVERY_LAYER = "every layer (all full attention)"
FULL_LAYERS = "the full-attention layers; sliding-window layers keep Transformers' cache"
EVERY_UNLESS_SLIDING = "every layer; with a sliding window configured, only the full-attention layers"

_KIND = {
    "sliding_attention": "sliding-window",
    "chunked_attention": "chunked (local) attention",
    "linear_attention": "linear-attention (recurrent state)",
    "conv": "convolution",
    "dummy": "attention-free or KV-sharing",
}


# Layer types whose cache holds the keys and values of full (global) attention: "hybrid" layers
# (Falcon-H1) run Mamba beside it and keep both in one cache layer.
FULL_ATTENTION = ("full_attention", "hybrid")


def full_attention_layers(config) -> tuple[int, ...]:
    """Indices of the full-attention layers of a model's (text) config. Sliding-window layers
    (Gemma 3: five of every six) keep Transformers' own cache, bounded by the window."""
    types = layer_types(config.get_text_config(decoder=True))
    return tuple(i for i, t in enumerate(types) if t in FULL_ATTENTION)


def layer_notes(config) -> list[str]:
    """A warning when some layers are not compressed (sliding, chunked, linear attention), naming
    how many and why; none when every layer is full attention."""
    text = config.get_text_config(decoder=True)
    types = layer_types(text)
    other = Counter(t for t in types if t not in FULL_ATTENTION)
    if not other:
        return []
    kinds = " and ".join(_KIND.get(t, t) for t in sorted(other))
    n_full = len(types) - sum(other.values())
    if n_full == 0:
        hint = (f" (window {getattr(text, 'sliding_window', None)}); set `config.sliding_window = None` if the model was trained without one"
                if "sliding_attention" in other else "")
        return [f"every layer of this {text.model_type} config is {kinds}: those keep Transformers' own cache, so RDKV "
                f"compresses nothing{hint}"]
    return [f"{sum(other.values())} of {len(types)} layers are {kinds} and keep Transformers' own cache; RDKV compresses "
            f"the other {n_full}"]


def _attribute_path(root: nn.Module, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


class Patcher:
    """A decoder family: one registry entry (:data:`rdkv_hf.model_patches.PATCHERS`) per model type.

    Args:
        model_type: ``config.model_type`` of the models it serves.
        compresses: which layers RDKV compresses, for the support table.
        limits: what does not work or works differently, for the support table ("" if nothing).
        layers: where the decoder layers are, from the top-level model (the first path that exists).
        profiles: whether :func:`rdkv_hf.calibrate` measures a profile of it (it needs ``k_proj``
            and ``v_proj`` in every layer's ``self_attn``): True, False, or the Transformers major
            version from which it does (a string).
    """

    def __init__(self, model_type: str, compresses: str = EVERY_LAYER, limits: str = "", layers: tuple[str, ...] = ("model.layers",),
                 profiles: bool | str = True):
        self.model_type, self.compresses, self.limits, self.layers = model_type, compresses, limits, layers
        self.profiles = profiles

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_type!r})"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        for path in self.layers:
            found = _attribute_path(model, path)
            if found is not None:
                return found
        raise ValueError(f"{type(model).__name__} has no {' or '.join(f'`{p}`' for p in self.layers)}; is it a {self.model_type} model?")

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of each layer that has one (a hybrid's linear-attention layers have none)."""
        mods = []
        for i, layer in enumerate(self.decoder_layers(model)):
            m = getattr(layer, "self_attn", None)
            if m is None:
                continue
            if getattr(m, "layer_idx", i) != i:
                raise ValueError(f"attention module {i} reports layer_idx={m.layer_idx}; the RDKV cache is indexed by layer")
            mods.append(m)
        return mods

    def profiles_here(self) -> bool:
        """Whether :func:`rdkv_hf.calibrate` measures a profile of this family on the installed Transformers."""
        if isinstance(self.profiles, str):
            return compat.TRANSFORMERS_VERSION.major >= int(self.profiles)
        return self.profiles

    def compressed_layers(self, config) -> tuple[int, ...]:
        """The layers whose cache RDKV compresses: the full-attention ones."""
        return full_attention_layers(config)

    def latent_attention(self, config):
        """How the attention reads a cache that holds a latent instead of keys and values (see
        ``cache.py``); None: keys and values."""
        return None

    def check(self, model: nn.Module) -> list[str]:
        """Raise for what cannot work; return warnings for what works with limits."""
        layers = self.decoder_layers(model)
        modules = {type(model).__module__} | {type(layer).__module__ for layer in layers[:1]}
        own = compat.own_cache_classes(sys.modules[m] for m in sorted(modules) if m in sys.modules)
        if own:
            raise ValueError(
                f"{self.model_type} keeps its KV cache in its own class ({', '.join(own)}) on Transformers "
                f"{compat.TRANSFORMERS_VERSION}, not in a list of attention layers, so rdkv_hf cannot compress it; newer "
                f"Transformers releases keep it as a list of layers: pip install -U 'transformers<{compat.MAX_TRANSFORMERS_EXCLUSIVE}'"
            )
        compressed = set(self.compressed_layers(model.config))
        for m in self.attention_modules(model):
            if m.layer_idx in compressed and not compat.uses_attention_interface(m):
                raise ValueError(
                    f"{self.model_type}'s attention ({type(m).__name__}) computes attention itself on Transformers "
                    f"{compat.TRANSFORMERS_VERSION} instead of calling the attention interface, which is where RDKV attends; "
                    f"newer Transformers releases call it: pip install -U 'transformers<{compat.MAX_TRANSFORMERS_EXCLUSIVE}'"
                )
        return layer_notes(model.config)
