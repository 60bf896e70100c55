"""Eviction-only baselines on the same packed cache, for comparisons at matched bytes (modes
``snapkv``, ``adakv`` and ``streamingllm``).

Re-implemented after kvpress's published definitions (kvpress itself pins transformers < 5.3):

* SnapKV: token scores from the attention of the last window queries, pooled; the window is always
  kept; the same number of tokens in every head.
* AdaKV (Ada-SnapKV): SnapKV scores with per-head budgets: each head keeps at least
  ``alpha_safeguard`` of the mean budget, the rest goes to the best scores across the layer's heads.
* StreamingLLM: four attention-sink tokens plus the most recent ones.

Kept tokens are stored at 16 bits (K and V), so ``budget`` bits per element keeps ``budget / 16``
of each head's tokens. The scores are RDKV's token weights (window attention summed over the
window and the GQA group, normalized by the queries that see a token, average-pooled), which is
SnapKV's score up to that in-window normalization.
"""

from __future__ import annotations

import torch

from .base import Planner


class EvictionPlanner(Planner):
    """Keeps ``floor(budget / 16 * T)`` tokens per head at 16 bits; subclasses choose which."""

    evicts_only = True
    takes_tokens = False

    def __init__(self, config, profile=None, layers=None, heads=None):
        # kvpress's definitions: average pooling, no carry (RDKV's own addition).
        super().__init__(config.replace(carry=0.0, pool="avg"), profile, layers, heads)

    def n_keep(self, real: torch.Tensor) -> torch.Tensor:
        """``[B]`` tokens to keep per head of each batch row."""
        return torch.floor(real.sum(1).double() * self.config.budget / 16).long()

    def scores(self, w_tok: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def keep_mask(self, w_tok: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``[B, H, T]`` bool: the top ``n_keep`` real tokens of each head by score."""
        s = self.scores(w_tok, real).masked_fill(~real[:, None, :], -torch.inf)
        order = s.argsort(-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order).contiguous())
        return (rank < self.n_keep(real)[:, None, None]) & real[:, None, :]

    def widths(self, layer_idx, w_tok, w_ch, real, v_dim=None):
        keep = self.keep_mask(w_tok, real)
        v_bits = keep.long() * 16
        k_bits = torch.full(w_ch.shape, 16, dtype=torch.long, device=w_ch.device)
        return v_bits, k_bits


def _recent_rank(real: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: 0 for the last real token, 1 for the one before, ..."""
    pos = real.long().cumsum(1)
    return pos[:, -1:] - pos


class SnapKVPlanner(EvictionPlanner):
    name = "snapkv"
    label = "SnapKV"
    rank = 60

    def scores(self, w_tok, real):
        in_window = (_recent_rank(real) < self.config.window)[:, None, :]
        return w_tok.masked_fill(in_window, torch.inf)


class StreamingLLMPlanner(EvictionPlanner):
    name = "streamingllm"
    label = "StreamingLLM"
    rank = 80
    sinks = 4

    def scores(self, w_tok, real):
        first = real.long().cumsum(1)  # 1 for the first real token
        recent = -_recent_rank(real).double()
        s = torch.where(first <= self.sinks, torch.full_like(recent, torch.inf), recent)
        return s[:, None, :].expand_as(w_tok)


class AdaKVPlanner(SnapKVPlanner):
    name = "adakv"
    label = "AdaKV"
    rank = 70
    alpha_safeguard = 0.2

    def keep_mask(self, w_tok, real):
        B, H, T = w_tok.shape
        s = self.scores(w_tok, real).masked_fill(~real[:, None, :], -torch.inf)
        n = self.n_keep(real)  # mean per head
        floor = torch.floor(n.double() * self.alpha_safeguard).long()
        order = s.argsort(-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(T, device=s.device).expand_as(order).contiguous())
        keep = rank < floor[:, None, None]
        # The rest of the layer's budget goes to the best remaining scores across all heads.
        rest = s.masked_fill(keep, -torch.inf).reshape(B, H * T)
        extra = n * H - floor * H
        for b in range(B):
            k = int(extra[b])
            if k > 0:
                top = rest[b].topk(min(k, H * T)).indices
                flat = keep[b].reshape(-1)
                flat[top] = True
                keep[b] = flat.reshape(H, T)
        return keep & real[:, None, :]
