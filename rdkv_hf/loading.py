"""`rdkv_hf.from_pretrained`: load a Transformers model and patch it from its saved RDKV settings.

`patch()` writes its settings to ``model.config.rdkv`` (a plain dict), so ``save_pretrained`` puts
them in ``config.json``; loading that folder with :func:`from_pretrained` patches the model again.
It wraps ``AutoModelForCausalLM.from_pretrained``, so every Transformers argument (``dtype``,
``gguf_file``, ``revision``, ...) passes through; GGUF files work because no quantization config is
involved.

Why not Transformers' ``quantization_config=`` plug-in route: a registered quantizer config does
round-trip through ``config.json``, but it marks the model as quantized (``model.half()`` and
``model.float()`` then raise), it cannot be combined with ``gguf_file=`` or with a real weight
quantizer (a model has one ``quantization_config``), and it misuses the weight-quantization slot for
a cache setting. We therefore do not offer it.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from .config import RDKVConfig
from .patching import CONFIG_KEY, patch
from .planners import planner_class

logger = logging.getLogger(__name__)

_SETTINGS = {"budget", "tokens", "profile", "mode", "config"}


def from_pretrained(path_or_id: str | os.PathLike, *, model_class: type | None = None, **kwargs) -> nn.Module:
    """Load a causal LM and patch it with RDKV.

    Settings come from the ``"rdkv"`` entry of its ``config.json`` (written by ``save_pretrained``
    of a patched model); ``budget=``, ``tokens=``, ``profile=``, ``mode=`` and other
    :class:`RDKVConfig` fields given here override them. A model saved without that entry is patched
    from the keywords alone, and needs at least one of them.

    Args:
        path_or_id: a local folder or Hub repo id, as for Transformers.
        model_class: the Transformers class to load with (default ``AutoModelForCausalLM``).
        **kwargs: RDKV settings, then anything ``from_pretrained`` of Transformers takes.
    """
    from transformers import AutoModelForCausalLM

    fields = set(RDKVConfig.__dataclass_fields__) | _SETTINGS
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    model = (model_class or AutoModelForCausalLM).from_pretrained(path_or_id, **kwargs)
    saved = getattr(model.config, CONFIG_KEY, None)
    if saved is None and not settings:
        raise ValueError(
            f"{path_or_id!r} has no RDKV settings in its config.json; pass some, e.g. "
            "rdkv_hf.from_pretrained(path, budget=2.5)"
        )
    merged = dict(saved or {})
    if "config" in settings:
        merged = settings.pop("config").to_dict()
    if "tokens" in settings:
        merged.pop("budget", None)
    if "budget" in settings:
        merged.pop("tokens", None)
    merged.update(settings)
    profile = merged.get("profile")
    mode = merged.get("mode", RDKVConfig().mode)
    if profile is None and planner_class(mode).needs_profile:
        raise ValueError(
            f"the RDKV settings of {path_or_id!r} use mode={mode!r}, which needs a profile, but name none (the model "
            "was patched with an in-memory profile); pass profile= a folder or Hub repo id (save a profile with "
            "profile.save_pretrained(dir))"
        )
    cfg = RDKVConfig.from_dict(merged)
    logger.info("rdkv_hf: patching %s with %s", path_or_id, cfg)
    return patch(model, config=cfg, profile=profile)
