"""``ratequant``: one integer width per KV head for K and one for V, from a profile (RateQuant);
nothing is evicted.

The codes get ``budget`` less the scales' share (``16 / head_dim`` for V's per-token scale and
minimum, averaged over K and V; K's per-channel share is below 0.02 bit past 1K tokens).
"""

from __future__ import annotations

from .. import head_budgets
from ..allocate import fixed_widths
from .base import Planner, rows
from .profile import check_quantizer


class RateQuantPlanner(Planner):
    name = "ratequant"
    label = "RateQuant"
    needs_profile = True
    takes_tokens = False
    rank = 30

    def __init__(self, config, profile=None, layers=None):
        super().__init__(config, profile, layers)
        cfg = self.config
        check_quantizer(self.profile)
        head_dim = int(self.profile.fingerprint["head_dim"])
        code_bits = cfg.budget - 16 / head_dim
        if not 1 <= code_bits <= 8:
            raise ValueError(
                f"mode='ratequant' needs `budget` between {1 + 16 / head_dim:.2f} and {8 + 16 / head_dim:.2f} "
                f"bits (codes of 1..8 bits plus scales), got {cfg.budget}"
            )
        self.k_bits, self.v_bits = head_budgets.on_layers(
            lambda p: head_budgets.ratequant_bits(p, code_bits, integer=True), self.profile, self.layers)

    def widths(self, layer_idx, w_tok, w_ch, real, v_dim=None):
        B, H, T = w_tok.shape
        D = w_ch.shape[-1]
        real_rows, _ = rows(real, H)
        dev = w_tok.device
        v, k = fixed_widths(real_rows, self.v_bits[layer_idx].to(dev).repeat(B), self.k_bits[layer_idx].to(dev).repeat(B), D)
        return v.reshape(B, H, T), k.reshape(B, H, D)
