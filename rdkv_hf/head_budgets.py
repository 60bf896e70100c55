"""RateQuant: one bit-width per (layer, KV head), K and V apart, from a distortion model.

Each of the ``n`` components (the K and the V of every KV head: ``n = 2 * layers * kv_heads``) has a
sensitivity ``w`` and a fitted distortion curve ``D(b) = alpha * beta**(-b)``. The allocation
minimizes ``sum_i w_i * D_i(b_i)`` subject to ``sum_i b_i = total`` and ``b_min <= b_i <= b_max``:

- :func:`greedy_bits`: integers, what RateQuant runs. Start at ``b_min`` and give one bit at a time
  to the largest marginal gain ``w * alpha * beta**(-b) * (1 - 1/beta)``. The gains of a component
  fall with ``b`` (``beta > 1``), so this is the same as taking the ``total - n * b_min`` largest
  gains of the whole ``[n, b_max - b_min]`` table, which is how it is computed. It is optimal for
  convex ``D`` (RateQuant Prop. 6).
- :func:`closed_form_bits`: reals, reverse water-filling with per-component ``alpha`` and ``beta``:
  ``b_i = ln(w_i * alpha_i * ln(beta_i) / lam) / ln(beta_i)`` clipped to the bounds, with ``lam``
  found by bisection so the mean is exact. Clipping inside the bisection gives the KKT solution
  that RateQuant's iterative water-filling (clip, fix, re-spread) converges to.
- :func:`allocate_heads`: the safeguards (sensitivity cap, fallback ``beta`` for poor fits) and the
  K/V split, on ``[layers, kv_heads]`` tables; :func:`ratequant_bits` runs it on a profile's fits.
- :func:`rd_curve_bits`: one budget per head (K and V together) from RDKV's own measured distortion
  curves (eviction and quantization), by their lower convex hulls.
- :func:`floor_head_bits` (``RDKVConfig.head_floor``) and :func:`on_layers` (the budget shared by the
  layers a cache compresses only).

Every function here is a pure function of tensors (a profile is read, never changed).
"""

from __future__ import annotations

import itertools
import logging
import math

import torch

logger = logging.getLogger(__name__)

# RateQuant App. P, Tables 13-15: (smallest mean bits, (b_min, b_max)).
PAPER_BOUNDS = ((2.5, (2, 4)), (3.0, (2, 5)), (3.5, (3, 6)), (5.0, (4, 7)))
MAX_WIDTH = 8  # the widest code quant.pack supports
SENSITIVITY_CAP = 5.0  # w <- min(w, 5 * mean w)   (RateQuant App. W.10)
MIN_R2 = 0.96  # poorer fits use beta = min(beta_fit, mean beta)   (App. W.14)
_MIN_BETA = 1.0 + 1e-6  # a fit with beta <= 1 says "more bits do not help"; keep the gains ordered
_BISECT_STEPS = 200


def default_bounds(mean_bits: float) -> tuple[int, int]:
    """RateQuant's ``(b_min, b_max)`` for a mean of `mean_bits` code bits per element.

    The paper's table: 2.5 -> [2, 4], 3.0 -> [2, 5], 3.5 to 5 -> [3, 6], 5.0 -> [4, 7]; a mean
    between two rows takes the lower row. Below 2.5 the table's [2, 4] is used, widened down to
    ``floor(mean)`` (at least 1) so that the mean stays reachable; above 7 ``b_max`` is 8.
    """
    if not 1 <= mean_bits <= MAX_WIDTH:
        raise ValueError(f"`mean_bits` must be in [1, {MAX_WIDTH}] code bits per element, got {mean_bits}")
    lo, hi = PAPER_BOUNDS[0][1]
    for start, bounds in PAPER_BOUNDS:
        if mean_bits >= start:
            lo, hi = bounds
    lo = max(1, min(lo, math.floor(mean_bits)))
    hi = min(MAX_WIDTH, max(hi, math.ceil(mean_bits)))
    return lo, hi


def _check_inputs(w, alpha, beta, b_min, b_max):
    w, alpha, beta = (torch.as_tensor(t, dtype=torch.float64).flatten() for t in (w, alpha, beta))
    n = w.numel()
    if n == 0 or alpha.numel() != n or beta.numel() != n:
        raise ValueError(
            f"`w`, `alpha` and `beta` must be non-empty with one value per component, got sizes "
            f"{w.numel()}, {alpha.numel()}, {beta.numel()}"
        )
    for name, t in (("w", w), ("alpha", alpha), ("beta", beta)):
        if not torch.isfinite(t).all():
            raise ValueError(f"`{name}` must be finite, got {t[~torch.isfinite(t)][:4].tolist()}")
    if (w < 0).any():
        raise ValueError(f"`w` (sensitivities) must be >= 0, got min {w.min().item():.3g}")
    if (alpha <= 0).any():
        raise ValueError(f"`alpha` must be > 0, got min {alpha.min().item():.3g}")
    if (beta <= 1).any():
        raise ValueError(f"`beta` must be > 1 (distortion falling with bits), got min {beta.min().item():.4g}")
    if int(b_min) != b_min or int(b_max) != b_max or not 0 <= b_min <= b_max <= 16:
        raise ValueError(f"bounds must be integers with 0 <= b_min <= b_max <= 16, got [{b_min}, {b_max}]")
    return w, alpha, beta


def greedy_bits(w, alpha, beta, total_bits: int, b_min: int, b_max: int) -> torch.Tensor:
    """Integer widths by RateQuant's greedy marginal-gain rule.

    Args:
        w, alpha, beta: ``[n]`` (any shape, flattened) sensitivities ``>= 0``, ``alpha > 0``,
            ``beta > 1``.
        total_bits: the exact sum of the result, in ``[n * b_min, n * b_max]``.
        b_min, b_max: integer bounds on every width.
    Returns:
        ``[n]`` LongTensor summing to `total_bits`. Ties go to the lower component index.
    """
    shape = torch.as_tensor(w).shape
    w, alpha, beta = _check_inputs(w, alpha, beta, b_min, b_max)
    n = w.numel()
    if int(total_bits) != total_bits:
        raise ValueError(f"`total_bits` must be an integer, got {total_bits}")
    total_bits = int(total_bits)
    if not n * b_min <= total_bits <= n * b_max:
        raise ValueError(
            f"`total_bits`={total_bits} is outside [{n * b_min}, {n * b_max}] = {n} components x "
            f"[b_min={b_min}, b_max={b_max}]; change the budget or the bounds"
        )
    steps = b_max - b_min
    extra = total_bits - n * b_min
    bits = torch.full((n,), b_min, dtype=torch.long, device=w.device)
    if extra == 0 or steps == 0:
        return bits.reshape(shape)
    # Log of the gain of going from b to b + 1 bits, b = b_min .. b_max - 1: [n, steps].
    b = torch.arange(b_min, b_max, dtype=torch.float64, device=w.device)
    log_beta = beta.log()[:, None]
    log_gain = w.log()[:, None] + alpha.log()[:, None] - b * log_beta + torch.log1p(-1.0 / beta)[:, None]
    # A stable sort keeps each row's steps in order among equal gains (w = 0 gives -inf), so the
    # chosen steps of a component are always a prefix: its count is its number of extra bits.
    order = torch.sort(-log_gain.flatten(), stable=True).indices[:extra]
    bits += torch.bincount(order // steps, minlength=n)
    assert int(bits.sum()) == total_bits
    return bits.reshape(shape)


def closed_form_bits(w, alpha, beta, mean_bits: float, b_min: float, b_max: float) -> torch.Tensor:
    """Real widths by reverse water-filling (RateQuant Theorem 2, per-component alpha and beta).

    Args:
        w, alpha, beta: ``[n]`` (any shape) as in :func:`greedy_bits`.
        mean_bits: the exact mean of the result, in ``[b_min, b_max]``.
    Returns:
        ``[n]`` float64 tensor with mean `mean_bits`, every value in ``[b_min, b_max]``.
    """
    shape = torch.as_tensor(w).shape
    w, alpha, beta = _check_inputs(w, alpha, beta, b_min, b_max)
    if not b_min <= mean_bits <= b_max:
        raise ValueError(f"`mean_bits`={mean_bits} is outside the bounds [{b_min}, {b_max}]; change the budget or the bounds")
    log_beta = beta.log()
    # Stationarity w * alpha * ln(beta) * beta**(-b) = lam, in logs: b = (c - ln lam) / ln(beta).
    # A sensitivity of 0 sits at b_min for every lam; a floor keeps the arithmetic finite.
    floor = max(w.max().item() * 1e-30, 1e-300)
    c = (w.clamp(min=floor) * alpha * log_beta).log()

    def widths(log_lam: float) -> torch.Tensor:
        return ((c - log_lam) / log_beta).clamp(b_min, b_max)

    # ln(lam) at which each component sits at b_max / b_min bracket the root of mean(widths) = mean.
    lo = (c - b_max * log_beta).min().item()
    hi = (c - b_min * log_beta).max().item()
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if widths(mid).mean().item() > mean_bits:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, abs(mid)):
            break
    b = widths(0.5 * (lo + hi))
    # Bisection leaves ~1e-12 of error; spread it over the free components so the mean is exact.
    free = (b > b_min) & (b < b_max)
    if free.any():
        b[free] += (mean_bits * b.numel() - b.sum()) / free.sum()
        b = b.clamp(b_min, b_max)
    return b.reshape(shape)


def safeguard(w: torch.Tensor, beta: torch.Tensor, r2: torch.Tensor, cap: float = SENSITIVITY_CAP, min_r2: float = MIN_R2):
    """RateQuant's safeguards on one kind (K or V) of components.

    Args:
        w, beta, r2: ``[...]`` sensitivities, fitted betas and the R^2 of the fits.
        cap: sensitivities above ``cap * mean(w)`` are lowered to it (``None``: no cap).
        min_r2: fits below this R^2 use ``beta = min(beta_fit, mean beta)`` (``None``: keep).
    Returns:
        ``(w, beta)`` float64, same shapes; ``beta`` is also kept above 1.
    """
    w = torch.as_tensor(w, dtype=torch.float64).clone()
    beta = torch.as_tensor(beta, dtype=torch.float64).clone()
    r2 = torch.as_tensor(r2, dtype=torch.float64)
    if cap is not None:
        w = torch.minimum(w, cap * w.mean())
    if min_r2 is not None:
        poor = r2 < min_r2
        if poor.any():
            beta[poor] = torch.minimum(beta[poor], beta.mean())
            logger.debug("%d of %d fits have R^2 < %.2f; their beta is capped at the mean", int(poor.sum()), poor.numel(), min_r2)
    low = beta <= _MIN_BETA
    if low.any():
        logger.warning(
            "%d distortion fits have beta <= 1 (more bits did not lower the error); using beta=%g",
            int(low.sum()), _MIN_BETA,
        )
        beta = beta.clamp(min=_MIN_BETA)
    return w, beta


def allocate_heads(
    sens_k, alpha_k, beta_k, r2_k, sens_v, alpha_v, beta_v, r2_v, mean_bits: float, *,
    integer: bool = True, bounds: tuple | None = None, cap: float | None = SENSITIVITY_CAP,
    min_r2: float | None = MIN_R2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V widths of every KV head for a mean of `mean_bits` code bits per element.

    The ``2 * layers * kv_heads`` components share one budget: ``round(mean_bits * 2N)`` bits
    (integer) or a mean of exactly `mean_bits` (real). The safeguards apply to K and V separately
    (their gradients and fits are of different tensors).

    Args:
        sens_*, alpha_*, beta_*, r2_*: ``[layers, kv_heads]``. ``sens * alpha`` must be in the
            units of the loss (see :class:`~rdkv_hf.profiles.RDKVProfile`).
        integer: greedy integers (``LongTensor``) or the closed form (``float64``).
        bounds: ``(b_min, b_max)``; ``None`` takes :func:`default_bounds`.
    Returns:
        ``(k_bits, v_bits)``, each ``[layers, kv_heads]``.
    """
    if isinstance(mean_bits, bool) or not isinstance(mean_bits, (int, float)):
        raise TypeError(f"`mean_bits` must be a number of bits, got {type(mean_bits).__name__}")
    b_min, b_max = default_bounds(mean_bits) if bounds is None else bounds
    shape = torch.as_tensor(sens_k).shape
    wk, bk = safeguard(sens_k, beta_k, r2_k, cap, min_r2)
    wv, bv = safeguard(sens_v, beta_v, r2_v, cap, min_r2)
    w = torch.cat([wk.flatten(), wv.flatten()])
    alpha = torch.cat([torch.as_tensor(alpha_k, dtype=torch.float64).flatten(), torch.as_tensor(alpha_v, dtype=torch.float64).flatten()])
    beta = torch.cat([bk.flatten(), bv.flatten()])
    n = w.numel()
    if integer:
        bits = greedy_bits(w, alpha, beta, round(mean_bits * n), b_min, b_max)
    else:
        bits = closed_form_bits(w, alpha, beta, float(mean_bits), b_min, b_max)
    half = n // 2
    return bits[:half].reshape(shape), bits[half:].reshape(shape)


def ratequant_bits(profile, mean_bits: float, *, integer: bool = True, bounds: tuple | None = None):
    """RateQuant widths of every KV head's K and V of `profile` for a mean of `mean_bits` code bits.

    The ``2 * layers * kv_heads`` components share ``round(mean_bits * 2N)`` bits (greedy, integer)
    or a real mean of exactly `mean_bits` (closed form). Scales and minima are not counted. Each
    component's distortion is absolute: ``power * alpha * beta**(-b)`` (``alpha`` is fitted on
    relative MSE).

    Args:
        profile: an :class:`~rdkv_hf.RDKVProfile` (its ``sens_*``, ``alpha_*``, ``power_*``,
            ``beta_*``, ``r2_*`` tensors).
        mean_bits: 1..8.
        integer: greedy integers, else closed-form reals.
        bounds: ``(b_min, b_max)``; default :func:`default_bounds` (RateQuant's table).
    Returns:
        ``(k_bits, v_bits)``, each ``[layers, kv_heads]`` (LongTensor, or float64 if not `integer`).
    """
    if isinstance(mean_bits, bool) or not isinstance(mean_bits, (int, float)):
        raise TypeError(f"`budget` must be a number of bits, got {type(mean_bits).__name__}")
    if not 1 <= mean_bits <= MAX_WIDTH:
        raise ValueError(f"`budget` must be in [1, {MAX_WIDTH}] code bits per element for per-head widths, got {mean_bits}")
    if bounds is not None:
        b_min, b_max = bounds
        if not b_min <= mean_bits <= b_max:
            raise ValueError(f"`budget`={mean_bits} is outside `bounds`=({b_min}, {b_max}); widen the bounds")
    p = profile
    return allocate_heads(
        p.sens_k, p.alpha_k.double() * p.power_k.double(), p.beta_k, p.r2_k,
        p.sens_v, p.alpha_v.double() * p.power_v.double(), p.beta_v, p.r2_v,
        float(mean_bits), integer=integer, bounds=bounds,
    )


def rd_curve_bits(rd_budgets: torch.Tensor, rd_dist: torch.Tensor, sens_o: torch.Tensor, budget: float) -> torch.Tensor:
    """Budget of every KV head (K and V together) for RDKV inside it, mean exactly `budget`.

    Minimizes ``sum sens_o * rd_dist(b)`` over the heads, ``rd_dist`` linear between the measured
    budgets: each head's curve is replaced by its lower convex hull, and bits go to the hull
    segments with the largest loss decrease per bit first (the last one partly).

    Args:
        rd_budgets: ``[R]`` increasing budgets of the curves; rd_dist: ``[layers, kv_heads, R]``;
            sens_o: ``[layers, kv_heads]`` (a profile's RDKV curves, see :mod:`rdkv_hf.calibration`).
    Returns:
        ``[layers, kv_heads]`` float64 budgets in ``[rd_budgets[0], rd_budgets[-1]]``.
    """
    grid = rd_budgets.double().tolist()
    lo, hi = grid[0], grid[-1]
    if not lo <= budget <= hi:
        raise ValueError(f"`budget` must be in [{lo:g}, {hi:g}] bits for the profile's RDKV curves, got {budget}")
    cost = (sens_o.double()[..., None] * rd_dist.double()).reshape(-1, len(grid))
    bits = torch.full((cost.shape[0],), lo, dtype=torch.float64, device="cpu")
    segments = []  # (decrease per bit, head, width in bits)
    for h, row in enumerate(cost.tolist()):
        for (b0, c0), (b1, c1) in _lower_hull(list(zip(grid, row))):
            segments.append(((c0 - c1) / (b1 - b0), h, b1 - b0))
    left = (budget - lo) * cost.shape[0]
    # Segments of equal slope (equal heads) share what is left in proportion to their widths.
    for _, group in itertools.groupby(sorted(segments, key=lambda t: -t[0]), key=lambda t: t[0]):
        if left <= 0:
            break
        group = list(group)
        share = min(1.0, left / sum(w for _, _, w in group))
        for _, h, width in group:
            bits[h] += width * share
        left -= share * sum(w for _, _, w in group)
    if left > 1e-12:  # every curve flat before `hi`: spread the rest over the room left
        room = hi - bits
        bits += room * (left / room.sum())
    return bits.reshape(sens_o.shape)


def profile_rd_bits(profile, budget: float) -> torch.Tensor:
    """:func:`rd_curve_bits` of a profile's RDKV curves (``[layers, kv_heads]``)."""
    if not profile.has_rd_curves:
        raise ValueError("this profile has no RDKV curves (saved before they existed); re-calibrate it with rdkv_hf.calibrate")
    return rd_curve_bits(profile.rd_budgets, profile.rd_dist, profile.sens_o, budget)


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Segments of the lower convex hull of ``(budget, cost)`` points sorted by budget, from the
    first point to the cheapest one (beyond it more bits would not lower the cost)."""
    end = min(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    hull: list[tuple[float, float]] = []
    for p in points[: end + 1]:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return list(zip(hull, hull[1:]))


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


def on_layers(allocate, profile, layers):
    """Run ``allocate(profile)`` on the profile restricted to `layers` (the layers a cache
    compresses share the budget); rows of the other layers are 0.

    `allocate` returns ``(k_bits, v_bits)`` ``[layers, kv_heads]``; `layers` None means all.
    """
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
