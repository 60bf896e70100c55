"""``uniform``: one width for every K and V element (KIVI-style), nothing evicted."""

from __future__ import annotations

import torch

from ..allocate import fixed_width_bits, fixed_widths
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
        # Each row's own width: K's per-channel scales cost more over a padded row's fewer tokens.
        fit = {t: uniform_width(self.config.budget_bits(t), D, t, v_dim) for t in set(int(t) for t in t_real.tolist()) if t > 0}
        b = torch.tensor([float(fit.get(int(t), 16)) for t in t_real.tolist()], device=w_tok.device)
        v, k = fixed_widths(real_rows, b, b, D)
        return v.reshape(B, H, T), k.reshape(B, H, D)


def uniform_width(budget: float, head_dim: int, tokens: int, v_dim: int | None = None) -> int:
    """Largest width 1..8 (or 16) whose K and V cost for `tokens` tokens, as stored (whole words of
    codes, scales and minima), fits the budget (`head_dim`: K's channels; `v_dim`: V's, default the same)."""
    if budget >= 16:
        return 16
    for b in range(8, 0, -1):
        if float(fixed_width_bits(b, b, max(tokens, 1), head_dim, v_dim)) <= budget:
            return b
    raise ValueError(
        f"budget {budget} bits is below the cheapest uniform width for {tokens} tokens (1 bit plus scales, "
        f"{float(fixed_width_bits(1, 1, max(tokens, 1), head_dim, v_dim)):.2f} bits); raise `budget`"
    )
