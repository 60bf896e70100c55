"""Registry of per-architecture patchers, keyed by ``config.model_type``."""

from .base import Patcher, full_attention_layers
from .gemma3 import Gemma3Patcher
from .llama import LlamaPatcher
from .mistral import MistralPatcher
from .qwen3 import Qwen3Patcher

PATCHERS: dict[str, Patcher] = {t: p() for p in (LlamaPatcher, Qwen3Patcher, MistralPatcher, Gemma3Patcher) for t in p.model_types}


def patcher_for(model) -> Patcher:
    model_type = model.config.get_text_config(decoder=True).model_type
    if model_type not in PATCHERS:
        raise ValueError(f"rdkv_hf does not support model_type {model_type!r} yet; supported: {sorted(PATCHERS)}")
    return PATCHERS[model_type]


def compressed_layers(model_or_config) -> tuple[int, ...]:
    """Indices of the layers an RDKV cache (and the eviction baselines) compress in a model (or
    its config): its patcher's choice, the full-attention layers for a model type without one."""
    config = getattr(model_or_config, "config", model_or_config)
    patcher = PATCHERS.get(config.get_text_config(decoder=True).model_type)
    return patcher.compressed_layers(config) if patcher is not None else full_attention_layers(config)


__all__ = ["PATCHERS", "Patcher", "compressed_layers", "patcher_for"]
