"""Mistral: v0.2/v0.3 configs (``sliding_window: null``) are all full attention. A v0.1-style
config with a sliding window makes every layer a bounded sliding-window layer: those keep
Transformers' own cache (already bounded by the window) and RDKV compresses nothing there."""

from ..compat import layer_types
from .base import Patcher


def sliding_layer_warnings(model) -> list[str]:
    text = model.config.get_text_config(decoder=True)
    types = layer_types(text)
    n_sliding = sum(t != "full_attention" for t in types)
    if not n_sliding:
        return []
    if n_sliding == len(types):
        return [
            f"every layer of this {text.model_type} config is sliding-window (window {getattr(text, 'sliding_window', None)}): "
            "those keep Transformers' bounded cache, so RDKV compresses nothing; set "
            "`config.sliding_window = None` if the model was trained without one"
        ]
    return [f"{n_sliding} of {len(types)} layers are sliding-window and keep Transformers' bounded cache; RDKV compresses the other {len(types) - n_sliding}"]


class MistralPatcher(Patcher):
    model_types = ("mistral",)

    def check(self, model):
        return sliding_layer_warnings(model)
