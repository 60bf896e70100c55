"""Compressed decoding: decoded tokens packed in blocks, weighed by the queries after them.

With ``RDKVConfig.decode_block`` set, a layer's full-precision tail is cut into blocks of
``decode_block`` tokens counted from its oldest token. The tail always keeps its newest ``keep =
max(window, residual)`` tokens (``window``: ``RDKVConfig.block_window``, the queries that weigh a
block); once it holds ``decode_block`` more, the oldest block is packed at `budget` as a segment of
its own (``Segment.decoded``), through the planner, allocator and storage the prompt goes through.
So the tail holds ``keep`` to ``keep + decode_block - 1`` tokens between forwards, and stays the
newest tokens (Transformers' masks need it so).

A block's token weights are RDKV's (pooled and carried as for the prompt): the attention it gets
from the last ``window`` queries before it is packed, the queries at tail positions
``keep + (k + 1) * block - window .. keep + (k + 1) * block - 1`` for block ``k`` (with no residual,
the ``window`` queries right after it), plus a prior for the queries yet to come: how far each key
points from the block's mean key (``RDKVConfig.decode_novelty``, :func:`~rdkv_hf.allocate.add_novelty`). Every forward
adds its queries' attention to those sums as it goes (``[B, kv_heads, tail]`` floats and a
``[B, kv_heads, head_dim]`` sum of squared queries per pending block for the channel weights), so
nothing but the sums is kept of past queries, and packing costs one block's allocation once per
``decode_block`` steps.

Decoded segments are attended together in one kernel call (:mod:`rdkv_hf.stacked`).
Under ``max_cache_bytes`` each pack is followed by :func:`rdkv_hf.cache_cap.enforce`.

The state lives on the layer as plain tensors (``block_mass``, ``block_seen``, ``block_qsq``,
``block_nq``) so that beam search reorders it with the rest (:func:`select_state`).
"""

from __future__ import annotations

import functools
import math

import torch

from . import cache_cap
from .allocate import cap_logits, pool_weights
from .stacked import StackedSegment, stack_segments

STATE = ("block_mass", "block_seen", "block_qsq", "block_nq")


def check_latent(cfg, latent, model_type: str) -> None:
    """Refuse `decode_block` and an explicit `observe` where decoded queries cannot weigh tokens yet:
    a latent cache (`latent`, from ``model_patches.latent_attention``: DeepSeek's MLA since
    Transformers 5), whose tokens would be scored with un-absorbed queries. (With ``observe=None``,
    the default, a latent layer packs its prompt at its own forward.)"""
    if latent is None:
        return
    if cfg.decode_block is not None:
        raise ValueError(
            f"`decode_block` ({cfg.decode_block}) is not supported on {model_type}'s latent (MLA) cache yet; "
            "leave decode_block=None there (the prompt is still compressed)"
        )
    if cfg.observe:
        raise ValueError(
            f"`observe` ({cfg.observe}) is not supported on {model_type}'s latent (MLA) cache yet; leave observe=None "
            "(or 0) there: the prompt is then packed at its own forward"
        )


def init_state(layer) -> None:
    """No decode state yet (a new or reset layer)."""
    for name in STATE:
        setattr(layer, name, None)
    layer.block_stack = None
    layer.block_stack_key = ()


def keep_tokens(cfg) -> int:
    """Tokens the tail always keeps in full precision: ``max(block_window, residual)``."""
    return max(cfg.block_window, cfg.residual)


def after_forward(layer, query: torch.Tensor, mask, scaling: float, lse, compressed: bool, softcap: float | None = None) -> None:
    """What a layer with ``decode_block`` does after attending: sum the new queries' attention
    into its pending blocks, pack every block that is due, keep the cap.

    Args:
        query: ``[B, Hq, q, D]`` the forward's queries; mask: its attention mask over the tail
            (None: causal); lse: ``[B, Hq, q]`` their log-sum-exp over the whole cache when
            :func:`~rdkv_hf.attention.attend` computed it (None: the tail is everything).
        compressed: the forward packed every tail token but the newest ``residual`` (a prompt or
            follow-up), so the tail is new and its queries weigh nothing pending.
        softcap: the model's logit cap (None: none). Sinks need nothing here: `lse` counts them,
            and a model with sinks always has it (its attention runs in :func:`attend` or eager form).
    """
    if compressed:
        _reset(layer)
    else:  # a decode step, or a forward left in full precision (shorter than `min_tokens`)
        if layer.block_mass is None:
            _reset(layer)
        _grow(layer)
        _accumulate(layer, query, mask, scaling, lse, softcap)
    packed = _pack_due(layer, mask)
    if layer.config.max_cache_bytes is not None and (packed or compressed):
        cache_cap.enforce(layer)


def _reset(layer) -> None:
    B, H, n, D = layer.keys.shape
    dev = layer.keys.device
    layer.block_mass = torch.zeros(B, H, n, device=dev)
    layer.block_seen = torch.zeros(B, n, device=dev)
    layer.block_qsq = torch.zeros(B, H, 0, D, device=dev)
    layer.block_nq = torch.zeros(B, 0, device=dev)


def _grow(layer) -> None:
    """Zero sums for the tokens this forward appended to the tail. The token sums are allocated
    for the longest tail between forwards (``keep + decode_block``) at once, so that a decode step
    does not copy them; the slots past the tail stay zero until its tokens arrive."""
    n = layer.keys.shape[-2]
    have = layer.block_mass.shape[-1]
    if n > have:
        extra = max(n, keep_tokens(layer.config) + layer.config.decode_block) - have
        layer.block_mass = torch.cat([layer.block_mass, layer.block_mass.new_zeros(*layer.block_mass.shape[:2], extra)], -1)
        layer.block_seen = torch.cat([layer.block_seen, layer.block_seen.new_zeros(layer.block_seen.shape[0], extra)], -1)


def visible_rows(mask, B: int, q: int, n: int, rows: torch.Tensor, device) -> torch.Tensor:
    """``[B, len(rows), n]`` bool: which tail token the queries `rows` (indices among the forward's
    `q` queries, the last `q` of `n` tail positions) see; `mask` bool, additive float or None."""
    if mask is None:
        pos = rows.to(device)[:, None] + (n - q)
        return (torch.arange(n, device=device)[None, :] <= pos).expand(B, len(rows), n)
    m = mask[:, 0].index_select(1, rows.to(mask.device))
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(B, len(rows), n)


def _window_blocks(cfg, n: int, q: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """``((block k, indices of the forward's queries in k's window, consecutive), ...)`` for a
    forward whose `q` queries are the last of `n` tail positions."""
    return _windows(cfg.decode_block, cfg.block_window, keep_tokens(cfg), n, q)


@functools.lru_cache(maxsize=256)  # every layer of a step asks the same
def _windows(block: int, window: int, keep: int, n: int, q: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    out: dict[int, list[int]] = {}
    for j in range(q):
        p = n - q + j
        k = math.ceil((p - keep + 1) / block) - 1
        if k >= 0 and keep + (k + 1) * block - 1 - p < window:
            out.setdefault(k, []).append(j)
    return tuple((k, tuple(js)) for k, js in out.items())


def _accumulate(layer, query: torch.Tensor, mask, scaling: float, lse, softcap: float | None) -> None:
    keys = layer.keys
    B, Hq, q, D = query.shape
    Hkv, n = keys.shape[1], keys.shape[2]
    g = Hq // Hkv
    block = layer.config.decode_block
    for k, js in _window_blocks(layer.config, n, q):
        W, j0 = len(js), js[0]  # a window's queries are consecutive
        # [B, Hkv, g * W, D] (4-d: a 5-d broadcast matmul costs more than twice as much per step)
        qw = query[:, :, j0 : j0 + W].float().reshape(B, Hkv, g * W, D)
        lo, hi = k * block, (k + 1) * block
        logits = cap_logits((qw * scaling) @ keys[:, :, lo:hi].float().transpose(-1, -2), softcap)  # [B, Hkv, g * W, block]
        if mask is None and lse is not None:
            # Causal, the common decode step: a window's queries come after its block (the tail keeps
            # at least `block_window` tokens), so each sees the whole block and is a real query.
            mass = (logits - lse[:, :, j0 : j0 + W].float().reshape(B, Hkv, g * W, 1)).exp_().sum(2)
            seen, qsq, nq = W, qw.square().sum(2), W
        else:
            logits = logits.reshape(B, Hkv, g, W, block)
            qw = qw.reshape(B, Hkv, g, W, D)
            vis = visible_rows(mask, B, q, n, torch.tensor(js, dtype=torch.long), query.device)  # [B, W, n]
            if lse is not None:
                norm = lse[:, :, j0 : j0 + W].float().reshape(B, Hkv, g, W, 1)
            else:  # no packed tokens: the softmax runs over the tail alone
                full = cap_logits((qw * scaling) @ keys.float()[:, :, None].transpose(-1, -2), softcap)
                norm = torch.logsumexp(full.masked_fill(~vis[:, None, None], -math.inf), -1, keepdim=True)
            visible = vis[:, :, lo:hi]  # [B, W, block]
            mass = (torch.exp(logits - norm).nan_to_num_(0.0) * visible[:, None, None]).sum((2, 3))
            seen = visible.sum(1).float()
            q_real = vis.any(-1).float()  # [B, W]
            qsq, nq = (qw.square() * q_real[:, None, None, :, None]).sum((2, 3)), q_real.sum(1)  # [B, Hkv, D], [B]
        while layer.block_qsq.shape[2] <= k:
            layer.block_qsq = torch.cat([layer.block_qsq, layer.block_qsq.new_zeros(B, Hkv, 1, D)], 2)
            layer.block_nq = torch.cat([layer.block_nq, layer.block_nq.new_zeros(B, 1)], 1)
        # In place: the state is this layer's own (a fork clones it, a batch reorder selects a copy).
        _writable(layer)
        # `.add_` on the views, not `x[i] += y` (which copies the sum back through `__setitem__`).
        layer.block_mass[:, :, lo:hi].add_(mass)
        layer.block_seen[:, lo:hi].add_(seen)
        layer.block_qsq[:, :, k].add_(qsq)
        layer.block_nq[:, k].add_(nq)


def _writable(layer) -> None:
    """Clone the state tensors made under ``torch.inference_mode`` when this forward runs outside it
    (a prompt under inference mode, then ``generate()`` under ``no_grad``): torch refuses to change
    an inference tensor in place there."""
    if not torch.is_inference_mode_enabled():
        for name in STATE:
            t = getattr(layer, name)
            if t.is_inference():
                setattr(layer, name, t.clone())


def _pack_due(layer, mask) -> bool:
    """Pack the oldest block while the tail holds ``decode_block`` tokens beyond ``keep``."""
    cfg = layer.config
    block, keep = cfg.decode_block, keep_tokens(cfg)
    packed = False
    while layer.keys.shape[-2] >= block + keep:
        n = layer.keys.shape[-2]
        seen = layer.block_seen[:, :block]
        assert bool((layer.block_nq[:, :1] > 0).all()), "a decode block is due before any query of its window"
        real = seen > 0  # a token no window query sees is padding
        kb = layer.keys[:, :, :block].float()
        w_tok = pool_weights(layer.block_mass[:, :, :block], seen, cfg.pool_kernel, cfg.pool, cfg.carry)
        w_tok = layer.planner.block_weights(w_tok, kb, real)
        q2 = layer.block_qsq[:, :, 0] / layer.block_nq[:, 0].clamp(min=1)[:, None, None]
        rm = real[:, None, :, None].float()
        k2 = (kb.square() * rm).sum(2) / rm.sum(2).clamp(min=1)
        layer.compress_tail(n, w_tok, q2 * k2, real, keep_last=n - block, decoded=True)
        layer.block_mass = layer.block_mass[:, :, block:]
        layer.block_seen = layer.block_seen[:, block:]
        layer.block_qsq = layer.block_qsq[:, :, 1:]
        layer.block_nq = layer.block_nq[:, 1:]
        packed = True
    return packed


def attended(layer) -> list:
    """The segments the attention walks: the forward segments as they are, the decoded ones
    stacked into one (rebuilt when they change)."""
    decoded = [s for s in layer.segments if s.decoded]
    if len(decoded) < 2:
        return layer.segments
    key = tuple(id(s) for s in decoded)
    if layer.block_stack is None or layer.block_stack_key != key:
        layer.block_stack = stack_segments(decoded)
        layer.block_stack_key = key
    return [s for s in layer.segments if not s.decoded] + [layer.block_stack]


def current_stack(layer) -> StackedSegment | None:
    """The stack of the layer's decoded segments if it is up to date (None: rebuilt when attended)."""
    stack = getattr(layer, "block_stack", None)
    return stack if stack is not None and layer.block_stack_key == tuple(id(s) for s in layer.segments if s.decoded) else None


def select_state(layer, index: torch.Tensor, stack: StackedSegment | None) -> None:
    """Reorder the decode state with the batch (beam search, repeats), after the segments were;
    `stack`: :func:`current_stack` before they were."""
    select_named(layer, STATE, index)
    layer.block_stack = None if stack is None else stack.select(index)
    layer.block_stack_key = tuple(id(s) for s in layer.segments if s.decoded) if stack is not None else ()


def state_nbytes(layer) -> int:
    """Bytes of the decode state: the pending blocks' sums."""
    return named_nbytes(layer, STATE)


def select_named(layer, names, index: torch.Tensor) -> None:
    """Select the batch rows `index` of the layer's tensors `names` (those not None)."""
    for name in names:
        t = getattr(layer, name, None)
        if t is not None:
            setattr(layer, name, t.index_select(0, index.to(t.device)))


def named_nbytes(layer, names) -> int:
    """Bytes of the layer's tensors `names` (those not None)."""
    return sum(t.numel() * t.element_size() for t in (getattr(layer, name, None) for name in names) if t is not None)


def stack_of(layer) -> list:
    """The current stack as a one-element list (none: empty), to count its tables with the segments."""
    stack = current_stack(layer)
    return [] if stack is None else [stack]
