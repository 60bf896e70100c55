"""`patch` / `unpatch`: turn one model instance's KV cache into an RDKV cache, and back.

Patching validates everything first (the model type, the settings, the profile, the mode's planner),
then switches this model to the ``"rdkv"`` attention (:mod:`rdkv_hf.overrides`) and wraps this
instance's ``generate`` so that it builds an :class:`RDKVCache` when none is given. The attention
finds its cache layer per call (see ``cache.take_layer``): no hook is added and nothing is stored on
the modules. Nothing module-level is replaced; ``unpatch`` restores every original.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import types
import warnings
from collections.abc import Iterator

from torch import nn

from . import compat, decode_blocks
from .attention import RDKV_ATTENTION
from .cache import RDKVCache
from .config import RDKVConfig
from .model_patches import compressed_layers, latent_attention, patcher_for
from .parallel import kv_head_range
from .planners import make_planner
from .profile import RDKVProfile
from .state import PatchState, patch_state, set_patch_state

logger = logging.getLogger(__name__)

CONFIG_KEY = "rdkv"  # model.config.rdkv: the settings save_pretrained writes to config.json
_lock = threading.RLock()  # patch/unpatch of any model: one at a time


def _load_profile(profile, model) -> RDKVProfile | None:
    if profile is None:
        return None
    if isinstance(profile, (str, os.PathLike)):
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
    if budget is not None and tokens is not None:
        raise ValueError(f"give `budget` (bits per element) or `tokens` (FP16-equivalent tokens per head), not both; got budget={budget!r}, tokens={tokens!r}")
    if mode is None:
        mode = "rdkv+profile" if profile is not None else "rdkv"
    profile_id = os.fspath(profile) if isinstance(profile, (str, os.PathLike)) else getattr(profile, "name_or_path", None)
    given = {k: v for k, v in (("budget", budget), ("tokens", tokens)) if v is not None}
    return RDKVConfig(**given, mode=mode, profile=profile_id, **options)


def patch(model: nn.Module, budget: float | None = None, *, tokens: int | None = None,
          profile: RDKVProfile | str | os.PathLike | None = None, mode: str | None = None,
          config: RDKVConfig | None = None, **options) -> nn.Module:
    """Compress this model's KV cache with RDKV; returns the same model.

    Args:
        model: a Transformers causal LM (see ``rdkv_hf.model_patches`` for the supported types).
        budget: average bits per cached prompt K/V element, scales and indices included (default
            ``rdkv_hf.config.DEFAULT_BUDGET``, 2.5).
        tokens: instead of `budget`, FP16-equivalent tokens per KV head (RDKV's budgets).
        profile: an :class:`RDKVProfile`, a Hub repo id or a directory (RateQuant head budgets).
        mode: a mode of :mod:`rdkv_hf.planners` (``"rdkv"``; ``"rdkv+profile"``, the default with a
            profile; ``"ratequant"``, ``"uniform"``, the eviction baselines).
        config: a full :class:`RDKVConfig` instead of the keywords.
        **options: other :class:`RDKVConfig` fields (``window``, ``backend``, ...).

    Patching twice replaces the settings; a patch that fails leaves the model as it was (patched
    with its previous settings, if it had any). A tensor-parallel model is patched on every rank
    (the profile check gathers the K/V weights; each rank gets the budgets of its own KV heads).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"patch() takes a Transformers model, got {type(model).__name__}")
    compat.check_transformers()
    patcher = patcher_for(model)
    cfg = _resolve_config(budget, tokens, profile, mode, config, options)
    if cfg.profile is not None and os.path.isdir(cfg.profile):
        cfg = cfg.replace(profile=os.path.abspath(cfg.profile))  # config.json names it from any working directory
    prof = _load_profile(profile if profile is not None else cfg.profile, model)
    _check_backend(cfg.backend, model)
    planner = make_planner(cfg, prof, compressed_layers(model), heads=kv_head_range(model))
    decode_blocks.check_latent(cfg, latent_attention(model), model.config.model_type)
    notes = patcher.check(model)
    patcher.attention_modules(model)  # checks the layout
    with _lock:
        _apply(model, planner, prof)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    logger.info("rdkv_hf: patched %s (%s)", type(model).__name__, cfg)
    return model


def _check_backend(backend: str, model) -> None:
    """A decode backend asked for by name must be able to run on the model's devices."""
    from .kernels import cpu_decode, triton_available

    devices = {p.device.type for p in model.parameters()} - {"meta"}
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton (or backend='auto')")
        if "cuda" not in devices and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' runs on CUDA devices; the model is on {sorted(devices)}: use backend='auto'")
    if backend == "auto" and "cpu" in devices:
        cpu_decode.load()  # its first build (once per machine, announced) runs here, not inside the first decode step
    if backend == "cpu" and not cpu_decode.available():
        raise ValueError(f"backend='cpu' needs the C++ decode kernel, which is unavailable here ({cpu_decode.unavailable_reason()}); "
                         "use backend='auto' or 'torch'")


def _apply(model, planner, profile) -> None:
    """Switch `model` to `planner`'s settings (validated), or restore it if that fails."""
    state = patch_state(model)
    if state is not None:  # re-patch: the attention and generate stay, the settings change
        previous = (state.planner, state.profile, model.config.__dict__.get(CONFIG_KEY))
        try:
            state.planner, state.profile = planner, profile
            model.config.rdkv = planner.config.to_dict()
        except BaseException:
            state.planner, state.profile = previous[:2]
            model.config.rdkv = previous[2]
            raise
        return
    state = PatchState(planner, profile, attn_implementation=None, own_generate=model.__dict__.get("generate"))
    try:
        state.attn_implementation = RDKV_ATTENTION.apply(model)
        set_patch_state(model, state)
        # A method bound to this instance: copy.deepcopy rebinds it to the copy.
        model.generate = types.MethodType(_generate, model)
        # save_pretrained writes it to config.json; rdkv_hf.from_pretrained patches from it again
        model.config.rdkv = planner.config.to_dict()
    except BaseException:
        _restore(model, state)
        raise


def _generate(model, *args, **kwargs):
    """``generate()`` of a patched model: Transformers' own, with an :class:`RDKVCache` built for the
    call when no cache is given (under either name of the cache argument)."""
    state = patch_state(model)
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
    RDKV_ATTENTION.restore(model, state.attn_implementation)
    model.config.__dict__.pop(CONFIG_KEY, None)
    if state.own_generate is not None:
        model.generate = state.own_generate
    else:
        model.__dict__.pop("generate", None)
    set_patch_state(model, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`; a model that is not patched is returned unchanged."""
    with _lock:
        state = patch_state(model)
        if state is not None:
            _restore(model, state)
    return model


def is_patched(model: nn.Module) -> bool:
    return patch_state(model) is not None


@contextlib.contextmanager
def patched(model: nn.Module, budget: float | None = None, **kwargs) -> Iterator[nn.Module]:
    """``with rdkv_hf.patched(model, budget=2.5): model.generate(...)``; on exit the model is as it
    was before the block (unpatched, or patched with its previous settings: blocks nest)."""
    before = patch_state(model)
    previous = None if before is None else (before.planner, before.profile)
    patch(model, budget, **kwargs)
    try:
        yield model
    finally:
        with _lock:
            if previous is None:
                unpatch(model)
            else:
                _apply(model, *previous)
