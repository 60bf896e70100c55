"""RDKV: distortion weights from attention, and the Lagrangian allocation of widths.

Units are V tokens and K channels of one KV head ("row"). Each unit u gets a width b from the
allowed set, minimizing  sum_u w_u * eps(b_u)  subject to  sum_u cost(b_u) <= budget  (bits).
Costs count what is stored: codes, plus a float16 scale and minimum per quantized V token or
K channel. The Lagrangian relaxation  min_b w*eps(b) + lam*cost(b)  is solved per unit and
`lam` is the smallest at which the row fits, found exactly from every unit's switch points; we return
the allocation there, so the budget is never exceeded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quant import META_BITS, per_word


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's soft-capping of scaled logits, ``softcap * tanh(logits / softcap)`` (None: as is)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


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
    seen_by = visible.sum(1).to(probs.dtype)
    return pool_weights(probs.sum((2, 3)), seen_by, pool_kernel, pool, carry)


def pool_weights(mass: torch.Tensor, seen_by: torch.Tensor, pool_kernel: int = 5, pool: str = "avg", carry: float = 0.0) -> torch.Tensor:
    """:func:`token_weights` from attention already summed over the queries and the GQA group.

    Args:
        mass: ``[B, kv_heads, T]`` attention probabilities summed over the queries that see each
            token and over the group; seen_by: ``[B, T]`` how many queries see each token (0: padding).
    Returns:
        ``[B, kv_heads, T]`` weights, normalized, pooled and carried as :func:`token_weights` says.
    """
    if pool not in ("avg", "max"):
        raise ValueError(f"`pool` must be 'avg' or 'max', got {pool!r}")
    seen = seen_by > 0  # [B, T] the real tokens
    w = mass / seen_by.clamp(min=1).to(mass.dtype)[:, None, :]
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


def add_novelty(w_tok: torch.Tensor, keys: torch.Tensor, real: torch.Tensor, strength: float) -> torch.Tensor:
    """Token weights of a decoded block with a prior for the queries yet to come (``RDKVConfig.decode_novelty``).

    The queries that weigh a block come right after it; a later query may look for a token that
    none of them attended (a fact read now, asked about thousands of tokens on). A key that points
    away from its block's mean key is one a query can single out; one near the mean draws its
    attention only as part of the crowd (KeyDiff's observation). So each token gains
    ``strength * mean(w) * z+``: ``z`` is how far its key's cosine distance to the block's mean key
    lies above the block's average, in standard deviations (0 below it).

    Args:
        w_tok: ``[B, kv_heads, T]`` attention weights; keys: ``[B, kv_heads, T, D]``;
            real: ``[B, T]`` bool (padding gains nothing and counts in no mean).
    """
    if not strength:
        return w_tok
    m = real[:, None, :].to(w_tok.dtype)  # [B, 1, T]
    n = m.sum(-1, keepdim=True).clamp(min=1)
    mean_k = (keys * m[..., None]).sum(2, keepdim=True) / n[..., None]
    d = 1 - F.cosine_similarity(keys, mean_k, dim=-1)  # [B, H, T]
    mu = (d * m).sum(-1, keepdim=True) / n
    sd = (((d - mu) ** 2 * m).sum(-1, keepdim=True) / n).sqrt().clamp(min=1e-6)
    z = ((d - mu) / sd).clamp(min=0) * m
    return w_tok + strength * (w_tok * m).sum(-1, keepdim=True) / n * z


def relative_weights(w_tok: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``w_tok`` over its mean over the real tokens of each (batch row, KV head): weights of mean 1.

    A segment's weights are shares of the attention its own queries gave it (a decoded block's: the
    ``decode_window`` queries right after it), so their scale says how much those queries looked
    back at the segment, not how much a query thousands of tokens later will. Divided by their
    mean, the tokens of segments packed at different times compare by how they stood among their
    neighbours, and each segment's tokens hold the same total weight.

    Args:
        w_tok: ``[B, kv_heads, T]``; real: ``[B, T]`` bool (padding stays 0 and counts in no mean).
    """
    m = real[:, None, :].to(w_tok.dtype)
    mean = (w_tok * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return w_tok * m / mean.clamp(min=torch.finfo(w_tok.dtype).tiny)


def shared_across_heads(w_tok: torch.Tensor, share: float) -> torch.Tensor:
    """``(1 - share) * w_tok + share * max over KV heads``: a token any KV head of the layer weighs
    high is kept in the others too.

    The weights of one KV head say what its own window queries read. A fact none of the next queries
    needed (a code read now, asked thousands of tokens later) ranks high in some heads and middling in
    others, and under a tight byte budget a head that evicts it may be the one the question reads it
    with. Keeping a few such tokens in every head of the layer costs little. With ``share = 1`` the
    heads rank tokens alike and differ only in how many bits each gets (its budget, its channels).

    Args:
        w_tok: ``[B, kv_heads, T]`` weights of a comparable scale across heads (e.g.
            :func:`relative_weights`); share: in [0, 1] (0: each head's own).
    """
    if not share:
        return w_tok
    return (1 - share) * w_tok + share * w_tok.amax(1, keepdim=True)


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


def channel_weights_of(qsq: torch.Tensor, nq: torch.Tensor, k: torch.Tensor, k_real: torch.Tensor) -> torch.Tensor:
    """RDKV's K-channel weight (reference-code form): mean q_c^2 over the window queries and the
    GQA group times mean k_c^2 over the tokens, from the queries' sums.

    Args:
        qsq: ``[B, kv_heads, D]`` squared (post-RoPE) queries summed over ``nq [B]`` real query rows
            (window queries times the group).
        k: ``[B, kv_heads, T, D]`` keys; k_real: ``[B, T]`` bool.
    Returns:
        ``[B, kv_heads, D]``.
    """
    q2 = qsq / nq.clamp(min=1)[:, None, None]
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

    # lam = 0 keeps everything at the best width; if that fits, we are done (e.g. budget 16).
    opt0, spent0 = _choose(w, costs, eps, torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))
    fits0 = spent0 <= budget
    if bool(fits0.all()):
        return opt0
    # For lam > 0 a unit's choice depends only on lam / w: each row's lower envelope of the lines
    # eps_k + x * cost_k gives the unit's option on each interval of x (breaks), so the unit moves
    # to its next, cheaper hull option at lam = w * breaks[j] ("events").
    breaks, hull = _envelopes(costs, eps)
    opt = _lowest_feasible(w, breaks, hull, torch.gather(costs, 1, hull), budget)
    return torch.where(fits0[:, None], opt0, opt)


def _lowest_feasible(w, breaks, hull, hull_cost, budget):
    """The allocation at the smallest feasible lam: every unit's events sorted per row, the bits
    they save summed in that order, and the first event whose prefix fits the budget taken with
    every event at or below it (ties move together). Eviction (always feasible) for a row whose
    last event does not fit."""
    R, U = w.shape
    K1 = breaks.shape[1]
    finite = torch.isfinite(breaks)  # [R, K-1]
    b = torch.where(finite, breaks, torch.zeros_like(breaks))
    events = torch.where(finite[:, None, :] & (w > 0)[:, :, None], w[:, :, None] * b[:, None, :],
                         torch.full((), math.inf, dtype=w.dtype, device=w.device))  # [R, U, K-1]
    saved = (hull_cost[:, :K1] - hull_cost[:, 1 : K1 + 1])[:, None, :].expand(R, U, K1)  # bits each event saves
    values, order = events.reshape(R, -1).sort(1)
    cum = torch.gather(saved.reshape(R, -1), 1, order).cumsum(1)
    start = (w > 0).sum(1).double() * hull_cost[:, 0]  # every unit at its first hull option (lam -> 0+)
    ok = (start[:, None] - cum <= budget[:, None]) & torch.isfinite(values)
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full_like(budget, -1, dtype=torch.long))
    lam = torch.gather(values, 1, first.clamp(min=0)[:, None])  # [R, 1]
    moves = (events <= lam[:, :, None]).sum(-1)  # [R, U] events each unit takes (breaks ascend: a prefix)
    opt = torch.gather(hull, 1, moves)
    return torch.where((first >= 0)[:, None] & (w > 0), opt, torch.zeros_like(opt))


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
    v_cost = unit_costs(wt, torch.full((R,), v_dim or D, device=w_tok.device))
    v_opt = lagrangian_widths(w_tok, v_cost, ev, v_budget, valid=real)
    v_bits = wt[v_opt]
    return v_bits, channel_widths(w_ch, (v_bits > 0).sum(1), k_budget, widths, eps_k)


def channel_widths(w_ch: torch.Tensor, n_kept: torch.Tensor, k_budget: torch.Tensor, widths: tuple, eps_k: dict) -> torch.Tensor:
    """RDKV's second stage: widths of the K channels of rows keeping `n_kept` tokens.

    Args:
        w_ch: ``[R, D]`` channel weights; n_kept: ``[R]`` tokens each row keeps; k_budget: ``[R]`` bits.
    Returns:
        ``[R, D]`` long widths; a row that mixes widths pays its channel order (a byte a channel).
    """
    R, D = w_ch.shape
    wt = torch.tensor(widths, device=w_ch.device)
    ek = torch.tensor([eps_k[b] for b in widths], device=w_ch.device)
    k_cost = unit_costs(wt, n_kept)
    k_valid = (n_kept > 0)[:, None].expand(R, D)
    k_opt = lagrangian_widths(w_ch, k_cost, ek, k_budget, valid=k_valid)
    # Mixed channel widths need the channel order stored (one byte a channel): pay it from K's share.
    mixed = (k_opt != k_opt[:, :1]).any(1)
    if bool(mixed.any()):
        k_opt2 = lagrangian_widths(w_ch, k_cost, ek, (k_budget - 8 * D).clamp(min=0), valid=k_valid)
        k_opt = torch.where(mixed[:, None], k_opt2, k_opt)
    return wt[k_opt]


def fixed_widths(real: torch.Tensor, v_width: torch.Tensor, k_width: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No eviction: every real token of row r at ``v_width[r]``, every channel at ``k_width[r]``.

    Returns ``(v_bits [R, T], k_bits [R, D])``.
    """
    v_bits = torch.where(real, v_width[:, None].long(), torch.zeros_like(real, dtype=torch.long))
    k_bits = k_width[:, None].long().expand(-1, head_dim).clone()
    return v_bits, k_bits
