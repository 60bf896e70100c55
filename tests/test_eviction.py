import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.config import RDKVConfig
from rdkv_hf.planners import modes
from rdkv_hf.planners.eviction import AdaKVPlanner, SnapKVPlanner, StreamingLLMPlanner


def _inputs(B=2, H=3, T=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, H, T, generator=g) ** 4
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :20] = False
    return w, torch.rand(B, H, 16, generator=g), real


def test_snapkv_keeps_budget_share_and_window():
    w, wc, real = _inputs()
    v, k = SnapKVPlanner(RDKVConfig(budget=4.0, window=8)).widths(0, w, wc, real)
    kept = (v > 0).sum(-1)
    assert kept[0].tolist() == [25] * 3 and kept[1].tolist() == [20] * 3  # floor(4/16 * real tokens)
    assert (v[:, :, -8:] == 16).all() and (v[1, :, :20] == 0).all() and (k == 16).all()
    top = w[0, 0, :-8].topk(25 - 8).indices
    assert (v[0, 0, top] == 16).all()


def test_streamingllm_keeps_sinks_and_recent():
    w, wc, real = _inputs()
    v, _ = StreamingLLMPlanner(RDKVConfig(budget=2.0)).widths(0, w, wc, real)  # 12 of 100, 10 of 80
    assert (v[0, :, :4] == 16).all() and (v[0, :, -8:] == 16).all() and (v[0, :, 4:92] == 0).all()
    assert (v[1, :, 20:24] == 16).all() and (v[1, :, -6:] == 16).all() and (v[1, :, 24:94] == 0).all()


def test_adakv_spends_the_layer_budget_with_a_floor_per_head():
    w, wc, real = _inputs()
    w[0, 0] *= 100  # one head much more attended than the others
    v, _ = AdaKVPlanner(RDKVConfig(budget=4.0, window=4)).widths(0, w, wc, real)
    kept = (v > 0).sum(-1)
    assert kept[0].sum() == 75 and kept[0, 0] > 25 and (kept[0] >= 5).all()
    assert (v[1, :, :20] == 0).all()


def test_baseline_runs_through_generate_at_matched_bytes():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.0)
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    cache = RDKVCache(model, planner=SnapKVPlanner(RDKVConfig(budget=2.0, high_precision_dtype="float16")))
    model.generate(ids, max_new_tokens=3, do_sample=False, **cache_kwargs(cache))
    assert all(h.n == 8 for s in cache.layers[0].segments for h in s.heads)  # 2/16 of 64 tokens
    assert 1.9 < cache.summary().prompt_bits_per_element <= 2.0


def test_baselines_score_tokens_without_rdkv_carry():
    """kvpress's definitions: average-pooled window attention, no forward carry (RDKV's addition)."""
    baselines = [cls for cls in modes().values() if cls.evicts_only]
    assert {cls.name for cls in baselines} == {"snapkv", "adakv", "streamingllm", "random"}
    assert RDKVConfig().carry > 0
    assert all(cls(RDKVConfig(budget=2.0, pool="max")).config.carry == 0 for cls in baselines)
    assert all(cls(RDKVConfig(budget=2.0, pool="max")).config.pool == "avg" for cls in baselines)


def test_baselines_are_modes_of_patch():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.0, mode="snapkv")
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = rdkv_hf.compat.output_cache(out)
    assert isinstance(cache.planner, SnapKVPlanner) and cache.rdkv_config.carry == 0
    assert all(h.n == 8 for h in cache.layers[0].segments[0].heads)
