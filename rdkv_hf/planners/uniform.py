"""``uniform``: one width for every K and V element (KIVI-style), nothing evicted."""

from __future__ import annotations

import torch

from .. import quant
from ..allocate import fixed_widths
from .base import Planner, rows


class UniformPlanner(Planner):
    name = "uniform"
    label = "uniform"
    fixed_widths = (2, 4)
    rank = 40

    def widths(self, layer_idx, w_tok, w_ch, real, v_dim=None):
        B, H, T = w_tok.shape
        D = w_ch.shape[-1]
        real_rows, t_real = rows(real, H)
        t = int(t_real.max())
        b = torch.full((B * H,), float(uniform_width(self.config.budget_bits(t), v_dim or D, t)), device=w_tok.device)
        v, k = fixed_widths(real_rows, b, b, D)
        return v.reshape(B, H, T), k.reshape(B, H, D)


def uniform_width(budget: float, head_dim: int, tokens: int) -> int:
    """Largest width 1..8 (or 16) whose K and V cost, metadata included, fits the budget
    (`head_dim`: V's, over which each token's scale and minimum are spread)."""
    if budget >= 16:
        return 16
    for b in range(8, 0, -1):
        v_cost = b + 2 * quant.META_BITS / head_dim
        k_cost = b + 2 * quant.META_BITS / max(tokens, 1)
        if (v_cost + k_cost) / 2 <= budget:
            return b
    raise ValueError(f"budget {budget} bits is below the cheapest uniform width (1 bit plus scales); raise `budget`")
