"""Triton op: asymmetric min-max quantization + bit packing of rows, one program per row.

Reference: ``rdkv_hf.quant.quantize`` then ``rdkv_hf.quant.pack``; the words, scales and minima
are bit-identical to it (float16 minimum rounded down and scale rounded up as quant.py does,
IEEE division, round half to even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from . import launch_context, triton_device_ok


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _next_half(h, up: tl.constexpr):
    """The float16 neighbour of `h` towards +inf (up) or -inf, through its bits."""
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    pos = h > 0
    neg = h < 0
    if up:
        bits = tl.where(pos, bits + 1, tl.where(neg, bits - 1, 1))
    else:
        bits = tl.where(pos, bits - 1, tl.where(neg, bits + 1, -32767))  # 0 -> -2**-24 (0x8001)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _quantize_pack_kernel(
    x_ptr, stride_row, stride_col, length,
    words_ptr, row_words, scale_ptr, min_ptr,
    BITS: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_row
    levels: tl.constexpr = (1 << BITS) - 1

    lo = tl.full((BLOCK_L,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_L,), float("-inf"), tl.float32)
    for c0 in range(0, length, BLOCK_L):
        offs = c0 + tl.arange(0, BLOCK_L)
        x = tl.load(x_row + offs * stride_col, mask=offs < length, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(offs < length, x, float("inf")))
        hi = tl.maximum(hi, tl.where(offs < length, x, float("-inf")))
    lo_f = tl.min(lo, 0)
    hi_f = tl.max(hi, 0)

    # float16 minimum rounded down, scale rounded up (quant._round_down_half / _round_up_half)
    lo_h = lo_f.to(tl.float16)
    lo_h = tl.where(lo_h.to(tl.float32) > lo_f, _next_half(lo_h, False), lo_h)
    lo32 = lo_h.to(tl.float32)
    s32 = tl.math.div_rn(hi_f - lo32, levels * 1.0)
    s_h = s32.to(tl.float16)
    s_h = tl.where(s_h.to(tl.float32) < s32, _next_half(s_h, True), s_h)
    s_h = tl.where(s_h > 0, s_h, 1.0)
    sc32 = s_h.to(tl.float32)
    tl.store(scale_ptr + row, s_h)
    tl.store(min_ptr + row, lo_h)

    i = tl.arange(0, K_PAD)
    for w0 in range(0, row_words, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        j = w[:, None] * K + i[None, :]  # [BLOCK_W, K_PAD] element of each code
        ok = (i[None, :] < K) & (j < length) & (w[:, None] < row_words)
        x = tl.load(x_row + j * stride_col, mask=ok, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x - lo32, sc32)
        f = tl.floor(y)
        half_up = (y - f > 0.5) | ((y - f == 0.5) & (f.to(tl.int32) % 2 == 1))  # round half to even
        code = tl.minimum(tl.maximum(f + half_up.to(tl.float32), 0.0), levels * 1.0).to(tl.int32)
        code = tl.where(ok, code, 0) << (i[None, :] * BITS)
        word = tl.reduce(code, 1, _or)
        tl.store(words_ptr + row * row_words + w, word, mask=w < row_words)


def quantize_pack(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x [T, D]`` per token (``dim=-1``, V) or per channel (``dim=0``, K).

    Args:
        x: ``[T, D]`` contiguous float32/float16/bfloat16 on CUDA (or the CPU under
            ``TRITON_INTERPRET=1``).
        bits: 1..8.
        dim: the dimension each (scale, minimum) reduces: -1 (rows are tokens) or 0 (rows are channels).
    Returns:
        ``(words int32 [rows, ceil(len / (32 // bits))], scale float16 [rows], minimum float16 [rows])``
        with rows = T, len = D for ``dim=-1`` and rows = D, len = T for ``dim=0``; equal to
        ``quant.pack(codes, bits)`` (of the codes transposed for ``dim=0``) and quant's scale/minimum.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"`x` must be a [T, D] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"`x` must be float32, float16 or bfloat16, got {x.dtype}")
    if not triton_device_ok(x):
        raise ValueError(f"`x` must be on a CUDA device (or the CPU with TRITON_INTERPRET=1), got {x.device}")
    if not x.is_contiguous():
        raise ValueError("`x` must be contiguous; call .contiguous() first")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be an int in 1..8, got {bits!r}")
    if dim not in (-1, 1, 0):
        raise ValueError(f"`dim` must be -1 (per token) or 0 (per channel), got {dim}")
    T, D = x.shape
    rows, length = (T, D) if dim in (-1, 1) else (D, T)
    stride_row, stride_col = (x.stride(0), 1) if dim in (-1, 1) else (1, x.stride(0))
    k = quant.per_word(bits)
    row_words = quant.packed_words(length, bits) if length else 0
    words = torch.empty(rows, row_words, dtype=torch.int32, device=x.device)
    scale = torch.empty(rows, dtype=torch.float16, device=x.device)
    minimum = torch.empty(rows, dtype=torch.float16, device=x.device)
    if rows == 0 or length == 0:
        return words, scale.fill_(1.0), minimum.zero_()
    block_l = min(1024, triton.next_power_of_2(length))
    block_w = min(128, triton.next_power_of_2(row_words))
    with launch_context(x):
        _quantize_pack_kernel[(rows,)](
            x, stride_row, stride_col, length, words, row_words, scale, minimum,
            BITS=bits, K=k, K_PAD=triton.next_power_of_2(k), BLOCK_L=block_l, BLOCK_W=block_w,
        )
    return words, scale, minimum
