import warnings

import pytest
import torch
from conftest import TOL, tiny_model
from transformers import DynamicCache

import rdkv_hf
from rdkv_hf import RDKVCache, compat
from rdkv_hf.compat import cache_kwargs, output_cache
from rdkv_hf.config import RDKVConfig
from rdkv_hf.state import patch_state

EXACT = dict(budget=16, high_precision_dtype="float32")  # 16 bits kept in the model's fp32


def _full_layers(model):
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "full_attention"]


def _gen(model, ids, **kw):
    return model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0, **kw)


def test_budget_16_is_token_for_token_greedy(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 37), generator=torch.Generator().manual_seed(1))
    ref = _gen(model, ids)
    rdkv_hf.patch(model, **EXACT)
    out = model.generate(ids, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
    assert isinstance(output_cache(out), RDKVCache)
    assert output_cache(out).rdkv_layers == _full_layers(model)
    assert torch.equal(out.sequences, ref)


def test_budget_16_padded_batch(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (2, 29), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # left padding
    ref = _gen(model, ids, attention_mask=mask)
    rdkv_hf.patch(model, **EXACT)
    assert torch.equal(_gen(model, ids, attention_mask=mask), ref)


def test_budget_16_beam_search(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 25), generator=torch.Generator().manual_seed(3))
    ref = _gen(model, ids, num_beams=3)
    rdkv_hf.patch(model, **EXACT)
    assert torch.equal(_gen(model, ids, num_beams=3), ref)


def test_compressed_generation_runs_all_decoding_modes(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    rdkv_hf.patch(model, budget=2.5)
    torch.manual_seed(0)
    for kw in (dict(), dict(do_sample=True, top_k=10), dict(num_beams=2)):
        out = model.generate(ids, max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True, **kw)
        assert out.sequences.shape == (2, 46)
        cache = output_cache(out)
        assert 0 < cache.summary().prompt_bits_per_element <= 2.5


def test_padded_rows_are_compressed_on_their_real_tokens():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    rdkv_hf.patch(model, budget=16, high_precision_dtype="float32")
    cache = RDKVCache(model)
    model(ids, attention_mask=mask, **cache_kwargs(cache))
    seg = cache.layers[0].segments[0]
    assert seg.real_tokens.tolist() == [40, 25]
    assert [h.n for h in seg.heads] == [40, 40, 25, 25]  # padding evicted, nothing else


def _two_turn_logits(model, cache, ids, follow, steps=3):
    out = model(ids, **cache_kwargs(cache))
    logits = [out.logits[:, -1]]
    out = model(follow, **cache_kwargs(cache))  # a multi-token forward after compression
    logits.append(out.logits[:, -1])
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(nxt, **cache_kwargs(cache)).logits[:, -1])
    return torch.stack(logits)


def test_follow_up_turn_after_compression_at_budget_16(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(6)
    ids, follow = torch.randint(1, 128, (1, 33), generator=g), torch.randint(1, 128, (1, 7), generator=g)
    ref = _two_turn_logits(model, DynamicCache(config=model.config), ids, follow)
    rdkv_hf.patch(model, **EXACT)
    cache = RDKVCache(model)
    got = _two_turn_logits(model, cache, ids, follow)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert len(cache.layers[cache.rdkv_layers[0]].segments) == 2  # the follow-up: a segment of its own


def test_follow_up_kept_in_full_precision_when_asked():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5, compress_followups=False)
    cache = RDKVCache(model)
    model(torch.randint(1, 128, (1, 30)), **cache_kwargs(cache))
    model(torch.randint(1, 128, (1, 5)), **cache_kwargs(cache))
    model(torch.randint(1, 128, (1, 1)), **cache_kwargs(cache))
    assert len(cache.layers[0].segments) == 1 and cache.layers[0].keys.shape[-2] == 6


def test_chunked_prefill_matches_at_budget_16():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 50), generator=torch.Generator().manual_seed(7))
    ref = _gen(model, ids)
    rdkv_hf.patch(model, **EXACT)
    assert torch.equal(_gen(model, ids, prefill_chunk_size=16), ref)


def test_unpatch_restores_identity():
    model = tiny_model("llama")
    attn_before = model.config._attn_implementation
    hooks_before = [dict(l.self_attn._forward_pre_hooks) for l in model.model.layers]
    rdkv_hf.patch(model, budget=2.5)
    assert model.config._attn_implementation == "rdkv" and "generate" in model.__dict__
    assert rdkv_hf.unpatch(model) is model
    assert model.config._attn_implementation == attn_before
    assert "generate" not in model.__dict__ and model.generate.__func__ is type(model).generate
    assert [dict(l.self_attn._forward_pre_hooks) for l in model.model.layers] == hooks_before
    assert not any(hasattr(l.self_attn, "_rdkv_layer") for l in model.model.layers)
    assert not rdkv_hf.is_patched(model)


def test_patch_twice_replaces_settings_and_adds_no_hooks():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    rdkv_hf.patch(model, budget=4.0)
    assert patch_state(model).config.budget == 4.0
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    rdkv_hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_context_manager_restores_on_error():
    model = tiny_model("llama")
    with pytest.raises(KeyError):
        with rdkv_hf.patched(model, budget=2.5):
            assert rdkv_hf.is_patched(model)
            raise KeyError("boom")
    assert not rdkv_hf.is_patched(model)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(budget=17), ValueError, r"`budget` must be in \(0, 16\].*got 17"),
        (dict(budget=0), ValueError, "got 0"),
        (dict(budget="2"), TypeError, "budget"),
        (dict(tokens=-3), ValueError, "tokens"),
        (dict(budget=2.5, mode="fancy"), ValueError, "mode"),
        (dict(budget=2.5, mode="ratequant"), ValueError, "profile"),
        (dict(budget=2.5, window=0), ValueError, "window"),
        (dict(budget=2.5, nonsense=1), TypeError, "nonsense"),
    ],
)
def test_bad_arguments_raise_and_leave_model_untouched(kwargs, exc, match):
    model = tiny_model("llama")
    with pytest.raises(exc, match=match):
        rdkv_hf.patch(model, **kwargs)
    assert not rdkv_hf.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"'gpt2' yet; supported: \[.*'gemma3_text', .*'llama', .*'mistral', .*'qwen3'.*\]"):
        rdkv_hf.patch(model, budget=2.5)
    assert "generate" not in model.__dict__


def test_failed_patch_rolls_back(monkeypatch):
    model = tiny_model("llama")

    def boom(*a, **k):
        raise RuntimeError("late failure")

    # The last step of patch() writes the settings into model.config.
    monkeypatch.setattr(RDKVConfig, "to_dict", boom)
    with pytest.raises(RuntimeError, match="late failure"):
        rdkv_hf.patch(model, budget=2.5)
    assert model.config._attn_implementation == "sdpa" and not rdkv_hf.is_patched(model)
    assert "generate" not in model.__dict__ and not hasattr(model.config, "rdkv")


def test_sliding_mistral_warns_and_still_matches():
    model = tiny_model("mistral-sliding")
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(8))
    ref = _gen(model, ids)
    with pytest.warns(UserWarning, match="sliding-window"):
        rdkv_hf.patch(model, budget=2.5)
    out = model.generate(ids, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
    assert output_cache(out).rdkv_layers == []
    assert torch.equal(out.sequences, ref)


def test_qwen3_partly_sliding_compresses_full_layers_only():
    model = tiny_model("qwen3", num_hidden_layers=3, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(9))
    ref = _gen(model, ids)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rdkv_hf.patch(model, **EXACT)
    assert any("sliding-window" in str(x.message) for x in w)
    out = model.generate(ids, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert output_cache(out).rdkv_layers == [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]


def test_rdkv_cache_requires_config_or_patched_model():
    with pytest.raises(TypeError, match="patch"):
        RDKVCache(object())
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="RDKVConfig"):
        RDKVCache(model.config)
    assert isinstance(RDKVCache(model.config, RDKVConfig(budget=3)), RDKVCache)


def test_generate_with_a_foreign_cache_warns():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(10))
    with pytest.warns(UserWarning, match="compression is off"):
        model.generate(ids, max_new_tokens=2, do_sample=False, **cache_kwargs(DynamicCache(config=model.config)))


def test_profile_modes_on_the_shipped_smollm2_profile_need_the_right_model():
    from rdkv_hf import RDKVProfile

    prof = RDKVProfile.from_pretrained("smollm2-135m-instruct")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="fingerprint|weights_sha256|num_layers"):
        rdkv_hf.patch(model, budget=2.5, profile=prof)
    assert not rdkv_hf.is_patched(model)


@pytest.mark.parametrize("mode", ["rdkv+profile", "ratequant"])
def test_profile_modes_run_within_budget(mode, tmp_path):
    from rdkv_hf import calibrate

    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(1, 128, (4, 64), generator=torch.Generator().manual_seed(11))
    prof = calibrate(model, ids, progress=False)
    prof.save_pretrained(tmp_path)
    rdkv_hf.patch(model, budget=3.0, profile=str(tmp_path), mode=mode)
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    s = output_cache(out).summary()
    widths = {b for r in s.rows for b, n in r.v_widths.items() if n}
    if mode == "ratequant":
        assert 0 not in widths and all(r.kept_tokens == r.prompt_tokens for r in s.rows)
    assert s.prompt_bits_per_element <= 3.0  # everything stored counts, scales included
    with pytest.raises(ValueError, match="not `tokens`"):
        rdkv_hf.patch(model, tokens=8, profile=str(tmp_path), mode=mode)


def test_public_names():
    import rdkv_hf.calibration  # noqa: F401  (importing the module must not shadow the function)

    assert callable(rdkv_hf.calibrate) and not isinstance(rdkv_hf.calibrate, type(rdkv_hf))
    for name in ("patch", "unpatch", "RDKVCache", "RDKVProfile", "from_pretrained", "calibrate"):
        assert name in rdkv_hf.__all__ and hasattr(rdkv_hf, name)
    assert hasattr(rdkv_hf.RDKVCache, "nbytes") and hasattr(rdkv_hf.RDKVCache, "summary")


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_both_spellings_of_the_cache_argument_bind_the_layer(name):
    if name == "cache" and compat.CACHE_ARG != "cache":
        pytest.skip(f"transformers {compat.TRANSFORMERS_VERSION} takes only past_key_values=")
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(11)
    ids, nxt = torch.randint(1, 128, (1, 33), generator=g), torch.randint(1, 128, (1, 1), generator=g)
    ref_cache = DynamicCache(config=model.config)
    model(ids, **cache_kwargs(ref_cache))
    ref = model(nxt, **cache_kwargs(ref_cache)).logits
    rdkv_hf.patch(model, **EXACT)
    cache = RDKVCache(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated since 5.24
        model(ids, **{name: cache})
        got = model(nxt, **{name: cache}).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **{name: RDKVCache(model)})
    assert all(len(cache.layers[i].segments) == 1 for i in cache.rdkv_layers)  # the prompt was compressed
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    assert len(output_cache(out).layers[0].segments) == 1


def test_attention_module_called_with_a_positional_cache_binds_the_layer():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    cache = RDKVCache(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 40, model.config.hidden_size)
    pos = model.model.rotary_emb(x, torch.arange(40)[None])
    attn(x, pos, None, cache)  # hidden_states, position_embeddings, attention_mask, cache: all positional
    assert len(cache.layers[0].segments) == 1 and cache.layers[0].keys.shape[-2] == 0


def test_generate_reads_the_cache_from_either_name_and_refuses_both():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    ids = torch.randint(1, 128, (1, 20))
    if compat.CACHE_ARG == "cache":
        with pytest.raises(ValueError, match="both `cache=` and `past_key_values=`"):
            model.generate(ids, max_new_tokens=2, cache=RDKVCache(model), past_key_values=RDKVCache(model))
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(out), RDKVCache)


def test_a_transformers_outside_the_tested_range_is_refused_with_the_fix(monkeypatch):
    from packaging.version import Version

    model = tiny_model("llama")
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version("6.1.0"))
    with pytest.raises(ImportError, match=r"supports transformers>=.*,<6; found .*pip install 'transformers>="):
        rdkv_hf.patch(model, budget=2.5)
    assert not rdkv_hf.is_patched(model)
