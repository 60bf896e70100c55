"""Decode and packing kernels. Nothing here is imported by ``import rdkv_hf``.

* ``cpu_decode``: C++ decode partials over a packed segment (the fast CPU path).
* ``quantize_pack``: Triton quantize + pack of rows (reference: ``rdkv_hf.quant``).
* ``decode_partials``: Triton decode partials over a packed segment (reference:
  ``rdkv_hf.attention.head_partials_reference``).

The Triton modules import ``triton`` at their top: import them only when :func:`triton_available`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def launch_context(t: torch.Tensor):
    """Run a Triton launch on `t`'s GPU (a layer of a model split across GPUs need not be on the
    current device); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_device_ok(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def check_softcap(softcap) -> float:
    """The cap as the kernels take it (0.0: none); raises for anything but None or a positive number."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"`softcap` must be None or a positive number, got {softcap!r}")
    return float(softcap)
