"""The one seam through which rdkv_hf changes a model's attention: Transformers' attention interface.

:class:`AttentionOverride` registers an attention function (with the sdpa mask builder) under a name
and switches a model to it; :func:`rdkv_hf.patch` applies the ``"rdkv"`` attention this way until
:func:`rdkv_hf.unpatch`, and the calibration and the evaluation use it as a context manager around
their capturing forwards, so the model's own implementation is always restored (in ``finally``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable


class AttentionOverride:
    """An attention function `fn` (Transformers' attention interface signature) under `name`."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def apply(self, model) -> str | None:
        """Register the function (idempotent) and switch `model` to it; returns the implementation
        it had, for :meth:`restore`."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(self.name, self.fn)
        AttentionMaskInterface.register(self.name, sdpa_mask)  # without it there is no causal mask
        previous = model.config._attn_implementation
        model.set_attn_implementation(self.name)
        return previous

    @staticmethod
    def restore(model, previous: str | None) -> None:
        if previous is not None and model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)

    @contextlib.contextmanager
    def __call__(self, model):
        """``with override(model):`` the model attends with the function, then as before."""
        previous = self.apply(model)
        try:
            yield model
        finally:
            self.restore(model, previous)
