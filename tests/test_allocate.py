import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdkv_hf.allocate import allocate_rdkv, carry_forward, lagrangian_widths, token_weights, unit_costs
from rdkv_hf.config import DEFAULT_EPS_K, DEFAULT_EPS_V, DEFAULT_WIDTHS

WIDTHS = torch.tensor(DEFAULT_WIDTHS)
EPS_V = torch.tensor([DEFAULT_EPS_V[b] for b in DEFAULT_WIDTHS])


def _distortion(w, opt):
    return (w.double() * EPS_V.double()[opt]).sum(1)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4), units=st.integers(1, 300), head_dim=st.sampled_from([16, 64, 128]),
    bits=st.floats(0.05, 16.0), seed=st.integers(0, 2**31 - 1), heavy=st.booleans(),
)
def test_never_exceeds_budget(rows, units, head_dim, bits, seed, heavy):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, units, generator=g)
    if heavy:
        w = w ** 8  # heavy-tailed weights, as attention is
    costs = unit_costs(WIDTHS, torch.full((rows,), head_dim))
    budget = torch.full((rows,), bits * units * head_dim, dtype=torch.float64)
    opt = lagrangian_widths(w, costs, EPS_V, budget)
    spent = torch.gather(costs, 1, opt).sum(1)
    assert (spent <= budget + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(units=st.integers(2, 200), seed=st.integers(0, 2**31 - 1), lo=st.floats(0.5, 8.0))
def test_more_budget_never_more_distortion(units, seed, lo):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(1, units, generator=g) ** 4
    costs = unit_costs(WIDTHS, torch.tensor([64]))
    d = [
        _distortion(w, lagrangian_widths(w, costs, EPS_V, torch.tensor([b * units * 64.0])))
        for b in (lo, lo * 1.5, 16.0)
    ]
    assert d[0] >= d[1] - 1e-9 and d[1] >= d[2] - 1e-9
    assert float(d[2]) == 0.0  # 16 bits an element keeps everything as is


def test_padding_is_always_evicted_and_free():
    w = torch.ones(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    costs = unit_costs(WIDTHS, torch.full((2,), 64))
    opt = lagrangian_widths(w, costs, EPS_V, torch.full((2,), 16 * 10 * 64.0), valid=valid)
    assert (opt[1, :4] == 0).all() and (WIDTHS[opt[1, 4:]] == 16).all()


def test_budget_is_used_not_wasted():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 2000, generator=g) ** 4
    costs = unit_costs(WIDTHS, torch.tensor([64]))
    budget = torch.tensor([2.5 * 2000 * 64])
    spent = torch.gather(costs, 1, lagrangian_widths(w, costs, EPS_V, budget)).sum(1)
    assert spent / budget > 0.97


def test_costs_count_scales_and_whole_words():
    c = unit_costs(torch.tensor([0, 2, 3, 16]), torch.tensor([64, 0]))
    assert c[0].tolist() == [0, 2 * 64 + 32, 7 * 32 + 32, 16 * 64]  # 3 bits: 10 codes a word
    assert c[1].tolist() == [0, 0, 0, 0]


def test_rdkv_v_then_k_respects_both_budgets():
    g = torch.Generator().manual_seed(1)
    R, T, D = 3, 500, 64
    w_tok, w_ch = torch.rand(R, T, generator=g) ** 6, torch.rand(R, D, generator=g)
    real = torch.ones(R, T, dtype=torch.bool)
    vb = kb = torch.full((R,), 2.5 * T * D, dtype=torch.float64)
    v_bits, k_bits = allocate_rdkv(w_tok, w_ch, real, vb, kb, DEFAULT_WIDTHS, DEFAULT_EPS_V, DEFAULT_EPS_K)
    n_kept = (v_bits > 0).sum(1)
    v_spent = torch.gather(unit_costs(WIDTHS, torch.full((R,), D)), 1, torch.searchsorted(WIDTHS, v_bits)).sum(1)
    k_spent = torch.gather(unit_costs(WIDTHS, n_kept), 1, torch.searchsorted(WIDTHS, k_bits)).sum(1)
    assert (v_spent <= vb).all() and (k_spent <= kb).all()
    # the heaviest tokens are kept at the highest widths
    top = w_tok.argmax(1)
    assert (v_bits[torch.arange(R), top] == v_bits.amax(1)).all()


def test_token_weights_normalize_by_visible_queries():
    # window of 2 queries over 3 tokens: token 2 is seen only by the last query
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]).reshape(1, 1, 1, 2, 3)
    visible = torch.tensor([[[1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    w = token_weights(probs, visible, pool_kernel=1)
    assert torch.allclose(w, torch.tensor([[[0.35, 0.35, 0.6]]]))


def test_token_weights_pooling_avg_and_max():
    # one query attends to token 4 of 9 only: avg spreads a fifth of it over +-2 tokens, max copies it
    probs = torch.zeros(1, 1, 1, 1, 9)
    probs[..., 4] = 1.0
    visible = torch.ones(1, 1, 9, dtype=torch.bool)
    avg = token_weights(probs, visible, pool_kernel=5)
    mx = token_weights(probs, visible, pool_kernel=5, pool="max")
    assert torch.allclose(avg[0, 0, 2:7], torch.full((5,), 0.2)) and avg[0, 0, :2].abs().sum() == 0
    assert torch.equal(mx[0, 0], torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 0, 0]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.sampled_from([0.3, 0.8, 0.95]), st.integers(0, 2**16))
def test_carry_forward_is_the_recurrence(T, rho, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(2, 3, T, generator=g) * (torch.rand(2, 3, T, generator=g) < 0.3)  # mostly zeros
    ref = w.clone()
    for t in range(1, T):
        ref[..., t] = torch.maximum(ref[..., t], rho * ref[..., t - 1])
    assert torch.allclose(carry_forward(w, rho), ref, rtol=1e-5, atol=1e-30)


def test_carry_keeps_the_tokens_after_an_attended_one():
    # the window attends to the first digit of a span (token 3); the next ones fade by 0.8 each
    probs = torch.zeros(1, 1, 1, 1, 8)
    probs[..., 3] = 1.0
    visible = torch.ones(1, 1, 8, dtype=torch.bool)
    w = token_weights(probs, visible, pool_kernel=1, carry=0.8)
    assert torch.allclose(w[0, 0], torch.tensor([0, 0, 0, 1, 0.8, 0.64, 0.512, 0.4096]))
    assert torch.equal(token_weights(probs, visible, pool_kernel=1, carry=0.0)[0, 0], probs[0, 0, 0, 0])


def test_pool_is_validated():
    import pytest

    from rdkv_hf.config import RDKVConfig

    with pytest.raises(ValueError, match="`pool` must be 'avg' or 'max', got 'min'"):
        RDKVConfig(budget=2.5, pool="min")
    with pytest.raises(ValueError, match=r"`carry` must be in \[0, 1\).*got 1.5"):
        RDKVConfig(budget=2.5, carry=1.5)
    with pytest.raises(ValueError, match="`pool`"):
        token_weights(torch.zeros(1, 1, 1, 1, 3), torch.ones(1, 1, 3, dtype=torch.bool), pool="median")
