"""What differs between the Transformers releases rdkv_hf supports: one place for it.

* The cache argument: Transformers 5.24 renamed ``past_key_values`` to ``cache`` in the models'
  forward, in ``generate()`` and in the outputs (the old name is a deprecated alias until 5.40 / 6.0).
  :data:`CACHE_ARG` is the name the installed release takes, :func:`cache_kwargs` builds the keyword,
  :func:`given_cache` reads a cache given under either name and :func:`output_cache` reads it back
  from an output.
* :func:`layer_types`: the attention type of each decoder layer (``get_layer_types_and_kwargs``
  since 5.14; before, read from the config as ``DynamicCache`` did).
* :func:`query_length`: ``CacheLayerMixin.get_mask_sizes`` takes the number of new tokens since 5.4
  and their ``cache_position`` tensor before.
* :func:`tensor_parallel_kwargs`: the ``from_pretrained`` keywords that load a model with its
  tensor-parallel plan (``distributed_config=DistributedConfig(tp_plan=...)`` where
  ``DistributedConfig`` takes a plan, 5.x; ``tp_plan=`` before, deprecated after).
* :func:`check_transformers` refuses a release outside the tested range with the fix in the message.
* Architectures: :func:`has_model_type` (which model types the installed release knows),
  :func:`uses_attention_interface` (4.57's Qwen2-MoE attention computes eager attention itself),
  :func:`own_cache_classes` (hybrid models kept their cache in a class of their own before
  Transformers 5, e.g. 4.57's ``Qwen3NextDynamicCache``; since then it is a list of layers) and
  :func:`caches_mla_latent` (DeepSeek's multi-head latent attention caches per-head K and V in
  4.57 and the latent in 5.x); :data:`LinearAttentionLayer` and
  :data:`LinearAttentionAndFullAttentionLayer` (5.x: Falcon-H1's layers keep a Mamba state and
  attention in one cache layer; None before).

Nothing else in the package spells either name of the cache argument or reads these internals.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

try:
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # transformers < 5.14
    get_layer_types_and_kwargs = None

try:  # a layer holding a Mamba / linear-attention state (and, in its hybrid subclass, attention too)
    from transformers.cache_utils import LinearAttentionAndFullAttentionLayer, LinearAttentionLayer
except ImportError:  # transformers 4.57: hybrid models keep their own cache classes
    LinearAttentionLayer = LinearAttentionAndFullAttentionLayer = None

# The range pyproject.toml declares and CI tests at both ends (.ci/run).
MIN_TRANSFORMERS = "4.57.6"
MAX_TRANSFORMERS_EXCLUSIVE = "6"

TRANSFORMERS_VERSION = Version(transformers.__version__)
CACHE_ARG = "cache" if TRANSFORMERS_VERSION.release >= (5, 24) else "past_key_values"
CACHE_ARG_NAMES = ("cache", "past_key_values")


def cache_kwargs(cache) -> dict:
    """``{CACHE_ARG: cache}``: the keyword a model's forward and ``generate()`` take the cache as."""
    return {CACHE_ARG: cache}


def given_cache(kwargs: dict, where: str = "generate()"):
    """The cache passed in `kwargs` under either name (None if none), and the name it came under.

    Raises ``ValueError`` if both names are given."""
    found = [(name, kwargs[name]) for name in CACHE_ARG_NAMES if kwargs.get(name) is not None]
    if len(found) > 1:
        raise ValueError(f"{where} got both `cache=` and `past_key_values=`; pass the cache once (`{CACHE_ARG}=` on this Transformers)")
    return (found[0][1], found[0][0]) if found else (None, None)


def output_cache(outputs):
    """The cache of a model output or of ``generate(..., return_dict_in_generate=True)``'s output,
    whichever name the installed Transformers gives it (no deprecation warning)."""
    for name in CACHE_ARG_NAMES:
        cache = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if cache is not None:
            return cache
    return None


def layer_types(text_config) -> list[str]:
    """``"full_attention"``, ``"sliding_attention"``, ``"chunked_attention"``, ... per decoder layer,
    as Transformers' ``DynamicCache(config=...)`` builds its layers."""
    if get_layer_types_and_kwargs is not None:
        return list(get_layer_types_and_kwargs(text_config)[0])
    types = getattr(text_config, "layer_types", None)
    if types is None:
        n = text_config.num_hidden_layers
        if getattr(text_config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(text_config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    shared = getattr(text_config, "num_kv_shared_layers", None)
    return list(types[:-shared] if shared else types)


def query_length(arg) -> int:
    """The number of new tokens from ``get_mask_sizes``'s argument (an int since 5.4, the new
    tokens' ``cache_position`` tensor before)."""
    return int(arg.shape[0]) if isinstance(arg, torch.Tensor) else int(arg)


def tensor_parallel_kwargs(plan="auto") -> dict:
    """``from_pretrained`` keywords for tensor parallelism with `plan` (``"auto"``: the model's own)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # pragma: no cover - every supported release has the module
        DistributedConfig = None
    if DistributedConfig is not None and "tp_plan" in getattr(DistributedConfig, "__dataclass_fields__", {}):
        return {"distributed_config": DistributedConfig(tp_plan=plan)}
    return {"tp_plan": plan}


def check_transformers() -> None:
    """Raise ``ImportError`` when the installed Transformers is outside the supported range (patch()
    calls it: importing rdkv_hf checks nothing)."""
    low, high = Version(MIN_TRANSFORMERS), Version(MAX_TRANSFORMERS_EXCLUSIVE)
    if not low <= TRANSFORMERS_VERSION < high:
        raise ImportError(
            f"rdkv_hf supports transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; found {TRANSFORMERS_VERSION}. "
            f"Install a supported release: pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}'"
        )


def has_model_type(model_type: str) -> bool:
    """Whether the installed Transformers knows `model_type` (has its config class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def own_cache_classes(modules) -> list[str]:
    """Names of the cache classes the given modeling modules define themselves (a hybrid model's
    ``HybridMambaAttentionDynamicCache`` before Transformers 5): a model that builds one does not
    keep a list of attention layers, which RDKV's cache is."""
    return sorted({name for module in modules for name, obj in vars(module).items()
                   if isinstance(obj, type) and obj.__module__ == module.__name__ and name.endswith("Cache")})


def caches_mla_latent(attention_class) -> bool:
    """Whether a multi-head latent attention module (DeepSeek-V3's) hands its cache the latent
    ``(kv [B, 1, T, kv_lora_rank], k_rope [B, 1, T, qk_rope_head_dim])`` and expands keys and
    values after it (``expand_kv``, Transformers 5.x), rather than per-head keys and values (4.57)."""
    return hasattr(attention_class, "expand_kv")


def uses_attention_interface(attention_module) -> bool:
    """Whether an attention module's forward attends through Transformers' attention interface
    (``ALL_ATTENTION_FUNCTIONS``), the seam RDKV's attention takes; some 4.57 modules (Qwen2-MoE's)
    compute their attention themselves."""
    import inspect

    code = getattr(inspect.unwrap(type(attention_module).forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
