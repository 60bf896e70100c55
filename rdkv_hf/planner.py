"""From prompt statistics to widths: which mode decides each head's budget.

``rdkv``: every KV head gets the same budget, RDKV spends it on V tokens then K channels.
``rdkv+profile``: a profile gives each head its own budget, from its measured RDKV curves (the loss
increase RDKV's compression of that head causes at each budget), split between K and V as in
``rdkv``; profiles saved before those curves existed use RateQuant's K and V allocation. Each
budget is at least ``head_floor`` of the mean.
``ratequant``: one width per head for K and one for V from the profile, nothing evicted.
``uniform``: one width everywhere, nothing evicted.
"""

from __future__ import annotations

import torch

from . import quant
from .allocate import allocate_rdkv, fixed_widths
from .config import RDKVConfig


class Planner:
    """Turns weights into widths for one cache, following the config's mode (and profile).

    Subclasses override :meth:`widths` to implement other policies on the same packed cache.
    """

    def __init__(self, config: RDKVConfig, profile=None, layers=None):
        """`layers`: indices of the layers this planner compresses (None: all); a profile's head
        budgets are shared among those layers only (Gemma 3: its full-attention layers)."""
        self.config = config
        self.profile = profile
        self._head_bits = None  # (k_bits [L, H], v_bits [L, H]) from the profile, for its modes
        if config.mode in ("rdkv+profile", "ratequant"):
            self._head_bits = profile_head_bits(config, profile, layers)

    def keep_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return self.config.keep_dtype(model_dtype)

    def widths(self, layer_idx: int, w_tok: torch.Tensor, w_ch: torch.Tensor, real: torch.Tensor):
        """``(v_bits [B, H, T], k_bits [B, H, D])`` for the tokens of one forward."""
        cfg = self.config
        B, H, T = w_tok.shape
        D = w_ch.shape[-1]
        real_rows = real[:, None, :].expand(B, H, T).reshape(B * H, T)
        t_real = real_rows.sum(1).double()
        if cfg.mode == "uniform":
            b = torch.full((B * H,), float(uniform_width(cfg.budget_bits(int(t_real.max())), D, int(t_real.max()))), device=w_tok.device)
            v, k = fixed_widths(real_rows, b, b, D)
        elif cfg.mode == "ratequant":
            kb, vb = self._head_bits
            dev = w_tok.device
            v, k = fixed_widths(real_rows, vb[layer_idx].to(dev).repeat(B), kb[layer_idx].to(dev).repeat(B), D)
        else:
            if cfg.mode == "rdkv":
                bits = torch.tensor([cfg.budget_bits(int(t)) for t in t_real], dtype=torch.float64, device=w_tok.device)
                k_avg, v_avg = cfg.split_kv(bits)
            else:  # rdkv+profile: the profile's K and V budgets of this layer's heads
                kb, vb = self._head_bits
                v_avg, k_avg = (t[layer_idx].to(w_tok.device, torch.float64).repeat(B) for t in (vb, kb))
            # A profile's RDKV curves were measured with the config's tables; older profiles bring theirs.
            use_config_eps = self.profile is None or self.profile.has_rd_curves
            eps_k, eps_v = (cfg.eps_k, cfg.eps_v) if use_config_eps else self.profile.eps_tables(layer_idx)
            v, k = allocate_rdkv(
                w_tok.reshape(B * H, T), w_ch.reshape(B * H, D), real_rows,
                v_avg * t_real * D, k_avg * t_real * D, cfg.widths, eps_v, eps_k,
            )
        return v.reshape(B, H, T), k.reshape(B, H, D)


def uniform_width(budget: float, head_dim: int, tokens: int) -> int:
    """Largest width 1..8 (or 16) whose K and V cost, metadata included, fits the budget."""
    if budget >= 16:
        return 16
    for b in range(8, 0, -1):
        v_cost = b + 2 * quant.META_BITS / head_dim
        k_cost = b + 2 * quant.META_BITS / max(tokens, 1)
        if (v_cost + k_cost) / 2 <= budget:
            return b
    raise ValueError(f"budget {budget} bits is below the cheapest uniform width (1 bit plus scales); raise `budget`")


def profile_head_bits(config: RDKVConfig, profile, layers=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head K and V budgets from a profile's RateQuant allocation.

    ``ratequant``: integer widths (greedy) whose codes plus float16 scales fit ``budget``: the
    codes get ``budget`` less the scales' share (``16 / head_dim`` for V's per-token scale and
    minimum, averaged over K and V; K's per-channel share is below 0.02 bit past 1K tokens).
    ``rdkv+profile``: real-valued budgets averaging ``budget``, which RDKV then spends inside each
    head, scales included: from the profile's RDKV curves when it has them
    (:meth:`~rdkv_hf.RDKVProfile.rd_head_bits`, one budget per head split by ``k_share``; budgets
    within the curves' range, 0.25 to 8 bits), else RateQuant's closed form over K and V (1 to 8
    bits); every budget is then raised to at least ``head_floor * budget`` (:func:`floor_head_bits`),
    the mean unchanged.

    With `layers`, only those layers' heads share the budget (the others get 0: not compressed).
    """
    if profile is None:
        raise ValueError(f"mode={config.mode!r} needs a profile: patch(model, budget=..., profile=repo_id_or_dir)")
    if config.budget is None:
        raise ValueError(f"mode={config.mode!r} takes `budget` in bits per element, not `tokens`")
    if profile.quantizer != profile.DEFAULT_QUANTIZER:
        raise ValueError(f"the profile was measured for quantizer {profile.quantizer}; this cache uses {profile.DEFAULT_QUANTIZER}")
    head_dim = int(profile.fingerprint["head_dim"])
    if config.mode == "ratequant":
        code_bits = config.budget - 16 / head_dim
        if not 1 <= code_bits <= 8:
            raise ValueError(
                f"mode='ratequant' needs `budget` between {1 + 16 / head_dim:.2f} and {8 + 16 / head_dim:.2f} "
                f"bits (codes of 1..8 bits plus scales), got {config.budget}"
            )
        return _on_layers(lambda p: p.head_bits(code_bits, integer=True), profile, layers)
    if profile.has_rd_curves:
        # Head budgets from RDKV's own measured curves, split between K and V as in plain RDKV.
        def split(p):
            head = p.rd_head_bits(config.budget)
            return floor_head_bits(*config.split_kv(head), config.head_floor * config.budget * 2 * min(config.k_share, 1 - config.k_share))

        return _on_layers(split, profile, layers)
    # Below 1 bit the profile's quantization curves (fitted at 2..6 bits) mislead: on Gemma-3-270m at
    # 8K, budget 0.4 scored 0 on the RULER-style tasks with the profile and 37.5 (of 62.5) without it.
    if not 1 <= config.budget <= 8:
        raise ValueError(f"mode='rdkv+profile' needs `budget` in [1, 8] bits, got {config.budget}; use mode='rdkv' outside it")
    lo, hi = 0, min(16, int(config.budget * 4))  # integer bounds; eviction makes low budgets meaningful
    return _on_layers(
        lambda p: floor_head_bits(*p.head_bits(config.budget, integer=False, bounds=(lo, hi)), config.head_floor * config.budget),
        profile, layers,
    )


def _on_layers(allocate, profile, layers):
    """Run ``allocate(profile)`` on the profile restricted to `layers`; rows of the other layers are 0."""
    n = int(profile.fingerprint["num_layers"])
    if layers is None or sorted(layers) == list(range(n)):
        return allocate(profile)
    layers = sorted(int(i) for i in layers)
    if not layers or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"`layers` must be indices of the profile's {n} layers, got {layers}")
    k_sub, v_sub = allocate(profile.select_layers(layers))
    k_bits, v_bits = (torch.zeros((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in (k_sub, v_sub))
    k_bits[layers], v_bits[layers] = k_sub, v_sub
    return k_bits, v_bits


def floor_head_bits(k_bits: torch.Tensor, v_bits: torch.Tensor, floor_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise every K and V budget to at least `floor_bits`, keeping the mean (RDKVConfig.head_floor).

    Budgets below the floor are lifted to it; what each budget holds above the floor is then scaled
    by one factor so that the mean is unchanged. The factor is at most 1, so no budget grows past
    the closed form's upper bound, and the order of the heads is kept. ``floor_bits <= 0``, or an
    allocation already above the floor, is returned as is.
    """
    both = torch.stack([k_bits, v_bits]).double()
    mean = both.mean()
    if floor_bits <= 0 or both.min() >= floor_bits:
        return k_bits, v_bits
    if floor_bits >= mean:
        raise ValueError(f"a head floor of {floor_bits:.3g} bits is not below the mean budget {mean.item():.3g}; lower `head_floor`")
    above = both.clamp(min=floor_bits) - floor_bits
    both = floor_bits + above * ((mean - floor_bits) / above.mean())
    return both[0], both[1]
