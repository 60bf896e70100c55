"""Packed storage of compressed tokens: one flat set of buffers per segment, per-head views on it.

A :class:`Segment` holds the compressed tokens of one multi-token forward for every (batch row,
KV head) pair ("head", ``r = b * kv_heads + h``). Heads are ragged: each keeps its own number of
tokens ``n`` and splits its V tokens and K channels into width groups. Everything lives in four
flat buffers shared by all heads of the segment (:class:`SegmentBuffers`):

* ``words`` int32: packed codes of every quantized group (``quant.pack`` layout, rows back to back);
* ``meta`` float16: per group, ``count`` scales then ``count`` minima;
* ``raw``: the 16-bit groups, kept as is in the keep dtype;
* ``perm``: the K channel order of heads that mix widths (uint8, int16 past 256 channels).

Two small int64 tables describe them, so a kernel can walk any head with no Python in the loop:

* ``heads [R, 6]``: ``n``, the V group range ``[v0, v1)``, the K group range ``[k0, k1)`` and the
  offset of the head's channel order in ``perm`` (-1: identity);
* ``groups [NG, 7]``: ``bits``, ``count`` (V tokens or K channels), ``length`` (codes a row:
  ``v_dim`` for V, ``n`` for K), ``row_words`` (int32 words a packed row; elements for raw rows),
  ``data`` (offset in ``words``, or in ``raw`` when bits == 16), ``meta`` (offset in ``meta``) and
  ``start`` (first token of a V group in the head's token order, first position of a K group in
  its channel order).

A head keeps its tokens sorted by V width (16 first, then 8, 7, ..., 1); K rows are channels over
those tokens in the same order, channels sorted by K width. :class:`PackedHead` and :class:`Group`
are views on the buffers for the torch reference, tests and summaries.

K and V may differ in width: ``head_dim`` is K's (the channels a query meets), ``v_dim`` V's (the
output's); they differ in DeepSeek's multi-head latent attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import quant

# Columns of SegmentBuffers.heads and SegmentBuffers.groups.
H_N, H_V0, H_V1, H_K0, H_K1, H_PERM = range(6)
G_BITS, G_COUNT, G_LEN, G_WORDS, G_DATA, G_META, G_START = range(7)
H_COLS_COUNT, G_COLS_COUNT = 6, 7


@dataclass
class Group:
    """Tokens (V) or channels (K) stored at one width."""

    bits: int
    count: int  # tokens for V, channels for K
    data: torch.Tensor  # int32 packed codes [count, words], or raw values [count, length] when bits == 16
    scale: torch.Tensor | None = None  # float16 [count]
    minimum: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += (self.scale.numel() + self.minimum.numel()) * self.scale.element_size()
        return n


@dataclass
class PackedHead:
    """One KV head's compressed tokens: ``n`` kept tokens, keys of ``head_dim`` channels and values
    of ``v_dim`` (``head_dim`` when not given)."""

    n: int
    head_dim: int
    v_groups: list[Group]
    k_perm: torch.Tensor | None  # uint8 [kept channels] (int16 past 256) in K group order; None: identity
    k_groups: list[Group]
    v_dim: int | None = None
    # Under a byte cap (RDKVConfig.max_cache_bytes) the weights the widths came from, for re-allocation
    # (rdkv_hf.cache_cap): bfloat16 [n] per kept token in the head's token order, [head_dim] per channel.
    w_tok: torch.Tensor | None = field(default=None, kw_only=True)
    w_ch: torch.Tensor | None = field(default=None, kw_only=True)
    # Until the other layers have packed the same tokens: int32 [n] each kept token's sequence
    # position, to share the weights across layers (rdkv_hf.cache_cap.share_across_layers).
    w_pos: torch.Tensor | None = field(default=None, kw_only=True)

    def __post_init__(self):
        if self.v_dim is None:
            self.v_dim = self.head_dim

    @property
    def nbytes(self) -> int:
        return (
            sum(g.nbytes for g in self.v_groups)
            + sum(g.nbytes for g in self.k_groups)
            + (self.k_perm.numel() * self.k_perm.element_size() if self.k_perm is not None else 0)
        )

    @property
    def device(self) -> torch.device:
        """Where the head's groups live (the CPU for a head that kept nothing)."""
        for g in self.v_groups + self.k_groups:
            return g.data.device
        return torch.device("cpu") if self.k_perm is None else self.k_perm.device

    def channel_order(self) -> torch.Tensor:
        """``[kept channels]`` long: the channel of each K row, in group order."""
        return torch.arange(self.head_dim, device=self.device) if self.k_perm is None else self.k_perm.long()

    def v_widths(self) -> dict[int, int]:
        return {g.bits: g.count for g in self.v_groups}

    def k_widths(self) -> dict[int, int]:
        out = {g.bits: g.count for g in self.k_groups}
        out[0] = self.head_dim - sum(g.count for g in self.k_groups)
        return out

    def dequantize(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k [n, head_dim], v [n, v_dim])`` as attended (evicted K channels are zero). Tests and debugging."""
        dev = self.device
        v = torch.cat([_dequant_rows(g, self.v_dim) for g in self.v_groups]) if self.v_groups else torch.zeros(0, self.v_dim, device=dev)
        k = torch.zeros(self.head_dim, self.n, device=dev)
        c0 = 0
        perm = self.channel_order()
        for g in self.k_groups:
            k[perm[c0 : c0 + g.count]] = _dequant_rows(g, self.n)
            c0 += g.count
        return k.T.to(dtype), v.to(dtype)


def _dequant_rows(g: Group, length: int) -> torch.Tensor:
    """``[count, length]`` values of a group (rows are V tokens or K channels)."""
    if g.bits == 16:
        return g.data.float()
    codes = quant.unpack(g.data, g.bits, length)
    return quant.dequantize(codes, g.scale[:, None], g.minimum[:, None])


@dataclass
class SegmentBuffers:
    """The flat buffers and tables of one segment (see the module docstring)."""

    words: torch.Tensor  # int32 [n_words]
    meta: torch.Tensor  # float16 [n_meta]
    raw: torch.Tensor  # keep dtype [n_raw]
    perm: torch.Tensor  # uint8 or int16 [n_perm]
    heads: torch.Tensor  # int64 [R, 6]
    groups: torch.Tensor  # int64 [NG, 7]
    head_dim: int  # K's
    max_tokens: int | None = None  # at least the largest ``n`` of any head row (kernels size their grid by it)
    v_dim: int | None = None  # V's (None: head_dim)

    def __post_init__(self):
        if self.max_tokens is None:  # read once here, not at every decode step (a GPU sync)
            self.max_tokens = int(self.heads[:, 0].max()) if self.heads.shape[0] else 0
        if self.v_dim is None:
            self.v_dim = self.head_dim

    def select(self, rows: torch.Tensor) -> SegmentBuffers:
        """The same buffers with head table rows ``rows`` (heads may repeat: beams share them)."""
        return SegmentBuffers(self.words, self.meta, self.raw, self.perm, self.heads[rows], self.groups, self.head_dim,
                              self.max_tokens, self.v_dim)

    def view_head(self, r: int) -> PackedHead:
        """:class:`PackedHead` of row `r` whose groups are views on the buffers (no copy)."""
        n, v0, v1, k0, k1, p = self.heads[r].tolist()
        v_groups = [self._view_group(gi) for gi in range(v0, v1)]
        k_groups = [self._view_group(gi) for gi in range(k0, k1)]
        kept = sum(g.count for g in k_groups)
        perm = None if p < 0 else self.perm[p : p + kept]
        return PackedHead(n, self.head_dim, v_groups, perm, k_groups, self.v_dim)

    def _view_group(self, gi: int) -> Group:
        bits, count, length, row_words, data, meta, _ = self.groups[gi].tolist()
        if bits == 16:
            return Group(16, count, self.raw[data : data + count * row_words].view(count, row_words))
        codes = self.words[data : data + count * row_words].view(count, row_words)
        return Group(bits, count, codes, self.meta[meta : meta + count], self.meta[meta + count : meta + 2 * count])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.meta, self.raw, self.perm))


@dataclass
class _Builder:
    """Collects groups of many heads into one SegmentBuffers."""

    head_dim: int
    keep_dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    v_dim: int | None = None
    words: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    raw: list = field(default_factory=list)
    perm: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    heads: list = field(default_factory=list)
    n_words: int = 0
    n_meta: int = 0
    n_raw: int = 0
    n_perm: int = 0

    def add_packed(self, bits: int, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, length: int, start: int) -> None:
        """A quantized group: ``codes [count, row_words]`` int32, scale/minimum float16 ``[count]``."""
        count, row_words = codes.shape
        self.groups.append([bits, count, length, row_words, self.n_words, self.n_meta, start])
        self.words.append(codes.reshape(-1))
        self.meta += [scale.reshape(-1), minimum.reshape(-1)]
        self.n_words += codes.numel()
        self.n_meta += 2 * count

    def add_raw(self, x: torch.Tensor, start: int) -> None:
        """A 16-bit group: ``x [count, length]`` kept as is."""
        count, length = x.shape
        self.groups.append([16, count, length, length, self.n_raw, -1, start])
        self.raw.append(x.reshape(-1).to(self.keep_dtype))
        self.n_raw += x.numel()

    def add_perm(self, perm: torch.Tensor) -> int:
        off = self.n_perm
        self.perm.append(perm)
        self.n_perm += perm.numel()
        return off

    def add_head(self, n: int, v0: int, v1: int, k0: int, k1: int, perm_off: int) -> None:
        self.heads.append([n, v0, v1, k0, k1, perm_off])

    def build(self) -> SegmentBuffers:
        perm_dtype = torch.uint8 if self.head_dim <= 256 else torch.int16
        dev = self.device
        cat = lambda parts, dtype: torch.cat(parts).to(dev, dtype) if parts else torch.zeros(0, dtype=dtype, device=dev)  # noqa: E731
        return SegmentBuffers(
            words=cat(self.words, torch.int32),
            meta=cat(self.meta, quant.META_DTYPE),
            raw=cat(self.raw, self.keep_dtype),
            perm=cat(self.perm, perm_dtype),
            heads=torch.tensor(self.heads, dtype=torch.int64, device=dev).reshape(-1, 6),
            groups=torch.tensor(self.groups, dtype=torch.int64, device=dev).reshape(-1, 7),
            head_dim=self.head_dim,
            max_tokens=max((h[0] for h in self.heads), default=0),
            v_dim=self.v_dim,
        )


def pack_order(v_bits: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` long: the order :func:`pack_segment` keeps a head's tokens in, by decreasing width
    (stable: ties keep their order; evicted tokens last), for ``v_bits [..., T]``."""
    return torch.sort(-v_bits.long(), dim=-1, stable=True).indices


def pack_segment(
    k: torch.Tensor, v: torch.Tensor, v_bits: torch.Tensor, k_bits: torch.Tensor, keep_dtype: torch.dtype
) -> tuple[list[PackedHead], SegmentBuffers]:
    """Compress many heads into one segment's buffers.

    V groups are rows of tokens ``[n_w, words(Dv)]``; K groups are rows of channels over the kept
    tokens ``[c_w, words(n)]``, so each scale and minimum covers one token (V) or one channel (K).
    The V rows of one width are quantized for all heads at once.

    Args:
        k, v: ``[R, T, D]`` and ``[R, T, Dv]`` post-RoPE keys and values (one row per (batch, KV head)).
        v_bits: ``[R, T]`` width of each token (0 evicts it from K and V).
        k_bits: ``[R, D]`` width of each K channel over the kept tokens (0 drops the channel).
        keep_dtype: storage of the 16-bit groups.
    Returns:
        ``(heads, buffers)``: one :class:`PackedHead` per row, viewing the buffers.
    """
    R, T, D = k.shape
    Dv = v.shape[-1]
    if v.shape[:2] != (R, T):
        raise ValueError(f"`k` is [{R}, {T}, {D}] but `v` is {list(v.shape)}: they must share rows and tokens")
    b = _Builder(D, keep_dtype, k.device, Dv)
    order = pack_order(v_bits)  # [R, T]
    vb = v_bits.long().gather(1, order)
    n_kept = (vb > 0).sum(1).tolist()
    # Rows of [R * T, D] in sorted order; rows are gathered per width (V) and per head (K) rather
    # than copying whole sorted K and V: less transient memory while a layer is compressed.
    flat = (order + torch.arange(R, device=order.device)[:, None] * T).reshape(-1)
    v_flat, k_flat = v.reshape(R * T, Dv), k.reshape(R * T, D)

    # V: one quantize + pack per width over every head's tokens of that width. The buffers are
    # filled width by width; the group table is then laid out head by head.
    v_rows = [[] for _ in range(R)]  # per head: its V group rows, widest first
    for bits in sorted(set(vb.unique().tolist()) - {0}, reverse=True):
        sel = vb == bits  # [R, T]
        counts = sel.sum(1).tolist()
        rows = v_flat.index_select(0, flat[sel.reshape(-1)])  # [N, D], head-major
        if bits < 16:
            codes, scale, minimum = quant.quantize(rows, bits, -1)
            packed, scale, minimum = quant.pack(codes, bits), scale.reshape(-1), minimum.reshape(-1)
        r0 = 0
        for r, c in enumerate(counts):
            if c:
                start = sum(g[1] for g in v_rows[r])  # wider tokens come first
                if bits == 16:
                    b.add_raw(rows[r0 : r0 + c], start)
                else:
                    b.add_packed(bits, packed[r0 : r0 + c], scale[r0 : r0 + c], minimum[r0 : r0 + c], Dv, start)
                v_rows[r].append(b.groups.pop())
            r0 += c

    # K: per head, channels over its kept tokens (their count differs from head to head).
    for r in range(R):
        v0 = len(b.groups)
        b.groups += v_rows[r]
        k0 = len(b.groups)
        n = n_kept[r]
        if n == 0:
            b.add_head(0, v0, k0, k0, k0, b.add_perm(torch.zeros(0, dtype=torch.long, device=k.device)))
            continue
        kt = k_flat.index_select(0, flat[r * T : r * T + n]).T  # [D, n] kept tokens, sorted
        kb = k_bits[r].long()
        widths = sorted(set(kb.tolist()) - {0}, reverse=True)
        chans, c0 = [], 0
        for bits in widths:
            ch = (kb == bits).nonzero().squeeze(1)
            if bits == 16:
                b.add_raw(kt[ch], c0)
            else:
                codes, scale, minimum = quant.quantize(kt[ch], bits, -1)
                b.add_packed(bits, quant.pack(codes, bits), scale, minimum, n, c0)
            chans.append(ch)
            c0 += len(ch)
        identity = len(widths) == 1 and c0 == D  # one width for every channel: nothing to store
        perm = torch.cat(chans) if chans else torch.zeros(0, dtype=torch.long, device=k.device)
        b.add_head(n, v0, k0, k0, len(b.groups), -1 if identity else b.add_perm(perm))
    buffers = b.build()
    return [buffers.view_head(r) for r in range(R)], buffers


def pack_head(k: torch.Tensor, v: torch.Tensor, v_bits: torch.Tensor, k_bits: torch.Tensor, keep_dtype: torch.dtype) -> PackedHead:
    """Compress one head: :func:`pack_segment` of a single row.

    Args:
        k, v: ``[T, D]`` and ``[T, Dv]`` post-RoPE keys and values.
        v_bits: ``[T]`` width of each token (0 evicts it from K and V).
        k_bits: ``[D]`` width of each K channel over the kept tokens (0 drops the channel).
    """
    heads, _ = pack_segment(k[None], v[None], v_bits[None], k_bits[None], keep_dtype)
    return heads[0]


def buffers_from_heads(heads: list[PackedHead]) -> SegmentBuffers:
    """Lay existing heads out in one segment's buffers and re-point their groups at them (so the
    old per-head tensors are freed). Heads that appear twice (shared beams) are stored once."""
    if not heads:
        return _Builder(0, torch.float16).build()
    D, Dv = heads[0].head_dim, heads[0].v_dim
    raw_dtypes = {g.data.dtype for h in heads for g in h.v_groups + h.k_groups if g.bits == 16}
    if len(raw_dtypes) > 1:
        raise ValueError(f"the heads of one segment must share their 16-bit dtype, got {raw_dtypes}")
    b = _Builder(D, raw_dtypes.pop() if raw_dtypes else torch.float16, heads[0].device, Dv)
    rows, first = [], {}
    for h in heads:
        if id(h) not in first:
            first[id(h)] = len(b.heads)
            v0 = len(b.groups)
            start = 0
            for g in h.v_groups:
                _add_group(b, g, Dv, start)
                start += g.count
            k0 = len(b.groups)
            start = 0
            for g in h.k_groups:
                _add_group(b, g, h.n, start)
                start += g.count
            perm_off = -1 if h.k_perm is None else b.add_perm(h.k_perm)
            b.add_head(h.n, v0, k0, k0, len(b.groups), perm_off)
        rows.append(first[id(h)])
    built = b.build()
    buffers = built.select(torch.tensor(rows, dtype=torch.long, device=built.heads.device))
    for r, h in enumerate(heads):
        view = buffers.view_head(r)
        h.v_groups, h.k_groups, h.k_perm = view.v_groups, view.k_groups, view.k_perm
    return buffers


def _add_group(b: _Builder, g: Group, length: int, start: int) -> None:
    if g.bits == 16:
        b.add_raw(g.data, start)
    else:
        b.add_packed(g.bits, g.data, g.scale, g.minimum, length, start)


@dataclass
class Segment:
    """The compressed tokens of one multi-token forward: ``heads[b * kv_heads + h]`` viewing
    ``buffers`` (built from the heads, and their storage moved into it, when not given)."""

    heads: list[PackedHead]
    batch: int
    kv_heads: int
    real_tokens: torch.Tensor  # [batch] tokens of this forward that were not padding
    buffers: SegmentBuffers | None = None
    decoded: bool = field(default=False, kw_only=True)  # a block of decoded tokens (RDKVConfig.decode_block), not a forward's

    def __post_init__(self):
        if self.buffers is None:
            self.buffers = buffers_from_heads(self.heads)

    def select(self, batch_index: torch.Tensor) -> Segment:
        """Rows for a new batch (beam reorder, repeat, select): heads are shared, not copied."""
        idx = batch_index.tolist()
        rows = [b * self.kv_heads + h for b in idx for h in range(self.kv_heads)]
        heads = [self.heads[r] for r in rows]
        buffers = self.buffers.select(torch.tensor(rows, dtype=torch.long, device=self.buffers.heads.device))
        return Segment(heads, len(idx), self.kv_heads, self.real_tokens[batch_index.cpu()], buffers, decoded=self.decoded)

    @property
    def table_nbytes(self) -> int:
        """Bytes of the segment's head and group tables (what the kernels walk the buffers by)."""
        b = self.buffers
        return b.heads.numel() * b.heads.element_size() + b.groups.numel() * b.groups.element_size()
