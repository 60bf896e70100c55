import itertools
import math

import pytest
import torch

from rdkv_hf.head_budgets import (
    allocate_heads,
    closed_form_bits,
    default_bounds,
    greedy_bits,
    safeguard,
)


def objective(w, alpha, beta, bits):
    w, alpha, beta, bits = (torch.as_tensor(t, dtype=torch.float64) for t in (w, alpha, beta, bits))
    return float((w * alpha * beta.pow(-bits)).sum())


def random_instance(n, seed, shared_beta=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(1.5 * torch.randn(n, generator=g, dtype=torch.float64))
    alpha = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    beta = torch.full((n,), 4.5, dtype=torch.float64) if shared_beta else 3 + 2 * torch.rand(n, generator=g, dtype=torch.float64)
    return w, alpha, beta


@pytest.mark.parametrize("n,b_min,b_max", [(1, 2, 4), (7, 2, 4), (60, 2, 5), (63, 3, 6), (180, 1, 8)])
def test_greedy_sums_exactly_and_respects_bounds(n, b_min, b_max):
    w, alpha, beta = random_instance(n, seed=n)
    for total in sorted({n * b_min, n * b_min + 1, (n * (b_min + b_max)) // 2, n * b_max - 1, n * b_max}):
        bits = greedy_bits(w, alpha, beta, total, b_min, b_max)
        assert bits.dtype == torch.long
        assert int(bits.sum()) == total
        assert int(bits.min()) >= b_min and int(bits.max()) <= b_max


@pytest.mark.parametrize("total", [5, 13])
def test_greedy_rejects_unreachable_totals(total):
    w, alpha, beta = random_instance(3, seed=0)
    with pytest.raises(ValueError, match=r"outside \[6, 12\]"):
        greedy_bits(w, alpha, beta, total, 2, 4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 4])
def test_greedy_is_optimal_by_brute_force(n, seed):
    w, alpha, beta = random_instance(n, seed=seed)
    b_min, b_max = 1, 6
    for total in range(n * b_min, n * b_max + 1):
        best = min(
            objective(w, alpha, beta, combo)
            for combo in itertools.product(range(b_min, b_max + 1), repeat=n)
            if sum(combo) == total
        )
        got = objective(w, alpha, beta, greedy_bits(w, alpha, beta, total, b_min, b_max))
        assert got <= best * (1 + 1e-12), (total, got, best)


def test_greedy_equals_closed_form_when_the_continuous_optimum_is_integer():
    # w_i = beta**k_i with sum k = 0: Theorem 2 gives b_i = mean + k_i exactly.
    beta = torch.full((6,), 4.0, dtype=torch.float64)
    k = torch.tensor([2, -1, 0, 1, -2, 0], dtype=torch.float64)
    w, alpha = beta.pow(k), torch.ones(6, dtype=torch.float64)
    expected = 4 + k
    assert torch.allclose(closed_form_bits(w, alpha, beta, 4.0, 0, 8), expected, atol=1e-9)
    assert torch.equal(greedy_bits(w, alpha, beta, 24, 0, 8), expected.long())


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_within_one_bit_of_closed_form_for_a_shared_beta(seed):
    w, alpha, beta = random_instance(40, seed=seed, shared_beta=True)
    cont = closed_form_bits(w, alpha, beta, 4.0, 0, 16)
    assert cont.min() > 0 and cont.max() < 16  # no bound active
    greedy = greedy_bits(w, alpha, beta, 160, 0, 16)
    assert (greedy - cont).abs().max() < 1
    # ... and never worse than any sum-preserving rounding of the closed form.
    frac = cont - cont.floor()
    rounded = cont.floor().long()
    rounded[frac.argsort(descending=True)[: 160 - int(rounded.sum())]] += 1
    assert int(rounded.sum()) == 160
    assert objective(w, alpha, beta, greedy) <= objective(w, alpha, beta, rounded) * (1 + 1e-12)


def test_closed_form_matches_theorem_2_without_bounds():
    w, alpha, _ = random_instance(30, seed=3)
    beta = torch.full((30,), 3.5, dtype=torch.float64)
    got = closed_form_bits(w, alpha, beta, 8.0, 0, 16)
    lw = (w * alpha).log()
    expected = 8.0 + (lw - lw.mean()) / math.log(3.5)
    assert expected.min() > 0 and expected.max() < 16  # no bound active
    assert torch.allclose(got, expected, atol=1e-9)


@pytest.mark.parametrize("mean", [2.0, 2.5, 3.1, 3.999, 4.0])
def test_closed_form_mean_is_exact_and_kkt_holds(mean):
    w, alpha, beta = random_instance(50, seed=7)
    b = closed_form_bits(w, alpha, beta, mean, 2, 4)
    assert abs(b.mean().item() - mean) < 1e-9
    assert b.min() >= 2 and b.max() <= 4
    marginal = w * alpha * beta.log() * beta.pow(-b)  # = lambda for every free component
    free = (b > 2 + 1e-9) & (b < 4 - 1e-9)
    if free.any():
        lam = marginal[free]
        assert (lam.max() - lam.min()) / lam.mean() < 1e-6
        assert (marginal[b <= 2 + 1e-9] <= lam.max() * (1 + 1e-6)).all()
        assert (marginal[b >= 4 - 1e-9] >= lam.min() * (1 - 1e-6)).all()


def test_zero_sensitivity_gets_the_minimum():
    w = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    alpha, beta = torch.ones(3, dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64)
    assert greedy_bits(w, alpha, beta, 10, 2, 5)[0] == 2
    assert closed_form_bits(w, alpha, beta, 10 / 3, 2, 5)[0] == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=torch.tensor([4.0, 1.0])), "beta"),
        (dict(w=torch.tensor([1.0, -1.0])), "w"),
        (dict(alpha=torch.tensor([1.0, 0.0])), "alpha"),
        (dict(w=torch.tensor([1.0, float("nan")])), "finite"),
        (dict(w=torch.tensor([1.0, 1.0, 1.0])), "one value per component"),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    args = dict(w=torch.ones(2), alpha=torch.ones(2), beta=torch.full((2,), 4.0)) | kwargs
    with pytest.raises(ValueError, match=match):
        greedy_bits(args["w"], args["alpha"], args["beta"], 6, 2, 4)


def test_default_bounds_follow_the_paper_table():
    assert default_bounds(2.5) == (2, 4)
    assert default_bounds(2.75) == (2, 4)
    assert default_bounds(3.0) == (2, 5)
    assert default_bounds(3.5) == (3, 6)
    assert default_bounds(4.0) == (3, 6)
    assert default_bounds(5.0) == (4, 7)
    assert default_bounds(2.0) == (2, 4)
    assert default_bounds(1.5) == (1, 4)
    assert default_bounds(7.5) == (4, 8)
    with pytest.raises(ValueError, match="mean_bits"):
        default_bounds(9)


def test_safeguards():
    w = torch.ones(20, dtype=torch.float64)
    w[3] = 100.0  # mean 5.95: capped at 29.75
    beta = torch.full((20,), 4.0, dtype=torch.float64)
    beta[3] = beta[5] = 8.0
    r2 = torch.full((20,), 0.99, dtype=torch.float64)
    r2[3] = 0.5
    w2, b2 = safeguard(w, beta, r2)
    assert w2[3] == pytest.approx(5 * w.mean().item())
    assert torch.equal(w2[w2 != w2[3]], torch.ones(19, dtype=torch.float64))
    assert b2[3] == pytest.approx(beta.mean().item())  # poor fit: min(8, mean 4.4)
    assert b2[5] == 8.0  # a good fit keeps its own beta, even above the mean
    assert torch.equal(b2[:3], beta[:3])


@pytest.mark.parametrize("budget", [2.0, 2.5, 2.7, 3.0, 3.5, 4.0])
def test_allocate_heads_sums_exactly(budget):
    L, H = 5, 3
    g = torch.Generator().manual_seed(1)
    t = lambda: torch.rand(L, H, generator=g) + 0.1  # noqa: E731
    kb, vb = allocate_heads(t(), t(), 3 + t(), torch.ones(L, H), t(), t(), 3 + t(), torch.ones(L, H), budget)
    assert kb.shape == vb.shape == (L, H)
    assert int(kb.sum() + vb.sum()) == round(budget * 2 * L * H)
    kf, vf = allocate_heads(t(), t(), 3 + t(), torch.ones(L, H), t(), t(), 3 + t(), torch.ones(L, H), budget, integer=False)
    assert abs(torch.cat([kf, vf]).mean().item() - budget) < 1e-9


def test_allocate_heads_follows_sensitivity_and_separates_k_and_v():
    L, H = 4, 2
    ones = torch.ones(L, H)
    sens_k = torch.arange(1, L * H + 1, dtype=torch.float32).reshape(L, H).exp()  # rising sensitivity
    kb, vb = allocate_heads(sens_k, ones, 4 * ones, ones, 1e-6 * ones, ones, 4 * ones, ones, 3.0, bounds=(2, 5))
    assert (vb == 2).all()  # V barely matters: every V at b_min
    assert (kb.flatten().diff() >= 0).all()  # K widths follow the sensitivity
    assert int(kb.sum() + vb.sum()) == 3 * 2 * L * H
