"""Packed tokens in fixed-size pages: the layout a serving engine's block pool would hold (see
docs/vllm.md), and its decode in plain torch (the reference of ``rdkv_hf.kernels.paged_decode``).

A :class:`PagedSegment` holds the same compressed tokens as a segment's flat buffers (``storage.py``),
laid out as a paged KV cache is: one pool of int32 pages of ``page_words`` words, and a block table
per head row (a (request, KV head) pair: heads are ragged, so each has its own pages).

* A page belongs to one head row and holds consecutive kept tokens of it, in the head's order
  (widest V first), of mixed widths. It starts with a header: ``n_runs`` then, for each run of
  tokens of one V width, ``(v_bits, count, word offset)`` (at most :data:`MAX_RUNS` runs); the run's
  token records follow back to back.
* A token record is ``[K | V | V meta]``. K: for each K width group of the head (its channels in the
  head's channel order), the token's codes of those channels packed along the channels
  (``quant.pack``), or for 16 bits their raw values, two a word. K scales and minima are per channel
  and per head (taken over the segment's tokens, as in ``storage.py``) in ``k_meta``. V: the token's
  codes packed along head_dim, then one word holding its float16 scale (low half) and minimum (high
  half); a 16-bit token stores its raw values two a word and no meta word. So a record's size
  depends only on the token's V width: appending a decoded token is writing one record.

Tables (int64): ``rows [R, 5]``: pages used, K group range ``[k0, k1)`` in ``k_groups``, offset of
the head's channel order in ``perm`` (-1: identity), words of its K part; ``k_groups [NG, 5]``:
bits, channels, first position in the channel order, word offset in the K part, offset in
``k_meta`` (scales, then minima; -1 for 16 bits); ``block_table [R, max_pages]`` int32 page ids (-1:
none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .storage import H_PERM

MAX_RUNS = 9  # widths 1..8 and 16: a page can hold a run of each
HEADER_WORDS = 1 + 3 * MAX_RUNS
R_PAGES, R_K0, R_K1, R_PERM, R_KWORDS = range(5)
KG_BITS, KG_COUNT, KG_START, KG_WORD, KG_META = range(5)
RAW_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PagedSegment:
    """Pages, block tables and K metadata of one segment (see the module docstring)."""

    pages: torch.Tensor  # int32 [num_pages, page_words]
    block_table: torch.Tensor  # int32 [R, max_pages]
    rows: torch.Tensor  # int64 [R, 5]
    k_groups: torch.Tensor  # int64 [NG, 5]
    k_meta: torch.Tensor  # float16 [n_meta]
    perm: torch.Tensor  # uint8 or int16 [n_perm]: channel orders
    head_dim: int
    raw_dtype: torch.dtype  # storage of 16-bit values (float16 or bfloat16)

    @property
    def page_words(self) -> int:
        return self.pages.shape[1]

    def to(self, device) -> PagedSegment:
        move = {k: getattr(self, k).to(device) for k in ("pages", "block_table", "rows", "k_groups", "k_meta", "perm")}
        return PagedSegment(**move, head_dim=self.head_dim, raw_dtype=self.raw_dtype)


def _raw_words(x: torch.Tensor, raw_dtype: torch.dtype) -> torch.Tensor:
    """``[n, c]`` values -> ``[n, ceil(c / 2)]`` int32 words holding them as 16-bit, two a word."""
    x = x.to(raw_dtype)
    if x.shape[1] % 2:
        x = torch.nn.functional.pad(x, (0, 1))
    # a copy: a view may start at an odd 16-bit offset, and a size-1 dim may have any stride
    return x.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.int32).reshape(x.shape[0], -1)


def _k_part(head, raw_dtype, k_groups: list, k_meta: list, n_meta: int) -> tuple[torch.Tensor, int]:
    """``[n, words]`` K part of every token record of `head`; appends its K groups and metadata."""
    parts, word, start = [], 0, 0
    for g in head.k_groups:
        if g.bits == 16:
            words = _raw_words(g.data.T, raw_dtype)  # raw rows are channels over tokens
            meta = -1
        else:
            words = quant.pack(quant.unpack(g.data, g.bits, head.n).T, g.bits)
            meta = n_meta
            k_meta += [g.scale.reshape(-1), g.minimum.reshape(-1)]
            n_meta += 2 * g.count
        k_groups.append([g.bits, g.count, start, word, meta])
        parts.append(words)
        word += words.shape[1]
        start += g.count
    empty = torch.zeros(head.n, 0, dtype=torch.int32, device=head.device)
    return (torch.cat(parts, 1) if parts else empty), n_meta


def _v_part(g, raw_dtype) -> torch.Tensor:
    """``[count, words]`` V part (and meta word) of the token records of a V group."""
    if g.bits == 16:
        return _raw_words(g.data, raw_dtype)
    meta = torch.stack([g.scale.reshape(-1), g.minimum.reshape(-1)], -1).to(quant.META_DTYPE).reshape(-1).view(torch.int32)[:, None]
    return torch.cat([g.data, meta], 1)


def _seal(page: torch.Tensor, runs: list) -> torch.Tensor:
    """Write the header of a filled page: the run count, then ``(v_bits, count, word offset)`` each."""
    page[0] = len(runs)
    if runs:
        page[1 : 1 + 3 * len(runs)] = torch.tensor(runs, dtype=torch.int32, device=page.device).reshape(-1)
    return page


def _head_pages(head, k_part: torch.Tensor, raw_dtype, page_words: int) -> list[torch.Tensor]:
    """The pages of one head: its token records in order, a new page when a record does not fit
    or the page holds :data:`MAX_RUNS` runs."""
    out, page, used, runs, t0 = [], None, HEADER_WORDS, [], 0
    for g in head.v_groups:
        records = torch.cat([k_part[t0 : t0 + g.count], _v_part(g, raw_dtype)], 1)  # [count, record words]
        rec = records.shape[1]
        if HEADER_WORDS + rec > page_words:
            raise ValueError(f"`page_words`={page_words} cannot hold one {g.bits}-bit token ({rec} words + a {HEADER_WORDS}-word header)")
        done = 0
        while done < g.count:
            fit = 0 if page is None or len(runs) == MAX_RUNS else (page_words - used) // rec
            if fit == 0:
                if page is not None:
                    out.append(_seal(page, runs))
                page, used, runs = torch.zeros(page_words, dtype=torch.int32, device=records.device), HEADER_WORDS, []
                continue
            take = min(fit, g.count - done)
            page[used : used + take * rec] = records[done : done + take].reshape(-1)
            runs.append((g.bits, take, used))
            used += take * rec
            done += take
        t0 += g.count
    if page is not None:
        out.append(_seal(page, runs))
    return out


def page_segment(buffers, page_words: int = 256) -> PagedSegment:
    """Lay a segment's packed heads (:class:`~rdkv_hf.storage.SegmentBuffers`) out in pages.

    A prototype of a serving engine's store op, in torch on the buffers' device: each head row's
    tokens fill its own pages in order, a new page starting when a record does not fit or the page
    holds :data:`MAX_RUNS` runs.
    """
    raw_dtype = buffers.raw.dtype if buffers.raw.numel() else torch.float16
    if raw_dtype not in RAW_DTYPES:
        raise ValueError(f"paged segments store 16-bit values as float16 or bfloat16, got a segment kept in {raw_dtype}")
    if buffers.head_dim % 2:
        raise ValueError(f"paged segments need an even head_dim, got {buffers.head_dim}")
    dev = buffers.words.device
    pages, table, rows, k_groups, k_meta, n_meta = [], [], [], [], [], 0
    for r in range(buffers.heads.shape[0]):
        head = buffers.view_head(r)
        k0 = len(k_groups)
        k_part, n_meta = _k_part(head, raw_dtype, k_groups, k_meta, n_meta)
        perm_off = int(buffers.heads[r, H_PERM])
        own = _head_pages(head, k_part, raw_dtype, page_words)
        table.append(list(range(len(pages), len(pages) + len(own))))
        pages += own
        rows.append([len(own), k0, len(k_groups), perm_off, k_part.shape[1]])
    width = max((len(t) for t in table), default=0)
    block_table = torch.full((len(table), max(width, 1)), -1, dtype=torch.int32, device=dev)
    for r, t in enumerate(table):
        block_table[r, : len(t)] = torch.tensor(t, dtype=torch.int32, device=dev)
    return PagedSegment(
        pages=torch.stack(pages) if pages else torch.zeros(0, page_words, dtype=torch.int32, device=dev),
        block_table=block_table,
        rows=torch.tensor(rows, dtype=torch.int64, device=dev).reshape(-1, 5),
        k_groups=torch.tensor(k_groups, dtype=torch.int64, device=dev).reshape(-1, 5),
        k_meta=torch.cat(k_meta).to(quant.META_DTYPE) if k_meta else torch.zeros(0, dtype=quant.META_DTYPE, device=dev),
        perm=buffers.perm,
        head_dim=buffers.head_dim,
        raw_dtype=raw_dtype,
    )


def head_kv(paged: PagedSegment, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k [n, D], v [n, D])`` float32 of head row `r`, read back from its pages (evicted K
    channels are zero), in the head's token order."""
    D = paged.head_dim
    n_pages, k0, k1, perm_off, kw = paged.rows[r].tolist()
    groups = paged.k_groups[k0:k1].tolist()
    kept = sum(g[KG_COUNT] for g in groups)
    order = torch.arange(D, device=paged.pages.device) if perm_off < 0 else paged.perm[perm_off : perm_off + kept].long()
    ks, vs = [], []
    for p in paged.block_table[r, :n_pages].tolist():
        page = paged.pages[p]
        for i in range(int(page[0])):
            bits, count, off = page[1 + 3 * i : 4 + 3 * i].tolist()
            vw = -(-D // (32 // bits))  # two raw values a word at 16 bits
            recs = page[off : off + count * (kw + vw + (bits < 16))].view(count, -1)
            k = torch.zeros(count, D, device=page.device)
            for g_bits, c, start, word, meta in groups:
                words = recs[:, word : word + -(-c // (32 // g_bits))]
                if g_bits == 16:
                    vals = words.contiguous().view(paged.raw_dtype)[:, :c].float()
                else:
                    vals = quant.dequantize(quant.unpack(words, g_bits, c), paged.k_meta[meta : meta + c], paged.k_meta[meta + c : meta + 2 * c])
                k[:, order[start : start + c]] = vals
            words = recs[:, kw : kw + vw].contiguous()
            if bits == 16:
                v = words.view(paged.raw_dtype)[:, :D].float()
            else:
                meta = recs[:, kw + vw : kw + vw + 1].contiguous().view(quant.META_DTYPE)  # [count, 2]: scale, minimum
                v = quant.dequantize(quant.unpack(words, bits, D), meta[:, :1], meta[:, 1:])
            ks.append(k)
            vs.append(v)
    if not ks:
        return torch.zeros(0, D, device=paged.pages.device), torch.zeros(0, D, device=paged.pages.device)
    return torch.cat(ks), torch.cat(vs)


def paged_partials_reference(paged: PagedSegment, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-K partials of ``q [R, G, D]`` (float32, scaled) over every head row of `paged`, in
    plain torch: ``(max [R, G], sum [R, G], acc [R, G, D])`` as ``head_partials_reference`` (a head
    without tokens gives ``(-inf, 0, 0)``)."""
    R, G, D = q.shape
    m = torch.full((R, G), -torch.inf, device=q.device)
    l = torch.zeros(R, G, device=q.device)
    acc = torch.zeros(R, G, D, device=q.device)
    for r in range(R):
        k, v = head_kv(paged, r)
        if k.shape[0]:
            logits = q[r] @ k.T
            m[r] = logits.amax(-1)
            p = torch.exp(logits - m[r][:, None])
            l[r], acc[r] = p.sum(-1), p @ v
    return m, l, acc
