"""The modes of rdkv_hf.planners: RDKVConfig.head_floor and the head budgets of 'rdkv+profile'."""

import dataclasses

import pytest
import torch

from rdkv_hf import RDKVProfile
from rdkv_hf.config import RDKVConfig
from rdkv_hf.head_budgets import floor_head_bits, ratequant_bits
from rdkv_hf.planners import make_planner


def profile_head_bits(config, profile, layers=None):
    """The per-head K and V budgets a profile mode's planner draws from `profile`."""
    planner = make_planner(config, profile, layers)
    return planner.k_bits, planner.v_bits


@pytest.fixture(scope="module")
def prof():
    # The shipped SmolLM2 profile: 30 layers x 3 KV heads, with heads the closed form starves to 0 bits.
    # RateQuant's curves: the shipped profile without its RDKV curves (as profiles saved before them)
    return dataclasses.replace(RDKVProfile.from_pretrained("smollm2-135m-instruct"), rd_budgets=None, rd_dist=None, sens_o=None)


def cfg(budget, **kw):
    return RDKVConfig(budget=budget, mode="rdkv+profile", profile="smollm2-135m-instruct", **kw)


@pytest.mark.parametrize("budget", [1.0, 1.5, 1.6, 2.5, 4.0])
@pytest.mark.parametrize("floor", [0.1, 0.25, 0.5, 0.9])
def test_floor_is_respected_and_the_mean_kept(prof, budget, floor):
    kb, vb = profile_head_bits(cfg(budget, head_floor=floor), prof)
    both = torch.stack([kb, vb])
    assert both.min() >= floor * budget - 1e-12
    assert abs(both.mean().item() - budget) < 1e-9  # the total is exactly 2N * budget
    hi = min(16, int(budget * 4))  # the closed form's upper bound still holds
    assert both.max() <= hi + 1e-12


@pytest.mark.parametrize("budget", [1.0, 2.5])
def test_zero_floor_reproduces_the_profile_allocation(prof, budget):
    kb, vb = profile_head_bits(cfg(budget, head_floor=0), prof)
    k0, v0 = ratequant_bits(prof, budget, integer=False, bounds=(0, min(16, int(budget * 4))))
    assert torch.equal(kb, k0) and torch.equal(vb, v0)
    if budget == 1.0:
        assert (torch.stack([k0, v0]) == 0).any()  # the shipped profile does evict whole heads without it


def test_default_floor_lifts_starved_heads_and_keeps_the_order(prof):
    assert RDKVConfig().head_floor == 0.25
    k0, v0 = profile_head_bits(cfg(1.0, head_floor=0), prof)
    kb, vb = profile_head_bits(cfg(1.0), prof)
    old, new = torch.stack([k0, v0]).flatten(), torch.stack([kb, vb]).flatten()
    assert new.min() == pytest.approx(0.25) and old.min() == 0
    above = old > 0.25
    # Above the floor the allocation is the profile's, scaled by one factor: order kept.
    assert torch.equal(torch.argsort(old[above]), torch.argsort(new[above]))
    assert make_planner(cfg(1.0), prof).v_bits.min() >= 0.25 - 1e-12


def test_floor_head_bits_edge_cases():
    k, v = torch.tensor([[0.0, 2.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    assert floor_head_bits(k, v, 0.0) == (k, v)  # off
    kf, vf = floor_head_bits(k, v, 0.5)
    both = torch.stack([kf, vf])
    assert both.min() == pytest.approx(0.5) and both.mean().item() == pytest.approx(1.0)
    assert kf[0, 1] > vf[0, 0] > kf[0, 0]  # order kept
    same = torch.ones(1, 2, dtype=torch.float64)
    assert floor_head_bits(same, same, 0.5) == (same, same)  # already above the floor
    with pytest.raises(ValueError, match="head_floor"):
        floor_head_bits(k, v, 1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "0.25"])
def test_head_floor_validation_names_the_value_and_the_fix(bad):
    with pytest.raises(ValueError, match=r"`head_floor`.*\[0, 1\).*got " + repr(bad).replace(".", r"\.") + r".*0 turns the floor off"):
        RDKVConfig(head_floor=bad)


def test_head_floor_round_trips_and_other_modes_ignore_it():
    c = RDKVConfig(head_floor=0.1)
    d = c.to_dict()
    assert d["head_floor"] == 0.1 and RDKVConfig.from_dict(d) == c
    assert RDKVConfig(head_floor=0).head_floor == 0.0 and isinstance(RDKVConfig(head_floor=0).head_floor, float)
    # An old saved config without the key takes the default.
    d.pop("head_floor")
    assert RDKVConfig.from_dict(d).head_floor == 0.25
    # Plain rdkv has equal head budgets: the floor changes nothing there.
    w_tok, w_ch = torch.rand(1, 2, 40, generator=torch.Generator().manual_seed(0)), torch.rand(1, 2, 16)
    real = torch.ones(1, 40, dtype=torch.bool)
    a = make_planner(RDKVConfig(budget=2.0, head_floor=0.0)).widths(0, w_tok, w_ch, real)
    b = make_planner(RDKVConfig(budget=2.0, head_floor=0.5)).widths(0, w_tok, w_ch, real)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode,budget", [("rdkv+profile", 1.6), ("rdkv+profile", 2.5), ("ratequant", 3.0)])
def test_profile_budgets_are_shared_by_the_compressed_layers_only(prof, mode, budget):
    # As for a model whose other layers are sliding-window ones (Gemma 3): those layers get 0 bits
    # and the compressed ones hold the whole budget, exactly what a profile of only them gives.
    layers = [5, 11, 17, 23, 29]
    c = RDKVConfig(budget=budget, mode=mode, profile="x")
    kb, vb = profile_head_bits(c, prof, layers)
    others = [i for i in range(30) if i not in layers]
    assert kb[others].abs().sum() == 0 and vb[others].abs().sum() == 0
    k_sub, v_sub = profile_head_bits(c, prof.select_layers(layers))
    assert torch.equal(kb[layers], k_sub) and torch.equal(vb[layers], v_sub)
    if mode == "rdkv+profile":
        assert torch.stack([kb[layers], vb[layers]]).double().mean().item() == pytest.approx(budget, abs=1e-9)
    full_k, full_v = profile_head_bits(c, prof)
    # not the all-layer allocation cut down (RateQuant's integer widths may coincide on K alone)
    assert not (torch.equal(kb[layers], full_k[layers]) and torch.equal(vb[layers], full_v[layers]))


def test_rdkv_cache_of_a_sliding_window_model_plans_its_global_layers():
    from conftest import tiny_model

    from rdkv_hf import RDKVCache
    from rdkv_hf.calibration import calibrate

    model = tiny_model("gemma3")  # layers: sliding, sliding, full
    profile = calibrate(model, torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0)), progress=False)
    cache = RDKVCache(model.config, RDKVConfig(budget=2.0, mode="rdkv+profile", profile="x"), profile=profile)
    kb, vb = cache.planner.k_bits, cache.planner.v_bits
    assert cache.rdkv_layers == [2]
    assert kb[:2].abs().sum() == 0 and vb[:2].abs().sum() == 0
    assert torch.stack([kb[2], vb[2]]).mean().item() == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="`layers` must be indices"):
        make_planner(cache.rdkv_config, profile, layers=[7])



@pytest.mark.parametrize("budget", [0.4, 0.9])
def test_rdkv_profile_refuses_budgets_below_one_bit(prof, budget):
    with pytest.raises(ValueError, match=r"needs `budget` in \[1, 8\] bits, got .*use mode='rdkv'"):
        make_planner(cfg(budget), prof)


def test_shipped_profiles_plan_from_their_rdkv_curves_below_one_bit():
    """The shipped profiles carry RDKV curves: rdkv+profile then serves 0.25-8 bits (Gemma at 0.4)."""
    shipped = RDKVProfile.from_pretrained("smollm2-135m-instruct")
    assert shipped.has_rd_curves
    kb, vb = profile_head_bits(RDKVConfig(budget=0.4, mode="rdkv+profile", profile="x"), shipped)
    assert torch.stack([kb, vb]).double().mean().item() == pytest.approx(0.4, abs=1e-9)
    assert torch.allclose(kb, vb)  # one budget per head, split by k_share = 0.5
