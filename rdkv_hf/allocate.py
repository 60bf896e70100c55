"""RDKV: distortion weights from attention, and the Lagrangian allocation of widths.

Units are V tokens and K channels of one KV head ("row"). Each unit u gets a width b from the
allowed set, minimizing  sum_u w_u * eps(b_u)  subject to  sum_u cost(b_u) <= budget  (bits).
Costs count what is stored: codes, plus a float16 scale and minimum per quantized V token or
K channel. The Lagrangian relaxation  min_b w*eps(b) + lam*cost(b)  is solved per unit and
`lam` is found by bisection; we return the allocation at the smallest feasible `lam` seen, so the
budget is never exceeded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quant import META_BITS, per_word

_BISECT_STEPS = 48


def token_weights(probs: torch.Tensor, visible: torch.Tensor, pool_kernel: int = 5, pool: str = "avg", carry: float = 0.0) -> torch.Tensor:
    """RDKV's V-token weight: window attention summed over queries and the GQA group.

    Args:
        probs: ``[B, kv_heads, group, window, T]`` attention probabilities (0 where not visible).
        visible: ``[B, window, T]`` bool, which window query sees which token.
    Returns:
        ``[B, kv_heads, T]`` weights, normalized by how many window queries see each token and
        pooled along the tokens (``pool="avg"`` averages the real tokens among the `pool_kernel`
        neighbours; ``"max"`` gives each token the largest weight within ``pool_kernel // 2`` of
        it), then carried forward (:func:`carry_forward`) when ``carry > 0``. Padding (tokens no
        window query sees) weighs 0 and adds nothing to its neighbours: a padded row gets the
        weights its tokens get alone.
    """
    if pool not in ("avg", "max"):
        raise ValueError(f"`pool` must be 'avg' or 'max', got {pool!r}")
    seen = visible.any(1)  # [B, T] the real tokens
    seen_by = visible.sum(1).clamp(min=1).to(probs.dtype)
    w = probs.sum((2, 3)) / seen_by[:, None, :]
    B, H, T = w.shape
    if pool_kernel > 1 and T > 1:
        pad = pool_kernel // 2
        window = lambda x: F.pad(x.reshape(-1, 1, T), (pad, pad))  # noqa: E731  zeros past both ends
        if pool == "max":  # weights are >= 0: the zeros never win
            w = F.max_pool1d(window(w), pool_kernel, stride=1).reshape(B, H, T)
        else:
            real = seen[:, None, :].expand(B, H, T).to(w.dtype)
            total = F.avg_pool1d(window(w * real), pool_kernel, stride=1)
            count = F.avg_pool1d(window(real), pool_kernel, stride=1)
            w = (total / count.clamp(min=1e-12)).reshape(B, H, T)
        w = w * seen[:, None, :]
    return carry_forward(w, carry)


def carry_forward(w: torch.Tensor, rho: float) -> torch.Tensor:
    """``w'[t] = max(w[t], rho * w'[t-1])`` along the last dim: a token weighs at least `rho`
    times the token before it (after pooling), so the tokens that follow an attended one decay
    instead of dropping. Decoding copies a span token after token (a number's digits), while the
    window queries attend mostly to its start. ``rho = 0`` returns `w` unchanged.

    Computed as ``rho**t * cummax(w[s] * rho**-s)``, in log space (float64).
    """
    if rho <= 0 or w.shape[-1] < 2:
        return w
    t = torch.arange(w.shape[-1], dtype=torch.float64, device=w.device)
    log_rho = math.log(rho)
    logw = w.double().clamp(min=1e-300).log()
    carried = (torch.cummax(logw - t * log_rho, dim=-1).values + t * log_rho).exp()
    return torch.maximum(w, carried.to(w.dtype))


def channel_weights(q: torch.Tensor, q_real: torch.Tensor, k: torch.Tensor, k_real: torch.Tensor) -> torch.Tensor:
    """RDKV's K-channel weight (reference-code form): mean q_c^2 over window queries and group
    times mean k_c^2 over the tokens.

    Args:
        q: ``[B, kv_heads, group, window, D]`` window queries (post-RoPE, as attended).
        q_real: ``[B, window]`` bool, real (non-padding) queries.
        k: ``[B, kv_heads, T, D]`` keys; k_real: ``[B, T]`` bool.
    Returns:
        ``[B, kv_heads, D]``.
    """
    qm = q_real[:, None, None, :, None].to(q.dtype)
    q2 = (q.square() * qm).sum((2, 3)) / (qm.sum((2, 3)) * q.shape[2]).clamp(min=1)
    km = k_real[:, None, :, None].to(k.dtype)
    k2 = (k.square() * km).sum(2) / km.sum(2).clamp(min=1)
    return q2 * k2


def lagrangian_widths(
    weights: torch.Tensor,
    costs: torch.Tensor,
    eps: torch.Tensor,
    budget: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one option per unit minimizing weighted distortion under a per-row bit budget.

    Args:
        weights: ``[R, U]`` non-negative unit weights.
        costs: ``[R, K]`` bits one unit costs at each option (option 0 must cost 0).
        eps: ``[K]`` distortion of each option (eps[0] is eviction).
        budget: ``[R]`` bits available per row.
        valid: ``[R, U]`` bool; invalid units (padding) are forced to option 0 and cost nothing.
    Returns:
        ``[R, U]`` option indices with ``sum cost <= budget`` for every row.
    """
    w = weights.double().clamp(min=0)
    if valid is not None:
        w = torch.where(valid, w, torch.zeros_like(w))
    costs = costs.double()
    eps = eps.double().to(w.device)
    budget = budget.double()

    R = w.shape[0]
    # lam above which every unit prefers eviction: w*(eps0 - eps_k) <= lam*cost_k for all k.
    gain = (eps[0] - eps)[None, :] / costs.clamp(min=1e-12)  # [R, K]
    lam_hi = (w.amax(1, keepdim=True) * gain[:, 1:]).amax(1) * 1.01 + 1e-30 if costs.shape[1] > 1 else w.new_ones(R)
    lam_lo = torch.zeros(R, dtype=torch.float64, device=w.device)
    # lam = 0 keeps everything at the best width; if that fits, we are done (e.g. budget 16).
    opt0, spent0 = _choose(w, costs, eps, lam_lo)
    fits0 = spent0 <= budget
    done = fits0.clone()
    # For lam > 0 a unit's choice depends only on lam / w: precompute each row's lower envelope
    # of the lines eps_k + x * cost_k, so one step costs a searchsorted instead of [R, U, K] work.
    breaks, hull = _envelopes(costs, eps)
    hull_cost = torch.gather(costs, 1, hull)  # [R, K]
    w_sorted = w.sort(1).values
    n_pos = (w > 0).sum(1)
    moved = torch.zeros_like(done)  # rows whose lam_hi was lowered to a feasible mid
    for _ in range(_BISECT_STEPS):
        if bool(done.all()):
            break
        mid = (lam_lo + lam_hi) / 2
        spent = _spend_hull(w_sorted, n_pos, breaks, hull_cost, mid)
        ok = spent <= budget
        lam_hi = torch.where(ok, mid, lam_hi)
        lam_lo = torch.where(ok, lam_lo, mid)
        moved |= ok & ~done
        # A row whose (lam_lo, lam_hi) holds a single choice change (some w * breaks[j]) is settled:
        # every later lam_hi lies above that change and below the next, where the choice is the same.
        done |= moved & (_changes_between(w_sorted, n_pos, breaks, lam_lo, lam_hi) == 1)
    # The allocation at the smallest feasible lam seen; eviction (always feasible) if none was.
    opt_hi, _ = _choose_hull(w, costs, breaks, hull, lam_hi)
    best = torch.where(moved[:, None], opt_hi, torch.zeros_like(opt_hi))
    return torch.where(fits0[:, None], opt0, best)


def _choose(w, costs, eps, lam):
    # objective[r, u, k] = w[r, u] * eps[k] + lam[r] * cost[r, k]; argmin takes the first (cheapest) on ties
    obj = w[:, :, None] * eps + lam[:, None, None] * costs[:, None, :]
    opt = obj.argmin(-1)
    opt = torch.where(w > 0, opt, torch.zeros_like(opt))
    spent = torch.gather(costs, 1, opt).sum(1)
    return opt, spent


def _envelopes(costs: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower envelope of the lines ``eps[k] + x * costs[r, k]`` over ``x > 0``, per row.

    Returns ``(breaks [R, K-1], hull [R, K])``: on ``x`` in ``[breaks[j-1], breaks[j])`` option
    ``hull[r, j]`` is the argmin (breaks padded with +inf, hull with its last option).
    """
    uniq, inverse = torch.unique(costs, dim=0, return_inverse=True)
    if uniq.shape[0] < costs.shape[0]:  # rows of equal costs (every V row of a layer) share one envelope
        breaks, hull = _envelopes(uniq, eps)
        return breaks[inverse], hull[inverse]
    R, K = costs.shape
    c, e = costs.tolist(), eps.tolist()
    # Built on the CPU from Python lists (a few rows: equal-cost rows share one), then moved.
    breaks = torch.full((R, max(K - 1, 1)), float("inf"), dtype=torch.float64, device="cpu")
    hull = torch.zeros(R, K, dtype=torch.long, device="cpu")
    for r in range(R):
        # just above x = 0: the least distortion, then the least cost, then the first option
        cur = min(range(K), key=lambda k: (e[k], c[r][k], k))
        seq, xs = [cur], []
        while True:
            best_x, best_k = None, None
            for k in range(K):
                if c[r][k] < c[r][cur]:
                    x = (e[k] - e[cur]) / (c[r][cur] - c[r][k])  # where line k meets the current one
                    if best_x is None or x < best_x or (x == best_x and c[r][k] < c[r][best_k]):
                        best_x, best_k = x, k
            if best_k is None:
                break
            seq.append(best_k)
            xs.append(max(best_x, 0.0))
            cur = best_k
        hull[r, : len(seq)] = torch.tensor(seq, device="cpu")
        hull[r, len(seq) :] = seq[-1]
        if xs:
            breaks[r, : len(xs)] = torch.tensor(xs, dtype=torch.float64, device="cpu")
    return breaks.to(costs.device), hull.to(costs.device)


def _spend_hull(w_sorted, n_pos, breaks, hull_cost, lam):
    """Bits spent at `lam` (as `_choose`), from the ascending weights: a unit with w > 0 takes
    hull option j when ``breaks[j-1] <= lam / w < breaks[j]``, i.e. w in ``(lam/breaks[j], lam/breaks[j-1]]``."""
    U = w_sorted.shape[1]
    thr = lam[:, None] / breaks  # [R, K-1]; breaks = +inf gives 0: every unit with w > 0
    below = U - torch.searchsorted(w_sorted, thr.contiguous(), right=True)  # units with lam / w < breaks[j]
    below = torch.minimum(below, n_pos[:, None])
    counts = torch.diff(below, dim=1, prepend=torch.zeros_like(below[:, :1]))  # per interval j < K-1
    last = n_pos - below[:, -1]  # units past the last break
    K1 = breaks.shape[1]
    return (counts * hull_cost[:, :K1]).sum(1) + last * hull_cost[:, K1]


def _changes_between(w_sorted, n_pos, breaks, lo, hi):
    """``[R]`` number of (unit, break) pairs with ``lo < w * breaks[j] < hi`` (units with w > 0)."""
    U = w_sorted.shape[1]
    finite = torch.isfinite(breaks)
    b = torch.where(finite, breaks, torch.ones_like(breaks))
    above_lo = U - torch.searchsorted(w_sorted, (lo[:, None] / b).contiguous(), right=True)  # w > lo / b
    below_hi = U - torch.searchsorted(w_sorted, (hi[:, None] / b).contiguous(), right=False)  # w >= hi / b
    return ((above_lo - below_hi).clamp(min=0) * finite).sum(1)


def _choose_hull(w, costs, breaks, hull, lam):
    """`_choose` for ``lam > 0`` through the precomputed envelopes."""
    x = lam[:, None] / w  # w = 0 gives +inf: the cheapest option, then forced to eviction below
    opt = torch.gather(hull, 1, torch.searchsorted(breaks, x, right=True))
    opt = torch.where(w > 0, opt, torch.zeros_like(opt))
    spent = torch.gather(costs, 1, opt).sum(1)
    return opt, spent


def unit_costs(widths: torch.Tensor, elems_per_unit: torch.Tensor) -> torch.Tensor:
    """Bits one unit costs at each width, as stored: whole int32 words of codes plus a float16
    scale and minimum when quantized; 16 bits an element when kept as is.

    Args:
        widths: ``[K]`` widths (0 evicted, 16 kept as is, else quantized).
        elems_per_unit: ``[R]`` elements in one unit (head_dim for a V token, kept tokens for a
            K channel).
    Returns:
        ``[R, K]`` float64 bits.
    """
    n = elems_per_unit.double()[:, None]
    cols = []
    for b in widths.tolist():
        if b == 0:
            cols.append(torch.zeros_like(n))
        elif b >= 16:
            cols.append(16 * n)
        else:
            words = torch.ceil(n / per_word(b))
            cols.append((32 * words + 2 * META_BITS) * (n > 0))
    return torch.cat(cols, 1)


def fixed_width_bits(v_width, k_width, tokens: int, head_dim: int, v_dim: int | None = None) -> torch.Tensor:
    """Bits per element a head stores when its `tokens` V tokens (of `v_dim` values, default
    `head_dim`) are all at `v_width` and its `head_dim` K channels at `k_width` (tensors of widths,
    broadcast), everything counted as stored: codes in whole int32 words, float16 scales and minima
    (:func:`unit_costs`)."""
    v_dim = v_dim or head_dim
    dev = v_width.device if isinstance(v_width, torch.Tensor) else torch.device("cpu")  # bookkeeping
    v_width, k_width = torch.as_tensor(v_width, device=dev), torch.as_tensor(k_width, device=dev)
    widths = torch.tensor([*range(9), 16], device=dev)  # every storable width
    index = torch.full((17,), -1, dtype=torch.long, device=dev)
    index[widths] = torch.arange(len(widths), device=dev)
    v_cost = unit_costs(widths, torch.tensor([v_dim], device=dev))[0]  # bits a V token
    k_cost = unit_costs(widths, torch.tensor([tokens], device=dev))[0]  # bits a K channel
    return (tokens * v_cost[index[v_width.long()]] + head_dim * k_cost[index[k_width.long()]]) / (tokens * (head_dim + v_dim))


def allocate_rdkv(
    w_tok: torch.Tensor,
    w_ch: torch.Tensor,
    real: torch.Tensor,
    v_budget: torch.Tensor,
    k_budget: torch.Tensor,
    widths: tuple,
    eps_v: dict,
    eps_k: dict,
    v_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RDKV's two-stage allocation for rows of one layer: V tokens first, then K channels over
    the kept tokens.

    Args:
        w_tok: ``[R, T]`` token weights; w_ch: ``[R, D]`` channel weights.
        real: ``[R, T]`` bool, real tokens (padding is always evicted).
        v_budget, k_budget: ``[R]`` bits for the row's V and K.
        v_dim: elements of one V token (None: ``D``).
    Returns:
        ``(v_bits [R, T], k_bits [R, D])`` long widths.
    """
    R, T = w_tok.shape
    D = w_ch.shape[1]
    wt = torch.tensor(widths, device=w_tok.device)
    ev = torch.tensor([eps_v[b] for b in widths], device=w_tok.device)
    ek = torch.tensor([eps_k[b] for b in widths], device=w_tok.device)
    v_cost = unit_costs(wt, torch.full((R,), v_dim or D, device=w_tok.device))
    v_opt = lagrangian_widths(w_tok, v_cost, ev, v_budget, valid=real)
    v_bits = wt[v_opt]
    n_kept = (v_bits > 0).sum(1)
    k_cost = unit_costs(wt, n_kept)
    k_valid = (n_kept > 0)[:, None].expand(R, D)
    k_opt = lagrangian_widths(w_ch, k_cost, ek, k_budget, valid=k_valid)
    # Mixed channel widths need the channel order stored (one byte a channel): pay it from K's share.
    mixed = (k_opt != k_opt[:, :1]).any(1)
    if bool(mixed.any()):
        k_opt2 = lagrangian_widths(w_ch, k_cost, ek, (k_budget - 8 * D).clamp(min=0), valid=k_valid)
        k_opt = torch.where(mixed[:, None], k_opt2, k_opt)
    k_bits = wt[k_opt]
    return v_bits, k_bits


def fixed_widths(real: torch.Tensor, v_width: torch.Tensor, k_width: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No eviction: every real token of row r at ``v_width[r]``, every channel at ``k_width[r]``.

    Returns ``(v_bits [R, T], k_bits [R, D])``.
    """
    v_bits = torch.where(real, v_width[:, None].long(), torch.zeros_like(real, dtype=torch.long))
    k_bits = k_width[:, None].long().expand(-1, head_dim).clone()
    return v_bits, k_bits
