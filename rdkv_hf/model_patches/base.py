"""Per-architecture patchers: what a model type needs beyond the shared attention seam.

Every supported model calls its cache's ``update`` and then the attention interface with
post-RoPE (and, for Qwen3, post-q/k-norm) queries and keys, so the shared `"rdkv"` attention does
the work. A patcher says where the attention modules are and refuses settings it cannot serve.
"""

from __future__ import annotations

import logging

from torch import nn

from ..compat import layer_types

logger = logging.getLogger(__name__)


def full_attention_layers(config) -> tuple[int, ...]:
    """Indices of the full-attention layers of a model's (text) config. Sliding-window layers
    (Gemma 3: five of every six) keep Transformers' own cache, bounded by the window."""
    types = layer_types(config.get_text_config(decoder=True))
    return tuple(i for i, t in enumerate(types) if t == "full_attention")


class Patcher:
    """Base patcher for decoder-only models laid out as ``model.model.layers[i].self_attn``."""

    model_types: tuple[str, ...] = ()

    def decoder(self, model: nn.Module) -> nn.Module:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers"):
            raise ValueError(f"{type(model).__name__} has no `model.layers`; is this a causal LM of type {self.model_types}?")
        return inner

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [layer.self_attn for layer in self.decoder(model).layers]
        for i, m in enumerate(mods):
            if getattr(m, "layer_idx", i) != i:
                raise ValueError(f"attention module {i} reports layer_idx={m.layer_idx}; the RDKV cache is indexed by layer")
        return mods

    def compressed_layers(self, config) -> tuple[int, ...]:
        """The layers whose cache RDKV compresses: the full-attention ones."""
        return full_attention_layers(config)

    def check(self, model: nn.Module) -> list[str]:
        """Raise for what cannot work; return warnings for what works with limits."""
        return []
