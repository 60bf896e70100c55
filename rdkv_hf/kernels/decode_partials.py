"""Triton op: split-K decode-attention partials over the packed zones of a segment.

One program per (head, chunk of ``BLOCK_T`` kept tokens): K codes are unpacked in registers and
multiplied by the query scaled per channel (``q . (s*c + m) = (q*s) . c + q . m``), V codes by the
probabilities scaled per token; 16-bit groups are read as they are. Heads are ragged (their own
token counts and width groups, read from the segment's tables), GQA query rows of one KV head are
one ``[G, D]`` block. A second kernel merges the chunk partials of each head by log-sum-exp. K has
``D`` channels and V rows ``DV`` elements (DeepSeek's latent attention); with ``SOFTCAP`` the
logits are capped at ``softcap * tanh(x / softcap)`` (Gemma 2) before the softmax.

Every product over channels or tokens goes through :func:`rowdot`, in IEEE float32: Triton up to
3.6 rewrites ``tl.sum(a[:, :, None] * b[None, :, :], 1)`` into a TF32 ``tl.dot`` once ``a`` has 16
rows and ``b`` 16 columns (a GQA group of 4 heads times 4 new tokens), which put 1e-3 relative
errors into the logits (seen on an H200, Triton 3.6).

Reference: ``rdkv_hf.attention.head_partials_reference`` (the layout is in ``rdkv_hf/storage.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..storage import G_COLS_COUNT, H_COLS_COUNT
from . import check_decode_inputs, check_softcap, launch_context, partials_out


@triton.jit
def rowdot(a, b, DOT: tl.constexpr):
    """``a [M, K] @ b [K, N]`` in IEEE float32. ``DOT`` (M >= 16 and N >= 16, where Triton would
    rewrite the broadcast sum into a TF32 dot; the launchers keep K >= 16): an explicit IEEE dot;
    else the broadcast sum."""
    if DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


def dot_ok(rows: int, cols: int) -> bool:
    """``DOT`` of :func:`rowdot` for padded block sizes ``rows x cols``."""
    return rows >= 16 and cols >= 16


@triton.jit
def _decode_partials_kernel(
    q_ptr, heads_ptr, groups_ptr, words_ptr, meta_ptr, raw_ptr, perm_ptr,
    m_ptr, l_ptr, acc_ptr,
    G, D, DV, n_chunks, softcap, RQ,
    HC: tl.constexpr, GC: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_K: tl.constexpr, DOT_V: tl.constexpr,
):
    r = tl.program_id(0)
    chunk = tl.program_id(1)
    h = heads_ptr + r * HC
    n = tl.load(h + 0).to(tl.int32)
    v0 = tl.load(h + 1).to(tl.int32)
    v1 = tl.load(h + 2).to(tl.int32)
    k0 = tl.load(h + 3).to(tl.int32)
    k1 = tl.load(h + 4).to(tl.int32)
    perm_off = tl.load(h + 5).to(tl.int32)

    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_DV)
    ts = chunk * BLOCK_T + tl.arange(0, BLOCK_T)  # kept tokens of this program
    t_ok = ts < n
    q_row = q_ptr + (r % RQ) * G * D  # head rows r, r + RQ, ... of a stack share a query row

    logits = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
    bias = tl.zeros((BLOCK_G,), tl.float32)
    for gi in range(k0, k1):
        grp = groups_ptr + gi * GC
        bits = tl.load(grp + 0).to(tl.int32)
        count = tl.load(grp + 1).to(tl.int32)
        length = tl.load(grp + 2).to(tl.int32)
        row_words = tl.load(grp + 3).to(tl.int32)
        data = tl.load(grp + 4)
        meta = tl.load(grp + 5)
        start = tl.load(grp + 6).to(tl.int32)
        for c0 in range(0, count, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < count
            if perm_off >= 0:
                ch = tl.load(perm_ptr + perm_off + start + cs, mask=c_ok, other=0).to(tl.int32)
            else:
                ch = start + cs
            qg = tl.load(q_row + gs[:, None] * D + ch[None, :], mask=(gs[:, None] < G) & c_ok[None, :], other=0.0)
            ok = c_ok[:, None] & t_ok[None, :]
            if bits == 16:
                kv = tl.load(raw_ptr + data + cs[:, None] * length + ts[None, :], mask=ok, other=0.0).to(tl.float32)
                logits += rowdot(qg, kv, DOT_K)
            else:
                k = 32 // bits
                word = tl.load(words_ptr + data + cs[:, None] * row_words + ts[None, :] // k, mask=ok, other=0)
                code = ((word >> ((ts[None, :] % k) * bits)) & ((1 << bits) - 1)).to(tl.float32)
                sc = tl.load(meta_ptr + meta + cs, mask=c_ok, other=0.0).to(tl.float32)
                mn = tl.load(meta_ptr + meta + count + cs, mask=c_ok, other=0.0).to(tl.float32)
                bias += tl.sum(qg * mn[None, :], axis=1)
                logits += rowdot(qg * sc[None, :], code, DOT_K)

    logits = logits + bias[:, None]
    if SOFTCAP:  # tanh(x) = 2 sigmoid(2x) - 1
        logits = softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)
    logits = tl.where(t_ok[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    p = tl.exp(logits - m_safe[:, None])  # exp(-inf) = 0 for tokens past n
    l = tl.sum(p, axis=1)

    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    for gi in range(v0, v1):
        grp = groups_ptr + gi * GC
        bits = tl.load(grp + 0).to(tl.int32)
        count = tl.load(grp + 1).to(tl.int32)
        row_words = tl.load(grp + 3).to(tl.int32)
        data = tl.load(grp + 4)
        meta = tl.load(grp + 5)
        start = tl.load(grp + 6).to(tl.int32)
        in_grp = t_ok & (ts >= start) & (ts < start + count)
        rows = tl.where(in_grp, ts - start, 0)
        ok = in_grp[:, None] & (ds[None, :] < DV)
        pg = tl.where(in_grp[None, :], p, 0.0)
        if bits == 16:
            val = tl.load(raw_ptr + data + rows[:, None] * DV + ds[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += rowdot(pg, val, DOT_V)
        else:
            k = 32 // bits
            word = tl.load(words_ptr + data + rows[:, None] * row_words + ds[None, :] // k, mask=ok, other=0)
            code = ((word >> ((ds[None, :] % k) * bits)) & ((1 << bits) - 1)).to(tl.float32)
            sc = tl.load(meta_ptr + meta + rows, mask=in_grp, other=0.0).to(tl.float32)
            mn = tl.load(meta_ptr + meta + count + rows, mask=in_grp, other=0.0).to(tl.float32)
            acc += rowdot(pg * sc[None, :], code, DOT_V)
            acc += tl.sum(pg * mn[None, :], axis=1)[:, None]

    out = r * n_chunks + chunk
    g_ok = gs < G
    tl.store(m_ptr + out * G + gs, m, mask=g_ok)
    tl.store(l_ptr + out * G + gs, l, mask=g_ok)
    tl.store(acc_ptr + (out * G + gs[:, None]) * DV + ds[None, :], acc, mask=g_ok[:, None] & (ds[None, :] < DV))


@triton.jit
def _merge_chunks_kernel(
    cm_ptr, cl_ptr, cacc_ptr, m_ptr, l_ptr, acc_ptr,
    R, n_chunks, members, G, DV,
    BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per output row ``r``: the chunks of head rows ``r, r + R, ...`` (a stack's
    members; one row when ``members == 1``) merged by log-sum-exp, in two passes (max, then sums)."""
    r = tl.program_id(0)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_DV)
    g_ok = gs < G
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    for j in range(members):
        for c in range(n_chunks):
            at = ((j * R + r) * n_chunks + c) * G
            m = tl.maximum(m, tl.load(cm_ptr + at + gs, mask=g_ok, other=float("-inf")))
    m_safe = tl.where(m > float("-inf"), m, 0.0)  # a row without tokens: every factor below is 0
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)
    ok = g_ok[:, None] & (ds[None, :] < DV)
    for j in range(members):
        for c in range(n_chunks):
            at = ((j * R + r) * n_chunks + c) * G
            f = tl.exp(tl.load(cm_ptr + at + gs, mask=g_ok, other=float("-inf")) - m_safe)
            l += f * tl.load(cl_ptr + at + gs, mask=g_ok, other=0.0)
            acc += f[:, None] * tl.load(cacc_ptr + (at + gs[:, None]) * DV + ds[None, :], mask=ok, other=0.0)
    tl.store(m_ptr + r * G + gs, m, mask=g_ok)
    tl.store(l_ptr + r * G + gs, l, mask=g_ok)
    tl.store(acc_ptr + (r * G + gs[:, None]) * DV + ds[None, :], acc, mask=ok)


def merge_chunks(cm: torch.Tensor, cl: torch.Tensor, cacc: torch.Tensor, out=None, members: int = 1):
    """:func:`rdkv_hf.kernels.merge_chunk_partials` in one launch (the torch reference takes about
    eight): ``cm, cl [rows, C, G]`` and ``cacc [rows, C, G, Dv]`` contiguous float32, ``rows =
    members * R`` -> ``(max [R, G], sum [R, G], acc [R, G, Dv])``, written into `out` (contiguous
    float32) when given."""
    rows, n_chunks, G = cm.shape
    Dv = cacc.shape[-1]
    R = rows // members
    out = partials_out(out, R, G, Dv, cm.device)
    if R:
        with launch_context(cm):
            _merge_chunks_kernel[(R,)](cm, cl, cacc, *out, R, n_chunks, members, G, Dv,
                                       BLOCK_G=triton.next_power_of_2(G), BLOCK_DV=triton.next_power_of_2(Dv))
    return out


def segment_partials(buffers, q: torch.Tensor, block_t: int = 64, out=None, softcap: float | None = None, members: int = 1):
    """Split-K partials of ``q [R, G, D]`` (float32, already scaled) over every head of a segment.

    Args:
        buffers: a :class:`~rdkv_hf.storage.SegmentBuffers` with ``members * R`` head rows, on q's
            device (K of ``D`` channels, V of ``Dv = buffers.v_dim`` elements).
        q: ``[R, G, D]`` contiguous float32 on CUDA (or the CPU under ``TRITON_INTERPRET=1``).
        block_t: kept tokens per program (a power of two).
        out: optional ``(m [R, G], l [R, G], acc [R, G, Dv])`` float32 tensors to write.
        softcap: caps each logit at ``softcap * tanh(logit / softcap)`` (None: no cap).
        members: ``> 1`` for a stack of that many segments (:mod:`rdkv_hf.stacked`): head rows
            ``r, r + R, ...`` read query row ``r`` and are merged into output row ``r``.
    Returns:
        ``(max [R, G], sum [R, G], acc [R, G, Dv])`` as ``head_partials_reference``.
    """
    R, G, D = _check(buffers, q, block_t, members)
    rows = buffers.heads.shape[0]
    Dv = buffers.v_dim
    cap = check_softcap(softcap)
    n_max = buffers.max_tokens if rows else 0
    n_chunks = max(1, triton.cdiv(n_max, block_t))
    cm = torch.empty(rows, n_chunks, G, dtype=torch.float32, device=q.device)
    cl = torch.empty_like(cm)
    cacc = torch.empty(rows, n_chunks, G, Dv, dtype=torch.float32, device=q.device)
    BLOCK_G, BLOCK_DV = triton.next_power_of_2(G), triton.next_power_of_2(Dv)
    if rows:
        with launch_context(q):
            _decode_partials_kernel[(rows, n_chunks)](
                q, buffers.heads, buffers.groups, buffers.words, buffers.meta, buffers.raw, buffers.perm,
                cm, cl, cacc, G, D, Dv, n_chunks, cap, R,
                HC=H_COLS_COUNT, GC=G_COLS_COUNT, SOFTCAP=cap > 0, BLOCK_G=BLOCK_G,
                BLOCK_DV=BLOCK_DV, BLOCK_T=block_t, BLOCK_C=16,
                DOT_K=dot_ok(BLOCK_G, block_t), DOT_V=dot_ok(BLOCK_G, BLOCK_DV),
            )
    return merge_chunks(cm, cl, cacc, out, members)  # chunks without tokens have m = -inf


def _check(buffers, q: torch.Tensor, block_t: int, members: int) -> tuple[int, int, int]:
    tensors = {name: getattr(buffers, name) for name in ("heads", "groups", "words", "meta", "raw", "perm")}
    return check_decode_inputs(q, block_t, buffers.heads.shape[0], buffers.head_dim, tensors, "segment buffer", members)


def available() -> bool:
    """Triton decode needs a CUDA device (the CPU interpreter is for tests only)."""
    return torch.cuda.is_available()
