"""The attention function registered as ``"rdkv"``.

* A layer without compressed tokens (the prompt's own forward) runs Transformers' sdpa as is, then
  weighs the prompt tokens from the attention of its last queries and compresses the layer, so only
  one layer's full-precision K/V is alive at a time.
* A layer with compressed segments attends over them and the full-precision tail with one softmax:
  each part yields split-K partials ``(max, sum, acc)`` merged by log-sum-exp.

The mask Transformers builds (through the registered sdpa mask) covers only the tail plus the new
tokens (see ``RDKVLayer.get_mask_sizes``); compressed tokens are visible to every later query.

What differs between architectures reaches every path here (the torch reference, the C++ and
Triton kernels, the prompt's scoring): ``softcap`` (Gemma 2) caps the scaled logits at
``softcap * tanh(x / softcap)``; ``s_aux`` (GPT-OSS) adds one sink logit per query head to the
softmax's denominator, merged as one more split-K partial; K and V may have different widths.
Transformers' sdpa serves neither softcap nor sinks, so a forward that has them attends here in
float32 (as eager does, though ``DENSE_CHUNK`` queries at a time).
"""

from __future__ import annotations

import logging
import math

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import decode_blocks, observe, quant
from .allocate import cap_logits
from .cache import ATTN_NAME, PackedHead, Segment, take_layer
from .overrides import AttentionOverride
from .scoring import _tail_visibility, prompt_sums, prompt_weights  # noqa: F401 (prompt_weights: timed by bench_decode)
from .stacked import stacked_partials

logger = logging.getLogger(__name__)

DENSE_CHUNK = 1024  # queries at a time where sdpa cannot serve: their float32 logits are [B, Hq, 1024, kv]


@torch.compiler.disable  # packing and ragged segments run eagerly: torch.compile breaks the graph here
def rdkv_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention interface: ``query [B, Hq, q, D]``, ``key [B, Hkv, kv, D]``, ``value
    [B, Hkv, kv, Dv]`` (the tail returned by the cache); ``softcap`` and ``s_aux [Hq]`` in `kwargs`
    where the model passes them. Returns ``([B, q, Hq, Dv], None)``."""
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    plain = softcap is None and sinks is None  # what Transformers' sdpa serves
    layer = take_layer(getattr(module, "layer_idx", None), key)
    if layer is None and plain:  # not an RDKVCache layer (a sliding-window layer, another cache, no cache)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if module.training and dropout > 0:
        raise ValueError("RDKV compresses an inference cache; call model.eval() (attention dropout is on)")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is None:  # as above, with soft-capping or sinks
        out, _ = dense_attention(query, key, value, attention_mask, scaling, softcap, sinks)
        return out.transpose(1, 2).contiguous(), None
    q_len = query.shape[2]
    cfg = layer.config
    # A latent cache (DeepSeek's MLA) is attended in its absorbed form; others as they are. Before
    # any segment, only the scoring window's queries are absorbed (all of them: [B, H, q, r] float32).
    latent = layer.latent
    if latent is None:
        q_at, k_at, v_at = query, key, value
    else:
        q_at = latent.query(module, query if layer.segments else query[:, :, -min(cfg.window, q_len) :])
        k_at, v_at = latent.keys_values(layer)
    lse = None
    waiting = observe.waiting(layer)
    if layer.segments:
        # what compress_layer, the decode blocks and the tokens waiting for decoded queries read
        with_lse = q_len > 1 or cfg.decode_block is not None or waiting
        out, lse = attend(q_at, decode_blocks.attended(layer), k_at, v_at, attention_mask, scaling, cfg.backend, softcap, sinks,
                          with_lse=with_lse)
        out = (out if latent is None else latent.output(module, out)).to(query.dtype).transpose(1, 2).contiguous()
    elif not plain or (waiting and q_len > 1):  # a multi-token forward packing waiting tokens reads its lse
        out, lse = dense_attention(query, key, value, attention_mask, scaling, softcap, sinks)
        out = out.transpose(1, 2).contiguous()
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    released = observe.after_forward(layer, q_at, attention_mask, scaling, lse, softcap, sinks) if waiting else 0
    if released:  # the oldest `released` tail tokens are packed now: the rest is the tail
        k_at = layer.keys
        attention_mask = None if attention_mask is None else attention_mask[..., released:]
    compressed = q_len > 1 and (not layer.segments or cfg.compress_followups)
    if compressed:
        compressed = compress_layer(layer, q_at, attention_mask, scaling, lse, keys=k_at, softcap=softcap, sinks=sinks, q_len=q_len)
    if cfg.decode_block is not None and not observe.waiting(layer):
        decode_blocks.after_forward(layer, query, attention_mask, scaling, lse, compressed or released > 0, softcap=softcap)
    layer.pending = 0  # a follow-up left in full precision (compress_followups=False) is settled too
    return out, None


def compress_layer(layer, query, mask, scaling, lse=None, *, keys=None, softcap=None, sinks=None, q_len=None) -> bool:
    """Pack every tail token of `layer` but the newest ``config.residual`` into a new segment,
    weighed by the attention of `query`'s last ``config.window`` queries (the forward that just
    attended, or the last queries a prefill kept), if they are at least ``config.min_tokens``.
    The tail is then always the newest tokens. Returns whether it packed; with ``config.waits_for``
    the tokens wait for decoded queries instead (:mod:`rdkv_hf.observe`) and it returns False.

    Args:
        query: ``[B, Hq, q, D]``; mask: the forward's attention mask over the tail (or None).
        lse: ``[B, Hq, q]`` log-sum-exp over all cached tokens when :func:`attend` computed it.
        keys: the tail's keys as attended (default ``layer.keys``; a latent layer's absorbed ones).
        softcap, sinks, q_len: as :func:`prompt_weights` takes them.
    """
    keys = layer.keys if keys is None else keys
    n_tail = keys.shape[-2]
    keep = min(layer.config.residual, n_tail)
    layer.pending = 0
    if n_tail - keep < max(layer.config.min_tokens, 1):
        return False
    # Packed after the first decoded queries add theirs; a latent (MLA) layer packs at once (its
    # decoded queries are not absorbed for scoring: an explicit `observe` is refused at patch time).
    if layer.latent is None and layer.config.observes(n_tail - keep):
        observe.start(layer, prompt_sums(query, keys, mask, scaling, n_tail, layer.config, lse, softcap, sinks, q_len), n_tail - keep)
        return False
    w_tok, w_ch, real = prompt_weights(query, keys, mask, scaling, n_tail, layer.config, lse, softcap, sinks, q_len=q_len,
                                       keep_last=keep)
    layer.compress_tail(n_tail, w_tok, w_ch, real, keep_last=keep)
    return True


def sink_logits(sinks: torch.Tensor, kv_heads: int, q_len: int) -> torch.Tensor:
    """``[kv_heads, group * q_len]`` float32: the sink logit of each query row as :func:`attend`
    lays them out (rows of one KV head: its group's query heads, each over the `q_len` queries)."""
    g = sinks.shape[0] // kv_heads
    return sinks.float().reshape(kv_heads, g, 1).expand(kv_heads, g, q_len).reshape(kv_heads, g * q_len)


# -- attention over packed segments + tail -------------------------------------------------------


def head_partials_reference(head: PackedHead, q: torch.Tensor, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-K partials of ``q [G, D]`` (already scaled) over one packed head, in plain torch.

    K dequantization is folded into the query (``q . (s*c + m) = (q*s) . c + q . m``) and V's into
    the probabilities, so no dequantized K or V tile is formed beyond one width group's codes.
    `softcap` caps each logit after it (Gemma 2). Returns ``(max [G], sum [G], acc [G, Dv])``.
    """
    G, Dv = q.shape[0], head.v_dim
    if head.n == 0:
        return q.new_full((G,), -math.inf), q.new_zeros(G), q.new_zeros(G, Dv)
    qp = q if head.k_perm is None else q[:, head.k_perm.long()]
    logits = q.new_zeros(G, head.n)
    c0 = 0
    for g in head.k_groups:
        qs = qp[:, c0 : c0 + g.count]
        c0 += g.count
        if g.bits == 16:
            logits += qs @ g.data.float()
        else:
            codes = quant.unpack(g.data, g.bits, head.n).float()  # [c, n]
            logits += (qs * g.scale.float()) @ codes + (qs @ g.minimum.float())[:, None]
    logits = cap_logits(logits, softcap)
    m = logits.amax(-1)
    p = torch.exp(logits - m[:, None])
    acc = q.new_zeros(G, Dv)
    t0 = 0
    for g in head.v_groups:
        pg = p[:, t0 : t0 + g.count]
        t0 += g.count
        if g.bits == 16:
            acc += pg @ g.data.float()
        else:
            codes = quant.unpack(g.data, g.bits, Dv).float()  # [n_w, Dv]
            acc += (pg * g.scale.float()) @ codes + (pg @ g.minimum.float())[:, None]
    return m, p.sum(-1), acc


def segment_partials(seg: Segment, qf: torch.Tensor, backend: str = "torch", softcap: float | None = None):
    """Partials of ``qf [B, Hkv, G, D]`` (float32, scaled) over a segment, or over a stack of
    segments (:class:`~rdkv_hf.stacked.StackedSegment`) merged per row.

    Args:
        backend: ``"torch"`` (the reference, head by head), ``"cpu"`` (the C++ kernel) or
            ``"triton"`` (the Triton kernel); see :func:`resolve_backend` for ``"auto"``.
        softcap: the logit cap (None: none).
    Returns:
        ``(max [B, Hkv, G], sum [B, Hkv, G], acc [B, Hkv, G, Dv])``.
    """
    if getattr(seg, "stacked", 1) > 1 and backend == "torch":  # the kernels merge a stack's members themselves
        return stacked_partials(seg, qf, lambda s, q: _partials(s, q, backend, softcap))
    return _partials(seg, qf, backend, softcap)


def _partials(seg: Segment, qf: torch.Tensor, backend: str, softcap: float | None):
    """:func:`segment_partials` of one segment (or of a stack, with a kernel)."""
    B, H, G, D = qf.shape
    Dv = seg.buffers.v_dim
    if backend == "torch":
        parts = [head_partials_reference(seg.heads[b * H + h], qf[b, h], softcap) for b in range(B) for h in range(H)]
        m = torch.stack([p[0] for p in parts]).reshape(B, H, G)
        l = torch.stack([p[1] for p in parts]).reshape(B, H, G)
        acc = torch.stack([p[2] for p in parts]).reshape(B, H, G, Dv)
        return m, l, acc
    q = qf.reshape(B * H, G, D).contiguous()
    if backend == "cpu":
        from .kernels import cpu_decode

        m, l, acc = cpu_decode.segment_partials(seg.buffers, q, softcap=softcap, members=getattr(seg, "stacked", 1))
    elif backend == "triton":
        from .kernels import decode_partials

        m, l, acc = decode_partials.segment_partials(seg.buffers, q, softcap=softcap, members=getattr(seg, "stacked", 1))
    else:
        raise ValueError(f"`backend` must be 'torch', 'cpu' or 'triton' here, got {backend!r}")
    return m.reshape(B, H, G), l.reshape(B, H, G), acc.reshape(B, H, G, Dv)


_resolved: dict = {}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The decode path for `backend` on `device`: ``"auto"`` picks the C++ kernel on the CPU and
    Triton on CUDA when they are available, else the torch reference; logged once per choice."""
    if backend != "auto":
        return backend
    key = device.type
    if key not in _resolved:
        choice, why = "torch", ""
        if device.type == "cpu":
            from .kernels import cpu_decode

            if cpu_decode.available():
                choice = "cpu"
            else:
                why = f" (C++ kernel unavailable: {cpu_decode.unavailable_reason()})"
        elif device.type == "cuda":
            from .kernels import triton_available

            if triton_available():
                choice = "triton"
            else:
                why = " (triton is not installed)"
        logger.info("rdkv_hf: decode backend 'auto' on %s uses %r%s", device.type, choice, why)
        _resolved[key] = choice
    return _resolved[key]


def dense_attention(query, key, value, mask, scaling, softcap=None, sinks=None):
    """:func:`attend` over keys and values alone (a forward before any segment, or a layer RDKV does
    not compress) for a model that soft-caps or has sinks, ``DENSE_CHUNK`` queries at a time.

    Returns ``(out [B, Hq, q, Dv], lse [B, Hq, q])``."""
    B, _, q, _ = query.shape
    kv = key.shape[2]
    if q <= DENSE_CHUNK:
        return attend(query, [], key, value, mask, scaling, softcap=softcap, sinks=sinks)
    parts = []
    for i in range(0, q, DENSE_CHUNK):
        j = min(q, i + DENSE_CHUNK)
        if mask is None:  # causal: the last query sees up to the last key
            rows = torch.arange(i, j, device=query.device)[:, None] + (kv - q)
            chunk_mask = (torch.arange(kv, device=query.device)[None, :] <= rows).expand(B, 1, j - i, kv)
        else:
            chunk_mask = mask[:, :, i:j]
        parts.append(attend(query[:, :, i:j], [], key, value, chunk_mask, scaling, softcap=softcap, sinks=sinks))
    return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


def attend(query, segments, tail_k, tail_v, mask, scaling, backend="torch", softcap=None, sinks=None, with_lse=True):
    """One softmax over packed segments, the dense tail and the sinks.

    Args:
        query: ``[B, Hq, q, D]``; tail_k: ``[B, Hkv, n_tail, D]``; tail_v: ``[B, Hkv, n_tail, Dv]``;
            mask: ``[B, 1, q, n_tail]`` bool (or additive float) or None (causal within the new tokens).
        softcap: the logit cap (None: none); sinks: ``[Hq]`` sink logits (None: none).
        with_lse: also return the log-sum-exp (a plain decode step has no use for it).
    Returns:
        ``(out [B, Hq, q, Dv] in query's dtype, lse [B, Hq, q] float32 or None)``.
    """
    B, Hq, q, D = query.shape
    Hkv, n_tail, Dv = tail_k.shape[1], tail_k.shape[2], tail_v.shape[-1]
    g = Hq // Hkv
    qf = (query.float() * scaling).reshape(B, Hkv, g * q, D)
    backend = resolve_backend(backend, query.device)
    parts = [segment_partials(s, qf, backend, softcap) for s in segments]
    if sinks is not None:  # one more logit per query row, with no value: mass (1 at max s) and no output
        s = sink_logits(sinks, Hkv, q).to(query.device).expand(B, Hkv, g * q)
        parts.append((s, torch.ones_like(s), None))
    # One log-sum-exp merge, in as few operators as the parts allow (on a GPU each is a launch):
    # the tail's probabilities are taken against the global max directly, and a row that sees
    # nothing (max -inf everywhere) gets max 0, so no exp below meets -inf - -inf.
    M = logits = None
    if n_tail:
        logits = cap_logits(qf @ tail_k.float().transpose(-1, -2), softcap)  # [B, Hkv, g*q, n_tail]
        if mask is not None or q > 1:  # one query without a mask sees the whole tail
            vis = _tail_visibility(mask, B, q, n_tail, query.device)  # [B, q, n_tail]
            vis = vis[:, None, None].expand(B, 1, g, q, n_tail).reshape(B, 1, g * q, n_tail)
            logits = logits.masked_fill(~vis, -math.inf)
        M = logits.amax(-1)
    for m, _, _ in parts:
        M = m if M is None else torch.maximum(M, m)
    M = M.nan_to_num(neginf=0.0)
    L = acc = None
    if n_tail:
        p = torch.exp(logits - M.unsqueeze(-1))
        L, acc = p.sum(-1), p @ tail_v.float()
    for m, l, a in parts:
        f = torch.exp(m - M)
        L = l * f if L is None else torch.addcmul(L, l, f)
        if a is not None:
            acc = a * f.unsqueeze(-1) if acc is None else torch.addcmul(acc, a, f.unsqueeze(-1))
    if acc is None:  # sinks alone
        acc = qf.new_zeros(B, Hkv, g * q, Dv)
    L = L.clamp(min=1e-30)
    out = (acc / L.unsqueeze(-1)).reshape(B, Hq, q, Dv).to(query.dtype)
    return out, (M + torch.log(L)).reshape(B, Hq, q) if with_lse else None


RDKV_ATTENTION = AttentionOverride(ATTN_NAME, rdkv_attention_forward)  # what rdkv_hf.patch switches a model to
