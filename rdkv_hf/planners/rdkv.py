"""``rdkv``: every KV head gets the same budget; RDKV spends it on V tokens, then K channels."""

from __future__ import annotations

import torch

from ..allocate import allocate_rdkv, relative_weights, shared_across_heads
from .base import Planner, rows

# How much a packed token's cap weight follows the most any KV head of its layer gives it
# (rdkv_hf.allocate.shared_across_heads). 0.5 and 1 measured (benchmarks/results/long_generation/:
# recall.md, "half shared" and "fully shared"; the stream's six samples in samples6/ and
# head-share1.0/): neither ahead on recall or perplexity beyond one sample's noise; 0.5 lets each
# head keep some of its own ranking.
CAP_HEAD_SHARE = 0.5
# How much a packed token's cap weight follows the mean over layers of each layer's most
# (rdkv_hf.cache_cap.share_across_layers). 0, 0.25 and 0.5 measured on the stream's six samples
# (benchmarks/results/long_generation/: recall.md, "half across layers" and "a quarter across
# layers"; samples6-layers/ against samples6-given/ for 0): under the cap RDKV recalls the code in
# 3, 4 and 5 of them, and 0.5 has the lowest perplexity of the three.
CAP_LAYER_SHARE = 0.5


class RDKVPlanner(Planner):
    name = "rdkv"
    label = "RDKV"
    rank = 10
    uses_novelty = True
    cap_layer_share = CAP_LAYER_SHARE

    def head_budgets(self, layer_idx: int, B: int, H: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_avg, v_avg)`` bits per element of each of the ``B * H`` rows (K and V split by
        ``k_share``); `tokens` ``[B * H]`` real tokens of each row."""
        bits = torch.tensor([self.config.budget_bits(int(t)) for t in tokens], dtype=torch.float64, device=tokens.device)
        return self.config.split_kv(bits)

    def eps_tables(self, layer_idx: int) -> tuple[dict, dict]:
        """``(eps_k, eps_v)``: the distortion of each width, relative to eviction."""
        return self.config.eps_k, self.config.eps_v

    def widths(self, layer_idx, w_tok, w_ch, real, v_dim=None):
        B, H, T = w_tok.shape
        D = w_ch.shape[-1]
        Dv = v_dim or D
        real_rows, t_real = rows(real, H)
        k_avg, v_avg = self.head_budgets(layer_idx, B, H, t_real)
        eps_k, eps_v = self.eps_tables(layer_idx)
        v, k = allocate_rdkv(
            w_tok.reshape(B * H, T), w_ch.reshape(B * H, D), real_rows,
            v_avg * t_real * Dv, k_avg * t_real * D, self.config.widths, eps_v, eps_k, v_dim=Dv,
        )
        return v.reshape(B, H, T), k.reshape(B, H, D)

    def cap_weights(self, w_tok, real, positions):
        """Each packed segment's weights over their mean (per batch row and KV head,
        :func:`~rdkv_hf.allocate.relative_weights`), so that the cap ranks a token against its
        neighbours rather than against tokens weighed by other queries, then shared across the
        layer's KV heads (:func:`~rdkv_hf.allocate.shared_across_heads`, ``CAP_HEAD_SHARE``), so that
        a token one head kept high is not evicted by the others (``rdkv_hf.cache_cap``). Under
        tensor parallelism the max is over the KV heads this rank holds."""
        return shared_across_heads(relative_weights(w_tok, real), CAP_HEAD_SHARE)
