"""Gemma 3 (text): five sliding-window layers for each global one, one KV head of dimension 256 in
the real 270M model, q/k norms and ``query_pre_attn_scalar`` (the attention module's scaling, which
the attention interface receives). RDKV compresses the global layers, whose cache grows with the
context; the sliding layers keep Transformers' cache, bounded by the window."""

from .base import Patcher


class Gemma3Patcher(Patcher):
    model_types = ("gemma3_text",)
