"""Where the GPU suite runs and what it may use.

``RDKV_GPU_TESTS_DEVICE`` chooses the device:

* unset: CUDA when ``torch.cuda.is_available()``, else every test here is skipped (``make test``);
* ``cuda``: CUDA is required (``run.sh`` sets it, so a machine without a GPU errors instead of
  skipping everything);
* ``cpu``: a dry run of the same tests on the CPU, to check the test code without a GPU. Triton then
  runs under its interpreter, which must be chosen before Python imports it: set
  ``TRITON_INTERPRET=1`` for the whole pytest process. Shapes too big for the interpreter (about
  1000x slower) are skipped with a reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ENV = "RDKV_GPU_TESTS_DEVICE"
HERE = Path(__file__).resolve().parent

_mode = os.environ.get(ENV, "").strip().lower()
if _mode not in ("", "cuda", "cpu"):
    raise pytest.UsageError(f"{ENV} must be 'cuda', 'cpu' (a dry run) or unset, got {_mode!r}")
if _mode == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError(
        f"{ENV}=cuda but torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda}); run on the GPU machine, or set {ENV}=cpu TRITON_INTERPRET=1 for a dry run"
    )

DRY_RUN = _mode == "cpu"
if DRY_RUN:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())
else:
    DEVICE = None
NO_DEVICE_REASON = (
    "no CUDA device (torch.cuda.is_available() is False); "
    f"`{ENV}=cpu TRITON_INTERPRET=1 python -m pytest tests/gpu` dry-runs these tests on the CPU"
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE is None:
    TRITON_SKIP = NO_DEVICE_REASON  # the reason a reader needs first
elif not HAS_TRITON:
    TRITON_SKIP = "triton is not installed"
elif DRY_RUN and not INTERPRETED:
    TRITON_SKIP = "CPU dry run without TRITON_INTERPRET=1 (set it for the whole pytest process)"
else:
    TRITON_SKIP = None
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
# The decode path the model-level tests take: the GPU's (Triton) whenever it can run here.
BACKEND = "triton" if TRITON_SKIP is None else "torch"


def _suite_conftest():
    """tests/conftest.py (tiny models, the tolerance table): the module pytest loaded, else by path."""
    path = HERE.parent / "conftest.py"
    mod = sys.modules.get("conftest")
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == path:
        return mod
    spec = importlib.util.spec_from_file_location("rdkv_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_suite = _suite_conftest()
TOL = _suite.TOL  # the suite's one tolerance table
tiny_model = _suite.tiny_model


def pytest_collection_modifyitems(config, items):
    if DEVICE is not None:
        return
    skip = pytest.mark.skip(reason=NO_DEVICE_REASON)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def pytest_report_header(config):
    if DEVICE is None:
        return f"rdkv gpu suite: skipped ({NO_DEVICE_REASON})"
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU dry run"
    triton = "absent"
    if HAS_TRITON:
        import triton as _triton

        triton = _triton.__version__ + (" (interpreter)" if INTERPRETED else "")
    return f"rdkv gpu suite: {DEVICE} ({name}), decode backend {BACKEND!r}, triton {triton}"


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """The comparisons assume IEEE float32 matmuls: no TF32, whatever a previous test set."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def segment_tensors(seg):
    """``(name, tensor)`` of everything a segment stores: its flat buffers and every head's views."""
    import dataclasses

    out = [(f"buffers.{f.name}", getattr(seg.buffers, f.name)) for f in dataclasses.fields(seg.buffers)]
    for r, head in enumerate(seg.heads):
        for kind, groups in (("v", head.v_groups), ("k", head.k_groups)):
            for i, g in enumerate(groups):
                out += [(f"heads[{r}].{kind}_groups[{i}].{n}", getattr(g, n)) for n in ("data", "scale", "minimum")]
        out.append((f"heads[{r}].k_perm", head.k_perm))
    return [(n, t) for n, t in out if isinstance(t, torch.Tensor)]


def assert_cache_on(cache, devices):
    """Every packed tensor and the tail of RDKV layer ``i`` are on ``devices[i]`` (a dict or a
    single device for all); returns the number of segments checked (so a caller can require some)."""
    n = 0
    for i in cache.rdkv_layers:
        dev = devices[i] if isinstance(devices, dict) else devices
        layer = cache.layers[i]
        wrong = [name for seg in layer.segments for name, t in segment_tensors(seg) if t.device != dev]
        wrong += [name for name in ("keys", "values") if getattr(layer, name).device != dev]
        assert not wrong, f"layer {i}: not on {dev}: {wrong[:8]}"
        n += len(layer.segments)
    return n
