"""Decode and packing kernels. Nothing here is imported by ``import rdkv_hf``.

* ``cpu_decode``: C++ decode partials over a packed segment (the fast CPU path).
* ``quantize_pack``: Triton quantize + pack of rows (reference: ``rdkv_hf.quant``).
* ``decode_partials``: Triton decode partials over a packed segment (reference:
  ``rdkv_hf.attention.head_partials_reference``).
* ``paged_decode``: Triton decode partials over a paged segment, the serving-engine layout
  prototype (reference: ``rdkv_hf.paged.paged_partials_reference``).

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


def merge_chunk_partials(cm: torch.Tensor, cl: torch.Tensor, cacc: torch.Tensor, out=None, members: int = 1):
    """Merge split-K partials of chunks by log-sum-exp: ``cm, cl [R, C, G]``, ``cacc [R, C, G, D]``
    -> ``(max [R, G], sum [R, G], acc [R, G, D])``, written into `out` when given. Chunks without
    tokens (``max = -inf``) count for nothing. ``members > 1``: the rows are a stack's, member-major
    (``members * R`` rows, :mod:`rdkv_hf.stacked`), and member j's chunks of row r are more chunks of
    row r."""
    if members > 1:
        R = cm.shape[0] // members
        fold = lambda t: t.reshape(members, R, *t.shape[1:]).transpose(0, 1).flatten(1, 2)  # noqa: E731
        cm, cl, cacc = fold(cm), fold(cl), fold(cacc)
    M = cm.amax(1)
    f = torch.exp(cm - M.nan_to_num(neginf=0.0)[:, None])  # a row without tokens: max 0, every f 0
    l, acc = (cl * f).sum(1), (cacc * f[..., None]).sum(1)
    if out is None:
        return M, l, acc
    for o, t in zip(out, (M, l, acc)):
        o.copy_(t)
    return tuple(out)


def partials_out(out, R: int, G: int, Dv: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(max [R, G], sum [R, G], acc [R, G, Dv])`` tensors a kernel writes its partials into:
    `out` when given, checked (contiguous float32 on `device`, those shapes), else new ones."""
    if out is None:
        return tuple(torch.empty(*shape, dtype=torch.float32, device=device) for shape in ((R, G), (R, G), (R, G, Dv)))
    device = torch.device(device)
    for name, t, shape in zip(("max", "sum", "acc"), out, ((R, G), (R, G), (R, G, Dv))):
        if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
            raise ValueError(f"`out`'s {name} must be a contiguous float32 {list(shape)} tensor on {device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    return tuple(out)


def check_decode_inputs(q, block_t: int, rows: int, head_dim: int, tensors: dict, what: str,
                        members: int = 1) -> tuple[int, int, int]:
    """Validate a decode launch: ``q [R, G, D]`` contiguous float32 on a Triton device, with
    ``rows = members * R`` head rows of `head_dim` (``members > 1``: a stack of segments); `block_t`
    a power of two >= 16; every tensor of `tensors` (``{name: tensor}`` of `what`, the storage)
    contiguous on q's device. Returns ``(R, G, D)``."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"`q` must be a [R, G, D] tensor, got {getattr(q, 'shape', type(q))}")
    R, G, D = q.shape
    if q.dtype != torch.float32 or not q.is_contiguous():
        raise ValueError(f"`q` must be contiguous float32, got {q.dtype}, contiguous={q.is_contiguous()}")
    if not triton_device_ok(q):
        raise ValueError(f"`q` must be on a CUDA device (or the CPU with TRITON_INTERPRET=1), got {q.device}")
    if rows != members * R or head_dim != D:
        raise ValueError(f"`q` is [{R}, {G}, {D}] but the {what} has {rows} heads of dim {head_dim}"
                         + (f" ({members} members of {R} expected)" if members > 1 else ""))
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"`block_t` must be a power of two >= 16, got {block_t}")
    for name, t in tensors.items():
        if t.device != q.device or not t.is_contiguous():
            raise ValueError(f"{what} `{name}` must be contiguous on {q.device}, got {t.device}")
    return R, G, D


def check_softcap(softcap) -> float:
    """The cap as the kernels take it (0.0: none); raises for anything but None or a positive number."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"`softcap` must be None or a positive number, got {softcap!r}")
    return float(softcap)
