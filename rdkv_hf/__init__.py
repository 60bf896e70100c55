"""rdkv_hf: rate-distortion KV-cache compression for HuggingFace Transformers.

    model = rdkv_hf.patch(model, budget=2.5)   # average bits per cached K/V element
    out = model.generate(**inputs)

Importing this package patches nothing and loads nothing (Triton is imported only when used).
"""

from .cache import RDKVCache
from .calibration import calibrate
from .config import RDKVConfig
from .loading import from_pretrained
from .model_patches import supported_architectures
from .parallel import gather_summaries
from .patching import is_patched, patch, patched, unpatch
from .profile import RDKVProfile
from .version import __version__

__all__ = [
    "RDKVCache",
    "RDKVConfig",
    "RDKVProfile",
    "calibrate",
    "from_pretrained",
    "gather_summaries",
    "is_patched",
    "patch",
    "patched",
    "supported_architectures",
    "unpatch",
    "__version__",
]
