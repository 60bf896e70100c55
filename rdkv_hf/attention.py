"""The attention function registered as ``"rdkv"``.

* A layer without compressed tokens (the prompt's own forward) runs Transformers' sdpa as is, then
  weighs the prompt tokens from the attention of its last queries and compresses the layer, so only
  one layer's full-precision K/V is alive at a time.
* A layer with compressed segments attends over them and the full-precision tail with one softmax:
  each part yields split-K partials ``(max, sum, acc)`` merged by log-sum-exp.

The mask Transformers builds (through the registered sdpa mask) covers only the tail plus the new
tokens (see ``RDKVLayer.get_mask_sizes``); compressed tokens are visible to every later query.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import decode_blocks, quant
from .allocate import channel_weights, token_weights
from .cache import ATTN_NAME, PackedHead, Segment, take_layer
from .overrides import AttentionOverride

logger = logging.getLogger(__name__)


@torch.compiler.disable  # packing and ragged segments run eagerly: torch.compile breaks the graph here
def rdkv_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention interface: ``query [B, Hq, q, D]``, ``key/value [B, Hkv, kv, D]`` (the
    tail returned by the cache). Returns ``([B, q, Hq, D], None)``."""
    layer = take_layer(getattr(module, "layer_idx", None), key)
    if layer is None:  # not an RDKVCache layer (a sliding-window layer, another cache, no cache)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if module.training and dropout > 0:
        raise ValueError("RDKV compresses an inference cache; call model.eval() (attention dropout is on)")
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("RDKV attention does not support attention sinks or logit soft-capping yet")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len = query.shape[2]
    cfg = layer.config
    lse = None
    if layer.segments:
        out, lse = attend(query, decode_blocks.attended(layer), key, value, attention_mask, scaling, backend=cfg.backend)
        out = out.transpose(1, 2).contiguous()
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    compressed = q_len > 1 and (not layer.segments or cfg.compress_followups)
    if compressed:
        compress_layer(layer, query, attention_mask, scaling, lse)
    if cfg.decode_block is not None:
        decode_blocks.after_forward(layer, query, attention_mask, scaling, lse, compressed)
    layer.pending = 0  # a follow-up left in full precision (compress_followups=False) is settled too
    return out, None


def compress_layer(layer, query, mask, scaling, lse=None) -> None:
    """Pack every tail token of `layer` but the newest ``config.residual`` into a new segment,
    weighed by the attention of `query`'s last ``config.window`` queries (the forward that just
    attended, or the last queries a prefill kept). The tail is then always the newest tokens.

    Args:
        query: ``[B, Hq, q, D]``; mask: the forward's attention mask over the tail (or None).
        lse: ``[B, Hq, q]`` log-sum-exp over all cached tokens when segments exist (see :func:`attend`).
    """
    n_tail = layer.keys.shape[-2]
    keep = min(layer.config.residual, n_tail)
    if n_tail > keep:
        w_tok, w_ch, real = prompt_weights(query, layer.keys, mask, scaling, n_tail, layer.config, lse, keep_last=keep)
        layer.compress_tail(n_tail, w_tok, w_ch, real, keep_last=keep)
    layer.pending = 0


def _tail_visibility(mask: torch.Tensor | None, B: int, q: int, kv: int, device) -> torch.Tensor:
    """``[B, q, kv]`` bool: which query sees which tail token (causal, aligned to the end)."""
    if mask is not None:
        if mask.dtype != torch.bool:  # an additive float mask: 0 where visible, the dtype's minimum where not
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask[:, 0].expand(B, q, kv)
    qi = torch.arange(q, device=device)[:, None] + (kv - q)
    return (torch.arange(kv, device=device)[None, :] <= qi).expand(B, q, kv)


def prompt_weights(query, key, mask, scaling, n_new, cfg, lse=None, keep_last: int = 0):
    """RDKV weights of the last `n_new` tail tokens but the newest `keep_last` (those stay in the
    tail), from the attention of the last ``cfg.window`` queries (pooled over all `n_new` and
    carried as :func:`~rdkv_hf.allocate.token_weights` with `cfg`'s settings).

    Args:
        query: ``[B, Hq, q, D]``; key: ``[B, Hkv, kv, D]`` (tail incl. the new tokens).
        cfg: the :class:`~rdkv_hf.RDKVConfig` (``window``, ``pool_kernel``, ``pool``, ``carry``).
        lse: ``[B, Hq, q]`` log-sum-exp of the queries over all cached tokens, when compressed
            segments exist (their mass is part of the softmax); None: the tail is everything.
    Returns:
        ``(w_tok [B, Hkv, n], w_ch [B, Hkv, D], real [B, n])`` with ``n = n_new - keep_last``.
    """
    B, Hq, q, D = query.shape
    Hkv, kv = key.shape[1], key.shape[2]
    g = Hq // Hkv
    W = min(cfg.window, q)
    if mask is None:
        # Causal without padding: every new token is real; build only the window's rows (the full
        # [q, kv] visibility is q * kv bools, 64 MiB at 8K tokens, for nothing).
        qi = torch.arange(q - W, q, device=query.device)[:, None] + (kv - q)
        vis = (torch.arange(kv, device=query.device)[None, :] <= qi).expand(B, W, kv)
        real = torch.ones(B, n_new, dtype=torch.bool, device=query.device)
        q_real = torch.ones(B, W, dtype=torch.bool, device=query.device)
    else:
        vis_all = _tail_visibility(mask, B, q, kv, query.device)  # [B, q, kv]
        real = vis_all[:, :, kv - n_new :].any(1)  # a token nobody sees is padding
        q_real = real[:, n_new - W :] if W <= n_new else vis_all[:, -W:].any(-1)
        vis = vis_all[:, q - W :, :]  # [B, W, kv]
    qw = query[:, :, q - W :].float().reshape(B, Hkv, g, W, D)
    logits = (qw * scaling) @ key.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, g, W, kv]
    logits = logits.masked_fill(~vis[:, None, None], -math.inf)
    if lse is None:
        norm = torch.logsumexp(logits, -1, keepdim=True)
    else:
        norm = lse[:, :, q - W :].reshape(B, Hkv, g, W, 1).float()
    probs = torch.exp(logits - norm).nan_to_num_(0.0)[..., kv - n_new :]
    n = n_new - keep_last
    w_tok = token_weights(probs, vis[:, :, kv - n_new :], cfg.pool_kernel, cfg.pool, cfg.carry)[..., :n]
    real = real[:, :n]
    w_ch = channel_weights(qw, q_real, key[:, :, kv - n_new : kv - keep_last].float(), real)
    return w_tok, w_ch, real


# -- attention over packed segments + tail -------------------------------------------------------


def head_partials_reference(head: PackedHead, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-K partials of ``q [G, D]`` (already scaled) over one packed head, in plain torch.

    K dequantization is folded into the query (``q . (s*c + m) = (q*s) . c + q . m``) and V's into
    the probabilities, so no dequantized K or V tile is formed beyond one width group's codes.
    Returns ``(max [G], sum [G], acc [G, D])``.
    """
    G, D = q.shape
    if head.n == 0:
        return q.new_full((G,), -math.inf), q.new_zeros(G), q.new_zeros(G, D)
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
    m = logits.amax(-1)
    p = torch.exp(logits - m[:, None])
    acc = q.new_zeros(G, D)
    t0 = 0
    for g in head.v_groups:
        pg = p[:, t0 : t0 + g.count]
        t0 += g.count
        if g.bits == 16:
            acc += pg @ g.data.float()
        else:
            codes = quant.unpack(g.data, g.bits, D).float()  # [n_w, D]
            acc += (pg * g.scale.float()) @ codes + (pg @ g.minimum.float())[:, None]
    return m, p.sum(-1), acc


def segment_partials(seg: Segment, qf: torch.Tensor, backend: str = "torch"):
    """Partials of ``qf [B, Hkv, G, D]`` (float32, scaled) over a segment.

    Args:
        backend: ``"torch"`` (the reference, head by head), ``"cpu"`` (the C++ kernel) or
            ``"triton"`` (the Triton kernel); see :func:`resolve_backend` for ``"auto"``.
    Returns:
        ``(max [B, Hkv, G], sum [B, Hkv, G], acc [B, Hkv, G, D])``.
    """
    B, H, G, D = qf.shape
    if backend == "torch":
        parts = [head_partials_reference(seg.heads[b * H + h], qf[b, h]) for b in range(B) for h in range(H)]
        m = torch.stack([p[0] for p in parts]).reshape(B, H, G)
        l = torch.stack([p[1] for p in parts]).reshape(B, H, G)
        acc = torch.stack([p[2] for p in parts]).reshape(B, H, G, D)
        return m, l, acc
    q = qf.reshape(B * H, G, D).contiguous()
    if backend == "cpu":
        from .kernels import cpu_decode

        m, l, acc = cpu_decode.segment_partials(seg.buffers, q)
    elif backend == "triton":
        from .kernels import decode_partials

        m, l, acc = decode_partials.segment_partials(seg.buffers, q)
    else:
        raise ValueError(f"`backend` must be 'torch', 'cpu' or 'triton' here, got {backend!r}")
    return m.reshape(B, H, G), l.reshape(B, H, G), acc.reshape(B, H, G, D)


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


def attend(query, segments, tail_k, tail_v, mask, scaling, backend="torch"):
    """One softmax over packed segments and the dense tail.

    Args:
        query: ``[B, Hq, q, D]``; tail_k/tail_v: ``[B, Hkv, n_tail, D]``; mask: ``[B, 1, q, n_tail]``
            bool (or additive float) or None (causal within the new tokens).
    Returns:
        ``(out [B, Hq, q, D] in query's dtype, lse [B, Hq, q] float32)``.
    """
    B, Hq, q, D = query.shape
    Hkv, n_tail = tail_k.shape[1], tail_k.shape[2]
    g = Hq // Hkv
    qf = (query.float() * scaling).reshape(B, Hkv, g * q, D)
    backend = resolve_backend(backend, query.device)
    parts = [decode_blocks.stack_partials(s, qf, lambda seg, q: segment_partials(seg, q, backend)) if decode_blocks.is_stack(s)
             else segment_partials(s, qf, backend) for s in segments]
    if n_tail:
        logits = qf @ tail_k.float().transpose(-1, -2)  # [B, Hkv, g*q, n_tail]
        vis = _tail_visibility(mask, B, q, n_tail, query.device)  # [B, q, n_tail]
        vis = vis[:, None, None].expand(B, 1, g, q, n_tail).reshape(B, 1, g * q, n_tail)
        logits = logits.masked_fill(~vis, -math.inf)
        m = logits.amax(-1)
        p = torch.exp(logits - m.unsqueeze(-1).clamp(min=torch.finfo(logits.dtype).min)).nan_to_num_(0.0)
        parts.append((m, p.sum(-1), p @ tail_v.float()))
    M = torch.stack([p[0] for p in parts]).amax(0)
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    L = torch.zeros_like(M)
    acc = torch.zeros(B, Hkv, g * q, D, device=query.device)
    for m, l, a in parts:
        f = torch.exp(m - M_safe).nan_to_num_(0.0)
        L += l * f
        acc += a * f.unsqueeze(-1)
    out = acc / L.clamp(min=1e-30).unsqueeze(-1)
    lse = M_safe + torch.log(L.clamp(min=1e-30))
    return out.reshape(B, Hq, q, D).to(query.dtype), lse.reshape(B, Hq, q)


RDKV_ATTENTION = AttentionOverride(ATTN_NAME, rdkv_attention_forward)  # what rdkv_hf.patch switches a model to
