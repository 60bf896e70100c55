"""Several segments of one layer attended in one kernel call.

Compressed decoding (``RDKVConfig.decode_block``) adds a segment every block, hundreds over a long
generation; a kernel call per segment costs more than its work. :func:`stack_segments` lays the
segments out as one set of flat buffers whose head table has a row per (segment, batch row, KV
head), so the C++ and Triton kernels walk them all at once with their contract unchanged (a
segment with more head rows). The members then view the stack's storage (nothing is held twice),
and :func:`stacked_partials` merges the partials of each (batch row, KV head) by log-sum-exp.
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
    dtype); each member's buffers and heads are re-pointed at views of the stack's storage."""
    first = segments[0]
    B, H = first.batch, first.kv_heads
    parts = [s.buffers for s in segments]
    if any(s.batch != B or s.kv_heads != H for s in segments) or len({p.raw.dtype for p in parts}) > 1:
        raise ValueError("stacked segments must share their batch, KV heads and 16-bit dtype")
    sizes = {name: [getattr(p, name).numel() for p in parts] for name in ("words", "meta", "raw", "perm", "groups")}
    sizes["groups"] = [p.groups.shape[0] for p in parts]
    offsets = {name: torch.tensor([0, *n[:-1]]).cumsum(0).tolist() for name, n in sizes.items()}
    heads, groups = [], []
    for j, p in enumerate(parts):
        g_off, w_off, m_off, r_off, p_off = (offsets[n][j] for n in ("groups", "words", "meta", "raw", "perm"))
        h = p.heads.clone()
        h[:, [H_V0, H_V1, H_K0, H_K1]] += g_off
        h[:, H_PERM] = torch.where(h[:, H_PERM] >= 0, h[:, H_PERM] + p_off, h[:, H_PERM])
        g = p.groups.clone()
        raw = g[:, G_BITS] == 16
        g[:, G_DATA] += torch.where(raw, torch.full_like(g[:, G_DATA], r_off), torch.full_like(g[:, G_DATA], w_off))
        g[:, G_META] = torch.where(raw, g[:, G_META], g[:, G_META] + m_off)
        heads.append(h)
        groups.append(g)
    buffers = dataclasses.replace(
        first.buffers, words=torch.cat([p.words for p in parts]), meta=torch.cat([p.meta for p in parts]),
        raw=torch.cat([p.raw for p in parts]), perm=torch.cat([p.perm for p in parts]), heads=torch.cat(heads),
        groups=torch.cat(groups), max_tokens=max(p.max_tokens for p in parts))
    for j, s in enumerate(segments):
        _repoint(s, buffers, {n: (offsets[n][j], sizes[n][j]) for n in ("words", "meta", "raw", "perm")})
    all_heads = [h for s in segments for h in s.heads]
    real = torch.cat([s.real_tokens for s in segments])
    return StackedSegment(all_heads, len(segments) * B, H, real, buffers, decoded=True, stacked=len(segments))


def _repoint(seg: Segment, stack: SegmentBuffers, spans: dict) -> None:
    """Make `seg` view its bytes inside `stack` (its own tables keep their offsets, which are
    relative to its slices); heads that beams share stay shared."""
    views = {n: getattr(stack, n)[o : o + size] for n, (o, size) in spans.items()}
    seg.buffers = dataclasses.replace(seg.buffers, **views)
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
    rows = B * H
    cm = m.reshape(k, rows, G).transpose(0, 1)
    cl = l.reshape(k, rows, G).transpose(0, 1)
    cacc = acc.reshape(k, rows, G, -1).transpose(0, 1)
    m, l, acc = merge_chunk_partials(cm, cl, cacc)
    return m.reshape(B, H, G), l.reshape(B, H, G), acc.reshape(B, H, G, -1)
