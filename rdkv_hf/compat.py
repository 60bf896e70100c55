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
