"""Uniform asymmetric min-max quantization and bit packing, in plain torch: the reference.

Codes of width ``b`` (1..8) are packed ``32 // b`` to an int32 word, little end first: element ``j``
of a row sits in word ``j // k`` at bits ``b * (j % k)``. Widths 1, 2, 4 and 8 waste no bit; 3, 5, 6
lose 2 bits a word and 7 loses 4. Scales and minima are stored in float16, rounded so that the
float16 grid still covers ``[min, max]``: the error stays within half a step.
"""

from __future__ import annotations

import math

import torch

META_DTYPE = torch.float16
META_BITS = 16  # per stored scale or minimum


def per_word(bits: int) -> int:
    """How many codes of `bits` bits fit in one int32 word."""
    if not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be in 1..8 to pack, got {bits}")
    return 32 // bits


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words that hold `n` codes of `bits` bits."""
    return math.ceil(n / per_word(bits))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes along the last dim.

    Args:
        codes: ``[..., n]`` integers in ``[0, 2**bits)``.
    Returns:
        ``[..., ceil(n / (32 // bits))]`` int32 words.
    """
    k = per_word(bits)
    n = codes.shape[-1]
    words = packed_words(n, bits)
    c = codes.to(torch.int32)
    if words * k != n:
        c = torch.nn.functional.pad(c, (0, words * k - n))
    c = c.reshape(*codes.shape[:-1], words, k)
    shifts = torch.arange(k, dtype=torch.int32, device=codes.device) * bits
    # Disjoint bit fields, so a sum is an OR; int32 wrap-around keeps the top field's bits intact.
    return (c << shifts).sum(-1, dtype=torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., words]`` int32 -> ``[..., n]`` uint8 codes."""
    k = per_word(bits)
    shifts = torch.arange(k, dtype=torch.int32, device=words.device) * bits
    c = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*words.shape[:-1], -1)[..., :n].to(torch.uint8)


def _round_down_half(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 value <= x (elementwise)."""
    h = x.to(META_DTYPE)
    too_big = h.float() > x
    return torch.where(too_big, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _round_up_half(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= x (elementwise)."""
    h = x.to(META_DTYPE)
    too_small = h.float() < x
    return torch.where(too_small, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def minmax(x: torch.Tensor, dim: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of min-max quantization along `dim`, over the elements where `mask` holds
    (all when ``None``): ``(minimum rounded down to float16, maximum float32)``, keeping `dim`."""
    xf = x.float()
    if mask is None:
        lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    else:
        big = torch.finfo(torch.float32).max
        lo = xf.masked_fill(~mask, big).amin(dim, keepdim=True)
        hi = xf.masked_fill(~mask, -big).amax(dim, keepdim=True)
    return _round_down_half(lo), hi


def step_size(lo: torch.Tensor, hi: torch.Tensor, levels) -> torch.Tensor:
    """float16 step covering ``[lo, hi]`` in `levels` steps (an int, or a tensor for a width per
    slice); 1 where the range is empty, since any positive step reproduces a constant slice (code 0)."""
    scale = _round_up_half((hi - lo.float()) / levels)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization with one (scale, min) per slice along `dim`.

    Args:
        x: float tensor.
        bits: 1..8.
        dim: the dimension reduced for the statistics (``-1``: per row, as for V tokens;
            ``0`` of ``[tokens, channels]``: per channel, as for K).
    Returns:
        ``(codes uint8 like x, scale float16, minimum float16)``; scale and minimum keep `dim`
        with size 1. ``x ~= codes * scale + minimum`` with error at most ``scale / 2``.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = minmax(xf, dim)
    scale = step_size(lo, hi, levels)
    codes = torch.round((xf - lo.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float() + minimum.float()).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantize then dequantize (for calibration and distortion measurements)."""
    if bits >= 16:
        return x
    if bits == 0:
        return torch.zeros_like(x)
    return dequantize(*quantize(x, bits, dim), dtype=x.dtype)
