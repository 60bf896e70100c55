"""``rdkv+profile``: each KV head gets its own budget from a profile, RDKV spends it inside the head.

The budgets come from the profile's RDKV curves (the loss increase RDKV's own compression of that
head causes at each budget, :func:`~rdkv_hf.head_budgets.rd_curve_bits`), split between K and V by
``k_share`` as in ``rdkv``; profiles saved before those curves existed use RateQuant's closed form
over K and V. Every budget is then raised to at least ``head_floor`` of the mean
(:func:`~rdkv_hf.head_budgets.floor_head_bits`).
"""

from __future__ import annotations

import torch

from .. import head_budgets
from .rdkv import RDKVPlanner


class ProfilePlanner(RDKVPlanner):
    name = "rdkv+profile"
    label = "RDKV + profile"
    needs_profile = True
    takes_tokens = False
    rank = 20

    def __init__(self, config, profile=None, layers=None, heads=None):
        super().__init__(config, profile, layers, heads)
        # [layers, kv_heads] each, CPU: allocated over all heads, then this cache's block of them
        self.k_bits, self.v_bits = (self.own_heads(b) for b in self.head_bits())

    def head_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head K and V budgets averaging ``budget`` over the compressed layers (others 0)."""
        cfg, profile = self.config, self.profile
        check_quantizer(profile)
        if profile.has_rd_curves:
            floor = cfg.head_floor * cfg.budget * 2 * min(cfg.k_share, 1 - cfg.k_share)

            def split(p):
                head = head_budgets.profile_rd_bits(p, cfg.budget)
                return head_budgets.floor_head_bits(*cfg.split_kv(head), floor)

            return head_budgets.on_layers(split, profile, self.layers)
        # Below 1 bit RateQuant's quantization curves (fitted at 2..6 bits) mislead
        # (benchmarks/results/knobs.md).
        if not 1 <= cfg.budget <= 8:
            raise ValueError(
                f"mode='rdkv+profile' needs `budget` in [1, 8] bits, got {cfg.budget} (this profile has no RDKV curves); "
                "use mode='rdkv' outside it"
            )
        lo, hi = 0, min(16, int(cfg.budget * 4))  # integer bounds; eviction makes low budgets meaningful
        return head_budgets.on_layers(
            lambda p: head_budgets.floor_head_bits(
                *head_budgets.ratequant_bits(p, cfg.budget, integer=False, bounds=(lo, hi)), cfg.head_floor * cfg.budget),
            profile, self.layers,
        )

    def head_budgets(self, layer_idx, B, H, tokens):
        self.check_heads(layer_idx, H, self.k_bits)
        dev = tokens.device
        return (self.k_bits[layer_idx].to(dev, torch.float64).repeat(B), self.v_bits[layer_idx].to(dev, torch.float64).repeat(B))

    def eps_tables(self, layer_idx):
        # A profile's RDKV curves were measured with the config's tables; older profiles bring theirs.
        return super().eps_tables(layer_idx) if self.profile.has_rd_curves else self.profile.eps_tables(layer_idx)


def check_quantizer(profile) -> None:
    """A profile measured for another quantizer does not describe this cache's errors."""
    if profile.quantizer != profile.DEFAULT_QUANTIZER:
        raise ValueError(f"the profile was measured for quantizer {profile.quantizer}; this cache uses {profile.DEFAULT_QUANTIZER}")
