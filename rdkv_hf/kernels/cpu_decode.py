"""Fast CPU decode partials over a packed segment: a small C++ library built with the system g++.

The kernel (``cpu_decode.cpp``) walks the segment's flat buffers (``rdkv_hf/storage.py``) with no
Python per head: K scales are folded into the query and V scales into the probabilities, codes are
unpacked in registers one tile of words at a time, and the tokens of each head are split into
chunks (split-K tasks) whose partials are merged by log-sum-exp. The calling thread works through
the tasks with helper threads that join only if they wake up in time, so a busy machine costs
parallelism rather than stalls at a barrier (OpenMP's end-of-region barrier waits for every
thread: on a shared 2-core machine that made 2 threads 3-4x slower than 1).

Dtypes: the queries are float32 (``attention.attend`` converts a bf16 or float16 model's queries
once per step, ``[B, kv_heads, group * q, head_dim]`` values, before calling any backend); the
16-bit zone is read in the dtype it was stored in (float32, float16 or bfloat16, converted to float32
in registers); codes, float16 scales and minima as packed; the partials come back in float32.

The library has no Python or torch headers, so it builds in about 5 s of CPU
(``g++ -O3 -march=native -pthread``) and is cached under ``$RDKV_HF_CACHE/kernels`` (default
``~/.cache/rdkv_hf/kernels``), keyed by the source, the flags and the CPU.
Reference: ``attention.head_partials_reference``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from . import check_softcap, partials_out

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]
DEFAULT_CHUNK = 960  # tokens per task: logits of a task stay in L1, enough tasks to balance threads

_lib = None
_error: str | None = None


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _cache_dir() -> Path:
    root = os.environ.get("RDKV_HF_CACHE") or Path.home() / ".cache" / "rdkv_hf"
    return Path(root) / "kernels"


def _build(source: str, out: Path, compiler: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "cpu_decode.cpp"
        src.write_text(source)
        so = Path(tmp) / out.name
        proc = subprocess.run([compiler, *FLAGS, str(src), "-o", str(so)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed:\n{proc.stderr[-2000:]}")
        os.replace(so, out)  # atomic: a concurrent build of the same key writes the same file


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None if it cannot be built here."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    try:
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            raise RuntimeError("no C++ compiler (g++) on PATH")
        source = SOURCE.read_text()
        key = hashlib.sha256("\0".join([source, compiler, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"cpu_decode-{key}.so"
        if not path.exists():  # once per machine and source: about 10 s on a 2-core VM
            logger.warning("building the C++ decode kernel for this CPU (once; about 10 s) into %s", path)
            start = time.perf_counter()
            _build(source, path, compiler)
            logger.info("C++ decode kernel built in %.1f s", time.perf_counter() - start)
        lib = ctypes.CDLL(str(path))
        fn = lib.rdkv_segment_partials
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, i32, p, i32, ctypes.c_float, i64, i32, p, p, p]
        fn.restype = i32
        _lib = lib
    except Exception as err:  # noqa: BLE001 (any failure means: use another backend)
        _error = f"{type(err).__name__}: {err}"
        logger.warning("the C++ decode kernel is unavailable (%s); decoding on the CPU takes the torch "
                       "path, the same attention about 3x slower at 32K tokens (install g++ to build it)", _error)
    return _lib


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _error


_RAW_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PERM_KIND = {torch.uint8: 0, torch.int16: 1}


def segment_partials(buffers, q: torch.Tensor, chunk: int = DEFAULT_CHUNK, threads: int | None = None, out=None,
                     softcap: float | None = None, members: int = 1):
    """Split-K partials of ``q [R, G, D]`` (float32, already scaled) over every head of a segment.

    Args:
        buffers: a :class:`~rdkv_hf.storage.SegmentBuffers` with ``members * R`` head rows (K of
            ``D`` channels, V of ``Dv = buffers.v_dim`` elements).
        q: ``[R, G, D]`` float32 queries, row ``r`` attending head rows ``r (mod R)``.
        chunk: tokens per task (a multiple of 480).
        threads: threads, the caller's included (default ``torch.get_num_threads()``).
        out: optional ``(m [R, G], l [R, G], acc [R, G, Dv])`` contiguous float32 tensors to write.
        softcap: caps each logit at ``softcap * tanh(logit / softcap)`` (None: no cap).
        members: ``> 1`` for a stack of that many segments (:mod:`rdkv_hf.stacked`): head rows
            ``r, r + R, ...`` are merged into output row ``r``.
    Returns:
        ``(max [R, G], sum [R, G], acc [R, G, Dv])`` float32, as ``head_partials_reference``.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"the RDKV CPU decode kernel is unavailable: {_error}")
    R, G, D = _check(buffers, q, chunk, members)
    rows = buffers.heads.shape[0]
    Dv = buffers.v_dim
    cap = check_softcap(softcap)
    m, l, acc = partials_out(out, R, G, Dv, "cpu")
    rc = lib.rdkv_segment_partials(
        q.data_ptr(), rows, R, G, D, Dv, buffers.heads.data_ptr(), buffers.groups.data_ptr(), buffers.words.data_ptr(),
        buffers.meta.data_ptr(), buffers.raw.data_ptr(), _RAW_KIND[buffers.raw.dtype], buffers.perm.data_ptr(),
        _PERM_KIND[buffers.perm.dtype], cap, chunk, threads or torch.get_num_threads(), m.data_ptr(), l.data_ptr(), acc.data_ptr(),
    )
    if rc:
        raise RuntimeError(f"rdkv_segment_partials failed with code {rc}")
    return m, l, acc


def _check(buffers, q: torch.Tensor, chunk: int, members: int = 1) -> tuple[int, int, int]:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"`q` must be a [R, G, D] tensor, got {getattr(q, 'shape', type(q))}")
    R, G, D = q.shape
    if q.dtype != torch.float32 or q.device.type != "cpu" or not q.is_contiguous():
        raise ValueError(f"`q` must be contiguous float32 on the CPU, got {q.dtype} on {q.device}, contiguous={q.is_contiguous()}")
    rows = buffers.heads.shape[0]
    if rows != members * R or buffers.head_dim != D:
        raise ValueError(f"`q` is [{R}, {G}, {D}] but the segment has {rows} heads of dim {buffers.head_dim}"
                         + (f" ({members} members of {R} expected)" if members > 1 else ""))
    if not isinstance(chunk, int) or chunk <= 0 or chunk % 480:
        raise ValueError(f"`chunk` must be a positive multiple of 480 tokens, got {chunk!r}")
    for name, t, dtype in (("heads", buffers.heads, torch.int64), ("groups", buffers.groups, torch.int64),
                           ("words", buffers.words, torch.int32), ("meta", buffers.meta, torch.float16)):
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"segment buffer `{name}` must be contiguous {dtype} on the CPU, got {t.dtype} on {t.device}")
    if buffers.raw.dtype not in _RAW_KIND or buffers.perm.dtype not in _PERM_KIND:
        raise ValueError(f"unsupported raw/perm dtypes {buffers.raw.dtype}/{buffers.perm.dtype}")
    if not (buffers.raw.is_contiguous() and buffers.perm.is_contiguous()):
        raise ValueError("segment buffers `raw` and `perm` must be contiguous")
    return R, G, D
