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

_SETTINGS = {"budget", "tokens", "profile", "mode", "rdkv_config"}


def from_pretrained(path_or_id: str | os.PathLike, *, model_class: type | None = None, **kwargs) -> nn.Module:
    """Load a causal LM and patch it with RDKV.

    Settings come from the ``"rdkv"`` entry of its ``config.json`` (written by ``save_pretrained``
    of a patched model); ``budget=``, ``tokens=``, ``profile=``, ``mode=``, ``rdkv_config=`` (a
    whole :class:`RDKVConfig`) and other :class:`RDKVConfig` fields given here override them. A
    model saved without that entry is patched from the keywords alone, and needs at least one of them.
    ``config=`` is Transformers' (a model config); an :class:`RDKVConfig` given as ``config=`` is
    taken as ``rdkv_config=``.

    Args:
        path_or_id: a local folder or Hub repo id, as for Transformers.
        model_class: the Transformers class to load with (default ``AutoModelForCausalLM``).
        **kwargs: RDKV settings, then anything ``from_pretrained`` of Transformers takes.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(kwargs.get("config"), RDKVConfig):
        kwargs["rdkv_config"] = kwargs.pop("config")
    fields = set(RDKVConfig.__dataclass_fields__) | _SETTINGS
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    model = (model_class or AutoModelForCausalLM).from_pretrained(path_or_id, **kwargs)
    saved = getattr(model.config, CONFIG_KEY, None)
    if saved is not None and (not isinstance(saved, dict) or not saved):
        raise ValueError(
            f"the {CONFIG_KEY!r} entry of the config.json of {path_or_id!r} must be the RDKV settings patch() "
            f"writes (a non-empty JSON object), got {saved!r}; fix or remove it, or pass the settings, e.g. budget=2.5"
        )
    if saved is None and not settings:
        raise ValueError(
            f"{path_or_id!r} has no RDKV settings in its config.json; pass some, e.g. "
            "rdkv_hf.from_pretrained(path, budget=2.5)"
        )
    merged = dict(saved or {})
    if "rdkv_config" in settings:
        merged = settings.pop("rdkv_config").to_dict()
    if "tokens" in settings:
        merged.pop("budget", None)
    if "budget" in settings:
        merged.pop("tokens", None)
    profile = settings.pop("profile", merged.get("profile"))  # a string, or an RDKVProfile given here
    merged.update(settings)
    merged["profile"] = profile if isinstance(profile, (str, os.PathLike)) or profile is None else getattr(profile, "name_or_path", None)
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
