"""`patch` / `unpatch`: turn one model instance's KV cache into an RDKV cache, and back.

Patching registers the ``"rdkv"`` attention and mask functions with Transformers (by name, once),
switches this model to them, and wraps this instance's ``generate`` so that it builds an
:class:`RDKVCache` when none is given. The attention finds its cache layer per call (see
``cache.take_layer``): no hook is added and nothing is stored on the modules. Nothing module-level
is replaced; ``unpatch`` restores every original.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from dataclasses import dataclass, field

from torch import nn

from . import compat
from .cache import RDKVCache, global_layers
from .config import RDKVConfig
from .model_patches import patcher_for
from .planner import Planner

logger = logging.getLogger(__name__)

_STATE = "_rdkv_state"


@dataclass
class PatchState:
    config: RDKVConfig
    profile: object | None
    attn_implementation: str
    own_generate: object | None = None  # an instance-level generate that was there before us


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .attention import ATTN_NAME, rdkv_attention_forward

    AttentionInterface.register(ATTN_NAME, rdkv_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _load_profile(profile, model):
    if profile is None:
        return None
    from .profiles import RDKVProfile

    if profile == "<in-memory profile>":
        raise ValueError("these settings name an in-memory profile; pass the RDKVProfile object, or save it "
                         "with profile.save_pretrained(dir) and pass profile=dir")
    if isinstance(profile, str):
        profile = RDKVProfile.from_pretrained(profile)
    if not isinstance(profile, RDKVProfile):
        raise TypeError(f"`profile` must be an RDKVProfile, a Hub repo id or a directory, got {type(profile).__name__}")
    profile.check_model(model)
    return profile


def _resolve_config(budget, tokens, profile, mode, config, options) -> RDKVConfig:
    if config is not None:
        if not isinstance(config, RDKVConfig):
            raise TypeError(f"`config` must be an RDKVConfig, got {type(config).__name__}")
        if budget is not None or tokens is not None or mode is not None or options:
            raise ValueError("give either `config=RDKVConfig(...)` or keyword settings, not both")
        return config
    if mode is None:
        mode = "rdkv+profile" if profile is not None else "rdkv"
    profile_id = profile if isinstance(profile, str) else getattr(profile, "name_or_path", None)
    if profile is not None and profile_id is None:
        profile_id = "<in-memory profile>"
    kw = dict(budget=2.5 if budget is None and tokens is None else budget, tokens=tokens, mode=mode, profile=profile_id)
    return RDKVConfig(**kw, **options)


def patch(model: nn.Module, budget: float | None = None, *, tokens: int | None = None, profile=None,
          mode: str | None = None, config: RDKVConfig | None = None, **options) -> nn.Module:
    """Compress this model's KV cache with RDKV; returns the same model.

    Args:
        model: a Transformers causal LM (Llama, Qwen3, Mistral).
        budget: average bits per cached prompt K/V element, scales and indices included (default 2.5).
        tokens: instead of `budget`, FP16-equivalent tokens per KV head (RDKV's budgets).
        profile: an :class:`RDKVProfile`, a Hub repo id or a directory (RateQuant head budgets).
        mode: ``"rdkv"``, ``"rdkv+profile"`` (default with a profile), ``"ratequant"``, ``"uniform"``.
        config: a full :class:`RDKVConfig` instead of the keywords.
        **options: other :class:`RDKVConfig` fields (``window``, ``backend``, ...).

    Patching twice replaces the settings; a failed patch leaves the model as it was.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"patch() takes a Transformers model, got {type(model).__name__}")
    patcher = patcher_for(model)
    cfg = _resolve_config(budget, tokens, profile, mode, config, options)
    prof = _load_profile(profile if profile is not None else cfg.profile, model)
    # Validates the mode against the profile before anything changes (RDKVCache builds the real one).
    Planner(cfg, prof, layers=global_layers(model))
    notes = patcher.check(model)
    patcher.attention_modules(model)  # checks the layout
    if getattr(model, _STATE, None) is not None:
        unpatch(model)

    state = PatchState(cfg, prof, model.config._attn_implementation, own_generate=model.__dict__.get("generate"))
    try:
        _register_attention()
        from .attention import ATTN_NAME

        model.set_attn_implementation(ATTN_NAME)
        setattr(model, _STATE, state)
        # A method bound to this instance: copy.deepcopy rebinds it to the copy.
        model.generate = types.MethodType(_generate, model)
        # save_pretrained writes it to config.json; rdkv_hf.from_pretrained patches from it again
        model.config.rdkv = cfg.to_dict()
    except Exception:
        _restore(model, state)
        raise
    for n in notes:
        warnings.warn(n, stacklevel=2)
    logger.info("rdkv_hf: patched %s (%s)", type(model).__name__, cfg)
    return model


def _generate(model, *args, **kwargs):
    """``generate()`` of a patched model: Transformers' own, with an :class:`RDKVCache` built for the
    call when no cache is given (under either name of the cache argument)."""
    state = getattr(model, _STATE)
    original = state.own_generate or types.MethodType(type(model).generate, model)
    given, name = compat.given_cache(kwargs)
    gen_config = kwargs.get("generation_config") or model.generation_config
    use_cache = kwargs.get("use_cache", getattr(gen_config, "use_cache", True))
    if given is not None:
        if not isinstance(given, RDKVCache):
            warnings.warn(
                f"generate() got {name}={type(given).__name__}: RDKV compression is off for this call; pass "
                "rdkv_hf.RDKVCache(model) or no cache",
                stacklevel=2,
            )
        elif use_cache is False:
            raise ValueError(
                "generate() got an RDKVCache and use_cache=False: Transformers would feed the whole sequence "
                "again at every step through the cache; drop `use_cache=False` (or the cache)"
            )
        kwargs[compat.CACHE_ARG] = kwargs.pop(name)
        return original(*args, **kwargs)
    if use_cache is False:
        warnings.warn("generate() with use_cache=False keeps no KV cache, so RDKV has nothing to compress in this call", stacklevel=2)
        return original(*args, **kwargs)
    asked = kwargs.get("cache_implementation") or getattr(kwargs.get("generation_config"), "cache_implementation", None)
    if asked is not None:
        warnings.warn(
            f"generate() got cache_implementation={asked!r}: Transformers builds that cache, so RDKV compression "
            "is off for this call; drop it to compress",
            stacklevel=2,
        )
        return original(*args, **kwargs)
    if getattr(model.generation_config, "cache_implementation", None) is not None:
        # The checkpoint's own generation_config names a cache (Gemma 2/3: "hybrid"); RDKV's replaces it.
        kwargs["cache_implementation"] = None
    kwargs[compat.CACHE_ARG] = RDKVCache(model)
    return original(*args, **kwargs)


def _restore(model, state: PatchState) -> None:
    if model.config._attn_implementation != state.attn_implementation:
        model.set_attn_implementation(state.attn_implementation)
    model.config.__dict__.pop("rdkv", None)
    if state.own_generate is not None:
        model.generate = state.own_generate
    else:
        model.__dict__.pop("generate", None)
    model.__dict__.pop(_STATE, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`; a model that is not patched is returned unchanged."""
    state = getattr(model, _STATE, None)
    if state is not None:
        _restore(model, state)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


@contextlib.contextmanager
def patched(model: nn.Module, budget: float | None = None, **kwargs):
    """``with rdkv_hf.patched(model, budget=2.5): model.generate(...)``; restores on exit."""
    patch(model, budget, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)
