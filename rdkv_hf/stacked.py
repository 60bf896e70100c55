"""Several segments of one layer attended in one kernel call.

Compressed decoding (``RDKVConfig.decode_block``) adds a segment every block, hundreds over a long
generation; a kernel call per segment costs more than its work. :func:`stack_segments` lays the
segments out as one set of flat buffers whose head table has a row per (segment, batch row, KV
head), so the C++ and Triton kernels walk them all at once, as a segment with more head rows. The
members then view the stack's buffers and tables (nothing is held twice). The kernels take the
queries of one member: head row ``r`` reads query row ``r mod (batch * kv_heads)`` and is merged
into that output row. The torch
reference runs :func:`stacked_partials`, which repeats the queries and merges the members' partials
of each (batch row, KV head) by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .kernels import merge_chunk_partials
from .storage import G_BITS, G_DATA, G_META, H_K0, H_K1, H_PERM, H_V0, H_V1, PackedHead, Segment, SegmentBuffers


@dataclass
class StackedSegment(Segment):
    """``stacked`` segments of ``batch // stacked`` rows each, segment-major: head row
    ``(j * rows + b) * kv_heads + h`` is head ``h`` of batch row ``b`` in member ``j``."""

    stacked: int = field(default=1, kw_only=True)

    def select(self, batch_index: torch.Tensor) -> StackedSegment:
        """The stack of every member's rows `batch_index` (as :meth:`Segment.select`)."""
        B, H = self.batch // self.stacked, self.kv_heads
        idx = batch_index.tolist()
        rows = [(j * B + b) * H + h for j in range(self.stacked) for b in idx for h in range(H)]
        buffers = self.buffers.select(torch.tensor(rows, dtype=torch.long, device=self.buffers.heads.device))
        real = self.real_tokens.reshape(self.stacked, B)[:, batch_index.cpu()].reshape(-1)
        return StackedSegment([self.heads[r] for r in rows], self.stacked * len(idx), H, real, buffers, decoded=True,
                              stacked=self.stacked)


def stack_segments(segments: list[Segment]) -> StackedSegment:
    """One :class:`StackedSegment` over `segments` (same batch, KV heads, head_dim and 16-bit
    dtype); each member is re-pointed at the stack's buffers. Members that already view one set
    of buffers (an earlier stack) bring it once."""
    first = segments[0]
    B, H = first.batch, first.kv_heads
    if any(s.batch != B or s.kv_heads != H for s in segments) or len({s.buffers.raw.dtype for s in segments}) > 1:
        raise ValueError("stacked segments must share their batch, KV heads and 16-bit dtype")
    names = ("words", "meta", "raw", "perm", "groups")
    sets: dict[tuple, int] = {}
    parts = []  # the distinct sets of buffers, in order
    for s in segments:
        key = tuple(getattr(s.buffers, n).untyped_storage().data_ptr() for n in names) + tuple(
            getattr(s.buffers, n).numel() for n in names)
        if key not in sets:
            sets[key] = len(parts)
            parts.append(s.buffers)
    size = {n: [getattr(p, n).shape[0] for p in parts] for n in names}
    off = {n: torch.tensor([0, *size[n][:-1]]).cumsum(0).tolist() for n in names}
    groups = []
    for j, p in enumerate(parts):
        g = p.groups.clone()
        raw = g[:, G_BITS] == 16
        g[:, G_DATA] += torch.where(raw, torch.full_like(g[:, G_DATA], off["raw"][j]), torch.full_like(g[:, G_DATA], off["words"][j]))
        g[:, G_META] = torch.where(raw, g[:, G_META], g[:, G_META] + off["meta"][j])
        groups.append(g)
    heads = []
    for s in segments:
        j = sets[tuple(getattr(s.buffers, n).untyped_storage().data_ptr() for n in names) + tuple(
            getattr(s.buffers, n).numel() for n in names)]
        h = s.buffers.heads.clone()
        h[:, [H_V0, H_V1, H_K0, H_K1]] += off["groups"][j]
        h[:, H_PERM] = torch.where(h[:, H_PERM] >= 0, h[:, H_PERM] + off["perm"][j], h[:, H_PERM])
        heads.append(h)
    buffers = dataclasses.replace(
        first.buffers, words=torch.cat([p.words for p in parts]), meta=torch.cat([p.meta for p in parts]),
        raw=torch.cat([p.raw for p in parts]), perm=torch.cat([p.perm for p in parts]), heads=torch.cat(heads),
        groups=torch.cat(groups), max_tokens=max(s.buffers.max_tokens for s in segments))
    rows = B * H
    for j, s in enumerate(segments):
        _repoint(s, dataclasses.replace(buffers, heads=buffers.heads[j * rows : (j + 1) * rows], max_tokens=s.buffers.max_tokens))
    all_heads = [h for s in segments for h in s.heads]
    real = torch.cat([s.real_tokens for s in segments])
    return StackedSegment(all_heads, len(segments) * B, H, real, buffers, decoded=True, stacked=len(segments))


def _repoint(seg: Segment, buffers: SegmentBuffers) -> None:
    """Make `seg` view the stack: `buffers` are the stack's, with the head table rows of `seg` (a
    view), so its data and tables are held once; heads that beams share stay shared."""
    seg.buffers = buffers
    new: dict[int, PackedHead] = {}
    heads = []
    for r, old in enumerate(seg.heads):
        if id(old) not in new:
            view = seg.buffers.view_head(r)
            view.w_tok, view.w_ch = old.w_tok, old.w_ch
            new[id(old)] = view
        heads.append(new[id(old)])
    seg.heads = heads


def stacked_partials(stack: StackedSegment, qf: torch.Tensor, partials) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials of ``qf [B, Hkv, G, D]`` over every member of `stack`, merged per row.

    Args:
        partials: ``partials(segment, q)`` -> ``(max, sum, acc)`` of one segment
            (``attention.segment_partials`` with its backend).
    Returns:
        ``(max [B, Hkv, G], sum [B, Hkv, G], acc [B, Hkv, G, D])``.
    """
    k = stack.stacked
    B, H, G, D = qf.shape
    m, l, acc = partials(stack, qf.repeat(k, 1, 1, 1))  # member j's rows see the same queries
    rows = k * B * H  # each member's partials are one chunk of its row
    m, l, acc = merge_chunk_partials(m.reshape(rows, 1, G), l.reshape(rows, 1, G), acc.reshape(rows, 1, G, -1), members=k)
    return m.reshape(B, H, G), l.reshape(B, H, G), acc.reshape(B, H, G, -1)
