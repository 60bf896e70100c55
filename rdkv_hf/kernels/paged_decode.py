"""Triton op: split-K decode-attention partials over a paged segment (packed tokens of mixed widths
in fixed-size pages, block tables per head row; the layout is in ``rdkv_hf/paged.py``).

One program per (head row, page): it reads the page's header, walks its runs of equal-width token
records ``BLOCK_T`` at a time (K codes unpacked in registers against the query scaled per channel,
``q . (s*c + m) = (q*s) . c + q . m``; V codes dequantized per token) with an online softmax, and
writes the page's ``(max, sum, acc)``. A second kernel merges the pages of each head by log-sum-exp, as
a paged-attention "v2" reduction does. 16-bit values and float16 metadata are read through 16-bit
views of the same page pool.

Reference: ``rdkv_hf.paged.paged_partials_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..paged import HEADER_WORDS
from . import check_decode_inputs, launch_context
from .decode_partials import dot_ok, merge_chunks, rowdot


@triton.jit
def _paged_partials_kernel(
    q_ptr, pages_ptr, half_ptr, raw_ptr, kmeta_ptr, perm_ptr, rows_ptr, kgroups_ptr, table_ptr,
    m_ptr, l_ptr, acc_ptr,
    G, D, max_pages, page_words,
    RC: tl.constexpr, KC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_K: tl.constexpr, DOT_V: tl.constexpr,
):
    r = tl.program_id(0)
    p = tl.program_id(1)
    row = rows_ptr + r * RC
    n_pages = tl.load(row + 0).to(tl.int32)
    k0 = tl.load(row + 1).to(tl.int32)
    k1 = tl.load(row + 2).to(tl.int32)
    perm_off = tl.load(row + 3).to(tl.int32)
    kw = tl.load(row + 4).to(tl.int32)
    has_page = p < n_pages
    page = tl.maximum(tl.load(table_ptr + r * max_pages + p), 0).to(tl.int64)
    base = page * page_words
    n_runs = tl.load(pages_ptr + base, mask=has_page, other=0)

    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    g_ok = gs < G
    d_ok = ds < D
    q_row = q_ptr + r * G * D
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for run in range(0, n_runs):
        hdr = pages_ptr + base + 1 + 3 * run
        vb = tl.load(hdr + 0)
        count = tl.load(hdr + 1)
        off = tl.load(hdr + 2)
        v_per = 32 // vb  # codes a word (2 raw values at 16 bits)
        vw = (D + v_per - 1) // v_per
        rec = kw + vw + (vb < 16).to(tl.int32)
        for t0 in range(0, count, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            t_ok = ts < count
            rec_base = base + off + ts * rec  # [BLOCK_T] first word of each record
            logits = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
            bias = tl.zeros((BLOCK_G,), tl.float32)
            for gi in range(k0, k1):
                grp = kgroups_ptr + gi * KC
                bits = tl.load(grp + 0).to(tl.int32)
                cnt = tl.load(grp + 1).to(tl.int32)
                start = tl.load(grp + 2).to(tl.int32)
                word = tl.load(grp + 3).to(tl.int32)
                meta = tl.load(grp + 4)
                for c0 in range(0, cnt, BLOCK_C):
                    cs = c0 + tl.arange(0, BLOCK_C)
                    c_ok = cs < cnt
                    if perm_off >= 0:
                        ch = tl.load(perm_ptr + perm_off + start + cs, mask=c_ok, other=0).to(tl.int32)
                    else:
                        ch = start + cs
                    qg = tl.load(q_row + gs[:, None] * D + ch[None, :], mask=g_ok[:, None] & c_ok[None, :], other=0.0)
                    ok = c_ok[:, None] & t_ok[None, :]
                    if bits == 16:
                        kv = tl.load(raw_ptr + 2 * (rec_base[None, :] + word) + cs[:, None], mask=ok, other=0.0).to(tl.float32)
                        logits += rowdot(qg, kv, DOT_K)
                    else:
                        per = 32 // bits
                        w = tl.load(pages_ptr + rec_base[None, :] + word + cs[:, None] // per, mask=ok, other=0)
                        code = ((w >> ((cs[:, None] % per) * bits)) & ((1 << bits) - 1)).to(tl.float32)
                        sc = tl.load(kmeta_ptr + meta + cs, mask=c_ok, other=0.0).to(tl.float32)
                        mn = tl.load(kmeta_ptr + meta + cnt + cs, mask=c_ok, other=0.0).to(tl.float32)
                        bias += tl.sum(qg * mn[None, :], axis=1)
                        logits += rowdot(qg * sc[None, :], code, DOT_K)
            logits = tl.where(t_ok[None, :], logits + bias[:, None], float("-inf"))

            ok = t_ok[:, None] & d_ok[None, :]
            if vb == 16:
                val = tl.load(raw_ptr + 2 * (rec_base[:, None] + kw) + ds[None, :], mask=ok, other=0.0).to(tl.float32)
            else:
                w = tl.load(pages_ptr + rec_base[:, None] + kw + ds[None, :] // v_per, mask=ok, other=0)
                code = ((w >> ((ds[None, :] % v_per) * vb)) & ((1 << vb) - 1)).to(tl.float32)
                sc = tl.load(half_ptr + 2 * (rec_base + kw + vw), mask=t_ok, other=0.0).to(tl.float32)
                mn = tl.load(half_ptr + 2 * (rec_base + kw + vw) + 1, mask=t_ok, other=0.0).to(tl.float32)
                val = code * sc[:, None] + mn[:, None]

            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m_i - m_safe)  # 0 while nothing was seen
            pexp = tl.exp(logits - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pexp, axis=1)
            acc = acc * alpha[:, None] + rowdot(pexp, val, DOT_V)
            m_i = m_new

    out = r * max_pages + p
    tl.store(m_ptr + out * G + gs, m_i, mask=g_ok)
    tl.store(l_ptr + out * G + gs, l_i, mask=g_ok)
    tl.store(acc_ptr + (out * G + gs[:, None]) * D + ds[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


def paged_partials(paged, q: torch.Tensor, block_t: int = 16, out=None):
    """Split-K partials of ``q [R, G, D]`` (float32, already scaled) over every head row of a paged
    segment.

    Args:
        paged: a :class:`~rdkv_hf.paged.PagedSegment` with ``R`` head rows, on q's device.
        q: ``[R, G, D]`` contiguous float32 on CUDA (or the CPU under ``TRITON_INTERPRET=1``).
        block_t: token records a program reads at once (a power of two >= 16).
        out: optional ``(m [R, G], l [R, G], acc [R, G, D])`` float32 tensors to write.
    Returns:
        ``(max [R, G], sum [R, G], acc [R, G, D])`` as ``paged_partials_reference``.
    """
    R, G, D = _check(paged, q, block_t)
    max_pages = paged.block_table.shape[1]
    cm = torch.empty(R, max_pages, G, dtype=torch.float32, device=q.device)
    cl = torch.empty_like(cm)
    cacc = torch.empty(R, max_pages, G, D, dtype=torch.float32, device=q.device)
    BLOCK_G, BLOCK_D = triton.next_power_of_2(G), triton.next_power_of_2(D)
    if R:
        pages = paged.pages if paged.pages.numel() else torch.zeros(1, paged.page_words, dtype=torch.int32, device=q.device)
        with launch_context(q):
            _paged_partials_kernel[(R, max_pages)](
                q, pages, pages.view(torch.float16), pages.view(paged.raw_dtype), paged.k_meta, paged.perm, paged.rows,
                paged.k_groups, paged.block_table, cm, cl, cacc, G, D, max_pages, paged.page_words,
                RC=paged.rows.shape[1], KC=paged.k_groups.shape[1], BLOCK_G=BLOCK_G,
                BLOCK_D=BLOCK_D, BLOCK_T=block_t, BLOCK_C=16,
                DOT_K=dot_ok(BLOCK_G, block_t), DOT_V=dot_ok(BLOCK_G, BLOCK_D),
            )
    return merge_chunks(cm, cl, cacc, out)


def _check(paged, q: torch.Tensor, block_t: int) -> tuple[int, int, int]:
    if paged.page_words <= HEADER_WORDS:
        raise ValueError(f"pages of {paged.page_words} words cannot hold a {HEADER_WORDS}-word header")
    tensors = {name: getattr(paged, name) for name in ("pages", "block_table", "rows", "k_groups", "k_meta", "perm")}
    return check_decode_inputs(q, block_t, paged.rows.shape[0], paged.head_dim, tensors, "paged segment")
