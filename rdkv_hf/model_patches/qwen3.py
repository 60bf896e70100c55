"""Qwen3: q/k RMSNorm runs before RoPE inside the attention module, so the queries and keys the
attention interface receives are already normalized: nothing else differs. With
``use_sliding_window`` the layers past ``max_window_layers`` are sliding and keep Transformers' cache."""

from .base import Patcher
from .mistral import sliding_layer_warnings


class Qwen3Patcher(Patcher):
    model_types = ("qwen3",)

    def check(self, model):
        return sliding_layer_warnings(model)
