"""rdkv_hf: rate-distortion KV-cache compression for HuggingFace Transformers.

    model = rdkv_hf.patch(model, budget=2.5)   # average bits per cached K/V element
    out = model.generate(**inputs)

Importing this package patches nothing and loads nothing.
"""

from .cache import RDKVCache
from .config import RDKVConfig
from .patch import is_patched, patch, patched, unpatch

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier pieces load on first use, so `import rdkv_hf` stays cheap.
    if name == "RDKVProfile":
        from .profiles import RDKVProfile

        return RDKVProfile
    if name == "calibrate":
        from .calibrate import calibrate

        return calibrate
    if name == "from_pretrained":
        from .loading import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'rdkv_hf' has no attribute {name!r}")


__all__ = [
    "RDKVCache",
    "RDKVConfig",
    "RDKVProfile",
    "calibrate",
    "from_pretrained",
    "is_patched",
    "patch",
    "patched",
    "unpatch",
    "__version__",
]
