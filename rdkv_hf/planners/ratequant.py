"""``ratequant``: one integer width per KV head for K and one for V, from a profile (RateQuant);
nothing is evicted.

The codes get ``budget`` less the scales' share (``16 / head_dim`` for V's per-token scale and
minimum, averaged over K and V). What is stored also holds K's per-channel scales (over the
tokens compressed) and the words' unused bits at widths 3, 5, 6, 7: for each prompt length the
greedy's total is lowered one bit at a time until the stored bits fit the budget.
"""

from __future__ import annotations

import torch

from .. import head_budgets
from ..allocate import fixed_width_bits, fixed_widths
from .base import Planner, rows
from .profile import check_quantizer


class RateQuantPlanner(Planner):
    name = "ratequant"
    label = "RateQuant"
    needs_profile = True
    takes_tokens = False
    rank = 30

    def __init__(self, config, profile=None, layers=None, heads=None):
        super().__init__(config, profile, layers, heads)
        cfg = self.config
        check_quantizer(self.profile)
        head_dim = int(self.profile.fingerprint["head_dim"])
        code_bits = cfg.budget - 16 / head_dim
        if not 1 <= code_bits <= 8:
            raise ValueError(
                f"mode='ratequant' needs `budget` between {1 + 16 / head_dim:.2f} and {8 + 16 / head_dim:.2f} "
                f"bits (codes of 1..8 bits plus scales), got {cfg.budget}"
            )
        self.head_dim, self.code_bits = head_dim, code_bits
        self.bounds = head_budgets.default_bounds(code_bits)
        cheapest = float(fixed_width_bits(1, 1, 1 << 20, head_dim))  # every width 1 bit, a long prompt
        if cheapest > cfg.budget:
            raise ValueError(
                f"mode='ratequant' stores at least {cheapest:.2f} bits per element with head_dim {head_dim} (1-bit "
                f"codes, scales included), above `budget`={cfg.budget}; raise `budget` or use mode='rdkv'"
            )
        # The nominal widths of this cache's heads (the fit for a prompt length is over all heads).
        self.k_bits, self.v_bits = (self.own_heads(b) for b in self._allocate(round(code_bits * self._components())))
        self._fitted: dict[int, tuple] = {}

    def _components(self) -> int:
        """K and V of every KV head of the compressed layers."""
        layers = self.layers if self.layers is not None else range(self.profile.num_layers)
        return 2 * len(layers) * self.profile.num_kv_heads

    def _allocate(self, total_bits: int, bounds=None):
        mean = total_bits / self._components()
        return head_budgets.on_layers(
            lambda p: head_budgets.ratequant_bits(p, mean, integer=True, bounds=bounds or self.bounds), self.profile, self.layers)

    def widths_for(self, tokens: int):
        """``(k_bits, v_bits)`` ``[layers, kv_heads]`` of all heads, whose stored bits for `tokens`
        compressed tokens average at most ``budget`` over the compressed layers."""
        if tokens not in self._fitted:
            layers = list(self.layers if self.layers is not None else range(self.profile.num_layers))
            total, bounds = round(self.code_bits * self._components()), self.bounds
            while True:
                kb, vb = self._allocate(total, bounds)
                stored = fixed_width_bits(vb[layers], kb[layers], tokens, self.head_dim).mean().item()
                if stored <= self.config.budget:
                    break
                total -= 1
                if total < self._components() * bounds[0]:
                    if bounds[0] == 1:
                        raise ValueError(
                            f"mode='ratequant' cannot store {tokens} tokens in {self.config.budget} bits per element (1-bit "
                            "codes and their scales cost more); raise `budget` or `residual`, or use mode='rdkv'"
                        )
                    bounds = (1, bounds[1])  # below RateQuant's table: the budget comes first
            self._fitted[tokens] = (kb, vb)
        return self._fitted[tokens]

    def widths(self, layer_idx, w_tok, w_ch, real, v_dim=None):
        B, H, T = w_tok.shape
        D = w_ch.shape[-1]
        self.check_heads(layer_idx, H, self.k_bits)
        real_rows, t_real = rows(real, H)
        fits = [tuple(self.own_heads(b) for b in self.widths_for(int(t))) if t > 0 else (self.k_bits, self.v_bits)
                for t in t_real.tolist()]
        dev = w_tok.device
        kb = torch.stack([f[0][layer_idx, r % H] for r, f in enumerate(fits)]).to(dev)
        vb = torch.stack([f[1][layer_idx, r % H] for r, f in enumerate(fits)]).to(dev)
        v, k = fixed_widths(real_rows, vb, kb, D)
        return v.reshape(B, H, T), k.reshape(B, H, D)
