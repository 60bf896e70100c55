"""A hard cap on a cache's bytes (``RDKVConfig.max_cache_bytes``), kept by re-allocation.

**Shares.** The cap covers every layer. The layers Transformers keeps (sliding windows) are counted
at their largest (``sliding_window`` tokens). Each compressed layer first gets its protected part:
its full-precision tail at its largest (``keep + decode_block`` tokens, ``rdkv_hf.decode_blocks``), its pending decode sums,
and the newest decoded block at `budget` (codes, scales, tables, weights). What is left is split
across the layers as the planner splits the budget (a profile's head budgets included). A cap below
the sum of the protected parts is a ``ValueError`` that names that minimum.

**Re-allocation.** After a layer packs (a prompt, a decode block), if what it holds plus its tail and
sums at their largest would pass its share, it re-allocates the older decoded blocks to fit, less
``HEADROOM`` of its share so that it runs every few blocks. The forward segments (the prompt,
follow-ups) keep what they were packed with while the blocks can make room: the prompt holds the
attention sinks and what every generated token was conditioned on (re-allocated with the blocks, it
lost most of its K channels and the stream's recall with them: ``prompt kept`` in
``benchmarks/results/long_generation/recall.md``). Only when the blocks cannot make room is
everything but the tail and the newest block ("the old part") re-allocated together. Either way:

* each (batch row, KV head) gets bits in proportion to its planner budget and the tokens it has
  seen, scaled by one factor for the layer so that the old part fits;
* within a row, RDKV's Lagrangian spends them on the V tokens of all old segments at once, by the
  weights kept when each was packed (``w_tok`` and ``w_ch`` of each head, in bfloat16), then on each
  segment's K channels; no unit gains bits. Eviction modes keep the highest-weight tokens at 16
  bits (StreamingLLM's weights are recency, the random mode's random);
* RDKV ranks by ``Planner.cap_weights``: each segment's token weights over their mean (a block's
  weights are shares of what its own window queries looked at; compared raw, the blocks those
  queries did not look back at lose their most distinctive tokens first), half shared across the
  layer's KV heads (``CAP_HEAD_SHARE`` in ``planners/rdkv.py``: the head that evicts a fact may be the
  one a later question reads it with). Measured in ``recall.md`` (``relative``, ``shared across KV
  heads``). Once every layer has packed the same tokens, half of each token's weight follows the
  mean over layers of the most any KV head of the layer gave it (:func:`share_across_layers`,
  ``CAP_LAYER_SHARE``: a fact a later question needs may rank low in one layer's window and high in
  another's). Measured in ``recall.md`` (``half across layers``);
* the decoded blocks of the old part are merged into one segment, the forward segments re-packed
  each on its own, left as they were when nothing in them changed, dropped when no row keeps a token.

Re-packing reads the packed data back (``PackedHead.dequantize``) and packs it again: a V token or
a K channel that keeps its width and its tokens comes back bit for bit (its values lie on the grid
its minimum and scale span, and they span the same grid again); a K channel whose range changes
(a token at its minimum or maximum evicted, blocks merged) is quantized again on the new range,
which adds at most half a step of that range to its values; merging alone leaves V exact (what
merging decoded blocks costs K on SmolLM2: ``benchmarks/results/long_generation/repack.md``).
"""

from __future__ import annotations

import logging
import math

import torch

from .allocate import channel_widths, lagrangian_widths, unit_costs
from .compat import layer_types
from .storage import Segment, pack_order, pack_segment
from .weights import head_shape

logger = logging.getLogger(__name__)

# A re-allocation leaves this share of the layer's share free, so that it runs every few blocks, not
# every block; a share of bytes, not a number of blocks, so that every mode gets the same at one cap.
HEADROOM = 1 / 32
WEIGHT_DTYPE = torch.bfloat16
_HEAD_ROW_BYTES = 6 * 8  # a row of a segment's head table (int64)
_GROUP_ROW_BYTES = 7 * 8  # a row of its group table


def attach_weights(heads, v_bits: torch.Tensor, w_tok: torch.Tensor, w_ch: torch.Tensor,
                   positions: torch.Tensor | None = None) -> None:
    """Give each packed head the weights its widths came from, in its token order.

    Args:
        heads: ``R`` :class:`~rdkv_hf.storage.PackedHead` of one segment; v_bits: ``[R, T]`` their
            tokens' widths as packed; w_tok: ``[B, kv_heads, T]`` (``B * kv_heads = R``) the weights
            to keep; w_ch: ``[R, D]`` channel weights; positions: ``[T]`` the tokens' sequence
            positions, kept (``w_pos``) until :func:`share_across_layers` has run, or None.
    """
    R, T = v_bits.shape
    order = pack_order(v_bits)
    w = w_tok.reshape(R, T).float().gather(1, order).to(WEIGHT_DTYPE)
    wc = w_ch.float().to(WEIGHT_DTYPE)
    pos = None if positions is None else positions.to(order.device, torch.int32)[order]
    for r, h in enumerate(heads):
        h.w_tok, h.w_ch = w[r, : h.n].clone(), wc[r].clone()
        if pos is not None:
            h.w_pos = pos[r, : h.n].clone()


def share_across_layers(layers, share: float) -> None:
    """Mix into the weights of every head that still has ``w_pos`` the mean over layers of the most
    any KV head of the layer gave the same token: ``(1 - share) * own + share * mean``. Then drop ``w_pos``.

    A layer ranks a decoded block's tokens by what its own window queries read; a fact that is read
    only thousands of tokens later (a code, a name) may stand out in some layers and sit among the
    least read in others, and a layer that evicts it may be one the later question reads it through
    (:data:`rdkv_hf.planners.rdkv.CAP_LAYER_SHARE`). Runs once every layer has packed the
    same tokens (``RDKVCache.update`` at the first compressed layer of the next forward); a layer
    holding none of a token (it evicted it in every head) gives it 0. Under tensor parallelism the
    mean is over the KV heads this rank holds.

    Args:
        layers: the cache's :class:`~rdkv_hf.cache.RDKVLayer` s; share: in [0, 1].
    """
    pending = []
    for i, layer in enumerate(layers):
        for s in reversed(layer.segments):  # only the newest can be pending: the last forward packed them
            if not any(h.w_pos is not None for h in s.heads):
                break
            pending.append((i, s))
    if not pending:
        return
    heads = [(i, r // s.kv_heads, h, h.w_pos.long().cpu()) for i, s in pending for r, h in enumerate(s.heads)
             if h.w_pos is not None and h.n]
    if heads:
        lo = min(int(pos.min()) for *_, pos in heads)
        span = max(int(pos.max()) for *_, pos in heads) + 1 - lo
        B = max(s.batch for _, s in pending)
        most = {i: torch.zeros(B, span) for i, _ in pending}  # [B, span] per layer: the most any KV head gave
        for i, b, h, pos in heads:
            most[i][b].scatter_reduce_(0, pos - lo, h.w_tok.float().cpu(), "amax")
        vote = sum(most.values()) / len(most)
    done = set()
    for _, b, h, pos in heads:
        if id(h) not in done:  # beams share heads
            done.add(id(h))
            v = vote[b, pos - lo]
            h.w_tok = ((1 - share) * h.w_tok.float() + share * v.to(h.w_tok.device)).to(WEIGHT_DTYPE)
    for _, s in pending:
        for h in s.heads:
            h.w_pos = None


def packed_nbytes(segments) -> int:
    """Bytes of a layer's segments: every distinct head's codes, scales, channel order and kept
    weights (beams share heads), and every distinct storage of their tables (the decoded segments
    of a stack view its tables). A segment's count of real tokens per batch row, a few bytes of
    bookkeeping, is not counted."""
    seen, tables, n = set(), {}, 0
    for s in segments:
        for t in (s.buffers.heads, s.buffers.groups):
            storage = t.untyped_storage()
            tables[(t.device, storage.data_ptr())] = storage.nbytes()
        for h in s.heads:
            if id(h) not in seen:
                seen.add(id(h))
                n += h.nbytes + sum(t.numel() * t.element_size() for t in (h.w_tok, h.w_ch, h.w_pos) if t is not None)
    return n + sum(tables.values())


def _held(segments) -> int:
    """What a layer's segments hold (a stack of their decoded ones, rebuilt at the next forward,
    views the same bytes and tables)."""
    return packed_nbytes(segments)


# -- shares ------------------------------------------------------------------------------------


def head_rates(planner, layer_idx: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_bits [H], v_bits [H])``: the bits per element the planner gives each KV head of a layer."""
    if hasattr(planner, "head_budgets"):
        k, v = planner.head_budgets(layer_idx, 1, H, torch.ones(H, dtype=torch.float64))
        return torch.as_tensor(k, dtype=torch.float64).cpu(), torch.as_tensor(v, dtype=torch.float64).cpu()
    b = torch.full((H,), float(planner.config.budget), dtype=torch.float64)
    return b, b.clone()


def _table_bound(rows: int, widths: int) -> int:
    """Most bytes the tables of a segment of `rows` head rows take (a group per width, K and V)."""
    return rows * (_HEAD_ROW_BYTES + 2 * widths * _GROUP_ROW_BYTES)


def _group_widths(planner) -> int:
    return 1 if planner.evicts_only else len([b for b in planner.config.widths if b > 0])


def block_bound(planner, layer_idx: int, B: int, H: int, D: int, Dv: int) -> int:
    """Most bytes one decoded block of a layer takes, packed at the planner's budget: codes and
    scales (the allocator's bound), its tables, kept weights."""
    k, v = head_rates(planner, layer_idx, H)
    block = planner.config.decode_block
    code_bits = float((k * D + v * Dv).sum()) * block * B
    rows = B * H
    positions = rows * block * 4 if planner.cap_layer_share else 0  # w_pos until the layers share weights
    return (math.ceil(code_bits / 8) + _table_bound(rows, _group_widths(planner)) + rows * (block + D) * WEIGHT_DTYPE.itemsize
            + positions)


def fixed_bound(cfg, B: int, H: int, D: int, Dv: int, elem: int) -> int:
    """Most bytes a layer's tail and pending decode sums take between forwards."""
    block = cfg.decode_block
    tail = max(cfg.block_window, cfg.residual) + block
    blocks = math.ceil(tail / block) + 1
    return B * H * tail * (D + Dv) * elem + 4 * (B * H * tail + B * tail + blocks * (B * H * D + B))


def _other_layers(layer, B: int, elem: int) -> int:
    """Most bytes the layers Transformers keeps take (sliding windows at ``sliding_window`` tokens)."""
    tc = layer.text_config
    if tc is None:
        return 0
    compressed = set(_compressed(layer))
    types = layer_types(tc)
    H, D = head_shape(tc)
    total = 0
    for i, t in enumerate(types):
        if i in compressed:
            continue
        window = getattr(tc, "sliding_window", None)
        if t != "sliding_attention" or not window:
            raise ValueError(
                f"`max_cache_bytes` cannot bound layer {i} ({t!r}): it keeps Transformers' own cache, which grows "
                "with the context; a cap needs every layer compressed by RDKV or bounded by a sliding window"
            )
        total += B * H * window * 2 * D * elem
    return total


def _compressed(layer) -> tuple[int, ...]:
    layers = layer.planner.layers
    if layers is not None:
        return layers
    tc = layer.text_config
    return tuple(range(tc.num_hidden_layers)) if tc is not None else (layer.layer_idx,)


def limits(layer) -> tuple[int, int]:
    """``(share, fixed)``: the bytes this layer may hold, and the most its tail and decode sums
    take. Raises ``ValueError`` naming the minimum cap when ``max_cache_bytes`` is below it."""
    B, H, _, D = layer.keys.shape
    Dv = layer.values.shape[-1]
    key = (B, H, D, Dv, layer.keys.dtype)
    cached = getattr(layer, "cap_limits", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cfg = layer.config
    minimum, protected, rate, fixed = _protected(layer)
    layers = _compressed(layer)
    if cfg.max_cache_bytes < minimum:
        raise ValueError(
            f"`max_cache_bytes`={cfg.max_cache_bytes} is below the {minimum} bytes this cache needs for what it always "
            f"keeps (batch {B}: the full-precision tail of up to {max(cfg.block_window, cfg.residual) + cfg.decode_block} "
            f"tokens and the newest decoded block in each of {len(layers)} layers, sliding windows); raise "
            f"`max_cache_bytes` to at least {minimum}, or lower `decode_block` or `residual`"
        )
    spare = cfg.max_cache_bytes - minimum
    share = protected[layer.layer_idx] + int(spare * rate[layer.layer_idx] / max(sum(rate.values()), 1e-30))
    layer.cap_limits = (key, (share, fixed))
    return share, fixed


def _protected(layer):
    """``(minimum, {layer: protected bytes}, {layer: planner rate}, fixed)`` at the layer's batch and dtype."""
    B, H, _, D = layer.keys.shape
    Dv = layer.values.shape[-1]
    planner, elem = layer.planner, layer.keys.element_size()
    fixed = fixed_bound(layer.config, B, H, D, Dv, elem)
    layers = _compressed(layer)
    protected = {i: fixed + block_bound(planner, i, B, H, D, Dv) for i in layers}
    rate = {i: float(sum(t.sum() for t in head_rates(planner, i, H))) for i in layers}
    return sum(protected.values()) + _other_layers(layer, B, elem), protected, rate, fixed


def minimum_bytes(layer) -> int:
    """The smallest ``max_cache_bytes`` a cache of `layer`'s batch and dtype takes (what it always
    keeps: every compressed layer's tail at its largest, its decode sums and newest block, and the
    sliding windows). `layer`: an initialized :class:`~rdkv_hf.cache.RDKVLayer` with ``decode_block``."""
    return _protected(layer)[0]


# -- enforcement ---------------------------------------------------------------------------------


def _newest_block(segments) -> Segment | None:
    decoded = [s for s in segments if s.decoded]
    return decoded[-1] if decoded else None


def enforce(layer) -> None:
    """Re-allocate `layer`'s old part if what it holds could pass its share before the next pack."""
    share, fixed = limits(layer)
    if _held(layer.segments) + fixed <= share:
        return
    newest = _newest_block(layer.segments)
    newest_bytes = 0 if newest is None else packed_nbytes([newest]) + newest.table_nbytes
    headroom = int(HEADROOM * share)
    target = share - fixed - newest_bytes
    # The decoded blocks give way first; the forward segments (the prompt, follow-ups) only when
    # the blocks cannot make room alone.
    forward = [s for s in layer.segments if not s.decoded]
    for with_forward in (False, True) if forward else (True,):
        if not with_forward and packed_nbytes(forward) >= target:
            continue
        for attempt in range(8):
            reallocate(layer, max(target - headroom if attempt == 0 else target, 0) - attempt * (target // 16), with_forward)
            if _held(layer.segments) + fixed <= share:
                return
    raise RuntimeError(f"layer {layer.layer_idx} could not fit its share of `max_cache_bytes` ({share} bytes)")


def _head_widths(h) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v [n], k [D])`` long widths of a packed head's tokens (its order) and channels."""
    v = [torch.full((g.count,), g.bits, dtype=torch.long) for g in h.v_groups]
    v = torch.cat(v) if v else torch.zeros(0, dtype=torch.long)
    k = torch.zeros(h.head_dim, dtype=torch.long)
    order, c0 = h.channel_order().cpu(), 0
    for g in h.k_groups:
        k[order[c0 : c0 + g.count]] = g.bits
        c0 += g.count
    return v, k


class _Part:
    """One segment of the old part after re-allocation: a forward segment, or the merged blocks."""

    def __init__(self, members: list[Segment], rows: list[int]):
        self.members, self.decoded = members, members[0].decoded
        self.k, self.v, self.vw, self.wt, self.kw, self.wch, self.tokens = [], [], [], [], [], [], []
        for r in rows:
            heads = [s.heads[r] for s in members]
            kv = [h.dequantize() for h in heads]
            widths = [_head_widths(h) for h in heads]
            self.k.append(torch.cat([x[0] for x in kv]).cpu())
            self.v.append(torch.cat([x[1] for x in kv]).cpu())
            self.vw.append(torch.cat([w[0] for w in widths]))
            self.wt.append(torch.cat([_weights(h.w_tok, h.n) for h in heads]))
            self.kw.append(torch.stack([w[1] for w in widths]).amax(0))
            n = torch.tensor([float(h.n) for h in heads])
            wch = torch.stack([_weights(h.w_ch, h.head_dim) for h in heads])
            self.wch.append((wch * n[:, None]).sum(0) / n.sum().clamp(min=1))
        self.real = sum(s.real_tokens for s in members)  # [B]


def _weights(w, n: int) -> torch.Tensor:
    return torch.ones(n) if w is None else w.float().cpu()


def reallocate(layer, target: int, forward: bool = True) -> None:
    """Re-pack everything but the newest decoded block of `layer` into at most `target` bytes
    (see the module docstring); with ``forward=False`` only the older decoded blocks, the forward
    segments kept as they are (and their bytes counted in `target`)."""
    planner = layer.planner
    newest = _newest_block(layer.segments)
    kept = [] if forward else [s for s in layer.segments if not s.decoded]
    old = [s for s in layer.segments if s is not newest and (forward or s.decoded)]
    target -= packed_nbytes(kept)
    if not old:
        return
    B, H = old[0].batch, old[0].kv_heads
    # Rows whose heads are the same objects in every old segment (beams) are one row here.
    index: dict[tuple, int] = {}
    row_of = [index.setdefault(tuple(id(s.heads[r]) for s in old), len(index)) for r in range(B * H)]
    rows = [row_of.index(u) for u in range(len(index))]
    history = [s for s in old if s.decoded]
    parts = [_Part([s], rows) for s in old if not s.decoded] + ([_Part(history, rows)] if history else [])
    D, Dv = parts[0].k[0].shape[-1], parts[0].v[0].shape[-1]
    k_rate, v_rate = head_rates(planner, layer.layer_idx, H)
    heads_of = torch.tensor([r % H for r in rows])
    batch_of = [r // H for r in rows]
    tokens = torch.tensor([[float(p.real[b]) for b in batch_of] for p in parts], dtype=torch.float64)  # [P, U]
    # What the new segments hold besides codes: tables and kept weights.
    overhead = sum(_table_bound(B * H, _group_widths(planner)) + sum(len(w) + D for w in p.wt) * WEIGHT_DTYPE.itemsize
                   for p in parts)
    nominal = (tokens * (k_rate[heads_of] * D + v_rate[heads_of] * Dv)).sum()
    f = min(1.0, max(0.0, 8.0 * (target - overhead)) / max(float(nominal), 1e-30))
    v_new = _v_widths(planner, layer.layer_idx, parts, tokens, f * v_rate[heads_of], f * k_rate[heads_of], D, Dv)
    keep = planner.keep_dtype(layer.dtype)
    segments = []
    for p, vw in zip(parts, v_new):
        if all(int((v > 0).sum()) == 0 for v in vw):
            continue  # no row keeps a token: its tables would be all it holds
        kw = _k_widths(planner, layer.layer_idx, p, vw, f * k_rate[heads_of] * D * tokens[parts.index(p)])
        if not p.decoded and all(torch.equal(a, b) for a, b in zip(vw, p.vw)) and all(torch.equal(a, b) for a, b in zip(kw, p.kw)):
            segments.append(p.members[0])  # nothing changed: keep it as it is
            continue
        segments.append(_repack(p, vw, kw, row_of, B, H, keep, layer.keys.device))
    layer.segments = kept + segments + ([newest] if newest is not None else [])
    layer.block_stack, layer.block_stack_key = None, ()  # the old stack would keep the old bytes alive


def _v_widths(planner, layer_idx, parts, tokens, v_rate, k_rate, D, Dv) -> list[list[torch.Tensor]]:
    """New V widths per part and row: one Lagrangian per row over the tokens of every part."""
    U = len(parts[0].vw)
    lengths = [[len(p.vw[u]) for p in parts] for u in range(U)]
    T = max(1, max(sum(n) for n in lengths))
    w = torch.zeros(U, T, dtype=torch.float64)
    old = torch.zeros(U, T, dtype=torch.long)
    for u in range(U):
        w_u = torch.cat([p.wt[u] for p in parts]).double()
        o_u = torch.cat([p.vw[u] for p in parts])
        w[u, : len(w_u)], old[u, : len(o_u)] = w_u, o_u
    valid = old > 0
    total = tokens.sum(0)  # [U]
    if planner.evicts_only:  # a token kept is 16 bits of K and V
        widths, eps = (0, 16), torch.tensor([1.0, 0.0])
        costs = torch.tensor([[0.0, 16.0 * (D + Dv)]], dtype=torch.float64).expand(U, 2)
        budget = (v_rate * Dv + k_rate * D) * total
    else:
        eps_k, eps_v = planner.eps_tables(layer_idx)
        widths = planner.config.widths
        eps = torch.tensor([eps_v[b] for b in widths])
        costs = unit_costs(torch.tensor(widths), torch.full((U,), Dv))
        budget = v_rate * Dv * total
    opt = lagrangian_widths(w.clamp(min=1e-30) * valid, costs, eps, budget, valid=valid)
    new = torch.minimum(torch.tensor(widths)[opt], old)  # no unit gains bits
    out, start = [], [0] * U
    for i in range(len(parts)):
        part = []
        for u in range(U):
            n = lengths[u][i]
            part.append(new[u, start[u] : start[u] + n].clone())
            start[u] += n
        out.append(part)
    return out


def _k_widths(planner, layer_idx, part, vw, k_budget) -> list[torch.Tensor]:
    """New K channel widths of a part's rows over the tokens they keep (never above the old ones)."""
    n_kept = torch.stack([(v > 0).sum() for v in vw])
    if planner.evicts_only:
        return [torch.where(n > 0, kw, torch.zeros_like(kw)) for n, kw in zip(n_kept, part.kw)]
    eps_k, _ = planner.eps_tables(layer_idx)
    w_ch = torch.stack(part.wch).double().clamp(min=1e-30)
    new = channel_widths(w_ch, n_kept, k_budget, planner.config.widths, eps_k)
    return [torch.minimum(a, b) for a, b in zip(new, part.kw)]


def _repack(part: _Part, vw, kw, row_of, B, H, keep_dtype, device) -> Segment:
    """A segment of the part's rows at the new widths (some row keeps a token)."""
    U = len(vw)
    T = max(1, max(len(v) for v in vw))
    D, Dv = part.k[0].shape[-1], part.v[0].shape[-1]
    k = torch.zeros(U, T, D, device=device)
    v = torch.zeros(U, T, Dv, device=device)
    bits = torch.zeros(U, T, dtype=torch.long, device=device)
    weights = torch.zeros(U, T, device=device)
    for u in range(U):
        n = len(vw[u])
        k[u, :n], v[u, :n], bits[u, :n] = part.k[u], part.v[u], vw[u]
        weights[u, : len(part.wt[u])] = part.wt[u]
    heads, buffers = pack_segment(k, v, bits, torch.stack(kw).to(device), keep_dtype)
    attach_weights(heads, bits, weights.reshape(U, 1, T), torch.stack(part.wch).to(device))
    select = torch.tensor(row_of, dtype=torch.long, device=buffers.heads.device)
    return Segment([heads[u] for u in row_of], B, H, part.real.clone(), buffers.select(select), decoded=part.decoded)
