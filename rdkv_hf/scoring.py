"""How a forward's queries weigh the tokens they attend: RDKV's token and channel weights.

The last ``window`` queries of a forward score the tokens of its tail (:func:`prompt_weights`). Their
attention is kept as sums (:class:`WindowSums`), so that later queries can add theirs before the tokens
are packed (:mod:`rdkv_hf.observe`); :func:`weights_from_sums` turns sums into weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .allocate import cap_logits, channel_weights_of, pool_weights


def _tail_visibility(mask: torch.Tensor | None, B: int, q: int, kv: int, device) -> torch.Tensor:
    """``[B, q, kv]`` bool: which query sees which tail token (causal, aligned to the end)."""
    if mask is not None:
        if mask.dtype != torch.bool:  # an additive float mask: 0 where visible, the dtype's minimum where not
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask[:, 0].expand(B, q, kv)
    qi = torch.arange(q, device=device)[:, None] + (kv - q)
    return (torch.arange(kv, device=device)[None, :] <= qi).expand(B, q, kv)


class WindowSums(NamedTuple):
    """What the queries of a scoring window leave of their attention on ``n`` tokens: ``mass
    [B, Hkv, n]`` (probabilities summed over the queries and the GQA group), ``seen [B, n]`` (how
    many queries see each token), ``qsq [B, Hkv, D]`` (squared queries summed), ``nq [B]`` (how
    many query rows, the group counted) and ``real [B, n]`` (non-padding tokens). Sums, so that
    later queries can add to them (:mod:`rdkv_hf.observe`)."""

    mass: torch.Tensor
    seen: torch.Tensor
    qsq: torch.Tensor
    nq: torch.Tensor
    real: torch.Tensor


def prompt_weights(query, key, mask, scaling, n_new, cfg, lse=None, softcap=None, sinks=None, q_len=None, keep_last: int = 0):
    """RDKV weights of the last `n_new` tail tokens but the newest `keep_last` (those stay in the
    tail), from the attention of the last ``cfg.window`` queries (pooled over all `n_new` and
    carried as :func:`~rdkv_hf.allocate.token_weights` with `cfg`'s settings).

    Args:
        query: ``[B, Hq, q, D]``; key: ``[B, Hkv, kv, D]`` (tail incl. the new tokens).
        cfg: the :class:`~rdkv_hf.RDKVConfig` (``window``, ``pool_kernel``, ``pool``, ``carry``).
        lse: ``[B, Hq, q]`` log-sum-exp of the queries over all cached tokens (sinks included),
            when :func:`attend` computed it (compressed segments exist, or softcap or sinks);
            None: the tail is everything.
        softcap: the model's logit cap (None: none); sinks: ``[Hq]`` sink logits (None: none).
        q_len: the forward's number of queries when `query` holds only the last ``cfg.window`` of
            them (None: all of them).
    Returns:
        ``(w_tok [B, Hkv, n], w_ch [B, Hkv, D], real [B, n])`` with ``n = n_new - keep_last``.
    """
    sums = prompt_sums(query, key, mask, scaling, n_new, cfg, lse, softcap, sinks, q_len)
    return weights_from_sums(sums, key, cfg, keep_last)


def weights_from_sums(sums: WindowSums, key: torch.Tensor, cfg, keep_last: int = 0):
    """:func:`prompt_weights` from the window's sums over the last ``n_new`` tokens of ``key
    [B, Hkv, kv, D]`` (the newest `keep_last` of them stay in the tail)."""
    n_new = sums.mass.shape[-1]
    n = n_new - keep_last
    kv = key.shape[2]
    w_tok = pool_weights(sums.mass, sums.seen, cfg.pool_kernel, cfg.pool, cfg.carry)[..., :n]
    real = sums.real[:, :n]
    w_ch = channel_weights_of(sums.qsq, sums.nq, key[:, :, kv - n_new : kv - keep_last].float(), real)
    return w_tok, w_ch, real


def prompt_sums(query, key, mask, scaling, n_new, cfg, lse=None, softcap=None, sinks=None, q_len=None) -> WindowSums:
    """The :class:`WindowSums` of the last ``cfg.window`` queries over the last `n_new` tail tokens
    (arguments as :func:`prompt_weights` takes them)."""
    B, Hq, _, D = query.shape
    q = query.shape[2] if q_len is None else q_len
    Hkv, kv = key.shape[1], key.shape[2]
    g = Hq // Hkv
    W = min(cfg.window, q)
    assert query.shape[2] >= W, "the query must hold at least the scoring window"
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
    qw = query[:, :, query.shape[2] - W :].float().reshape(B, Hkv, g, W, D)
    logits = cap_logits((qw * scaling) @ key.float()[:, :, None].transpose(-1, -2), softcap)  # [B, Hkv, g, W, kv]
    logits = logits.masked_fill(~vis[:, None, None], -math.inf)
    if lse is None:
        norm = torch.logsumexp(logits, -1, keepdim=True)
        if sinks is not None:  # the sink's mass is part of the softmax the model attends with
            norm = torch.logaddexp(norm, sinks.float().reshape(1, Hkv, g, 1, 1))
    else:
        norm = lse[:, :, q - W :].reshape(B, Hkv, g, W, 1).float()
    probs = torch.exp(logits - norm).nan_to_num_(0.0)[..., kv - n_new :]
    qm = q_real[:, None, None, :, None].to(qw.dtype)
    return WindowSums(probs.sum((2, 3)), vis[:, :, kv - n_new :].sum(1).to(probs.dtype), (qw.square() * qm).sum((2, 3)),
                      q_real.sum(1).to(qw.dtype) * g, real)
