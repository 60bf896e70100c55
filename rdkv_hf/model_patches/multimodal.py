"""Vision-language models: RDKV compresses the cache of the text decoder inside them (image tokens
of the prompt included, like any other prompt token); the vision encoder keeps no cache.

The decoder layers sit under ``model.language_model`` (Transformers 4.57 and 5.x alike). The text
decoder is one of the registry's own families (LLaVA: whichever its ``text_config`` names) or the
VLM's own (Qwen2.5-VL's ``qwen2_5_vl_text``, Gemma 3's ``gemma3_text``); either way the shared
attention serves it as it serves the text-only model.
"""

from __future__ import annotations

from .base import FULL_LAYERS, Patcher

DECODER_PATHS = ("model.language_model.layers", "language_model.model.layers", "language_model.layers")


class MultimodalPatcher(Patcher):
    """A VLM whose text decoder is `decoder` (its text config's ``model_type``), or any decoder
    family of the registry when `decoder` is None (LLaVA)."""

    def __init__(self, model_type: str, decoder: str | None, compresses: str = FULL_LAYERS, limits: str = "", profiles: bool | str = True):
        super().__init__(model_type, compresses, limits, layers=DECODER_PATHS, profiles=profiles)
        self.decoder = decoder

    def serves_decoder(self, text_model_type: str, supported) -> bool:
        """Whether this VLM's text decoder of type `text_model_type` is served (`supported`: the
        registry's text model types)."""
        return text_model_type == self.decoder if self.decoder is not None else text_model_type in supported
