"""Llama (and Mistral GGUF files, which Transformers loads as Llama): all layers full attention."""

from .base import Patcher


class LlamaPatcher(Patcher):
    model_types = ("llama",)
