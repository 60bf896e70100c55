"""What differs between the Transformers releases rdkv_hf supports: one place for it.

* The cache argument: Transformers 5.24 renamed ``past_key_values`` to ``cache`` in the models'
  forward, in ``generate()`` and in the outputs (the old name is a deprecated alias until 5.40 / 6.0).
  :data:`CACHE_ARG` is the name the installed release takes, :func:`cache_kwargs` builds the keyword,
  :func:`given_cache` reads a cache given under either name and :func:`output_cache` reads it back
  from an output.
* :func:`check_transformers` refuses a release outside the tested range with the fix in the message.

Nothing else in the package spells either name of the cache argument.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

# The range pyproject.toml declares and CI tests at both ends (.ci/run).
MIN_TRANSFORMERS = "5.0.0"
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


def check_transformers() -> None:
    """Raise ``ImportError`` when the installed Transformers is outside the supported range."""
    low, high = Version(MIN_TRANSFORMERS), Version(MAX_TRANSFORMERS_EXCLUSIVE)
    if not low <= TRANSFORMERS_VERSION < high:
        raise ImportError(
            f"rdkv_hf supports transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; found {transformers.__version__}. "
            f"Install a supported release: pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}'"
        )
