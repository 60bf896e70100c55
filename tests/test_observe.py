"""Packing that waits for the first decoded queries (RDKVConfig.observe, rdkv_hf.observe)."""

import pytest
import torch
from conftest import tiny_model

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.compat import cache_kwargs, output_cache
from rdkv_hf.config import RDKVConfig
from rdkv_hf.context import prefill

EXACT = dict(budget=16, high_precision_dtype="float32")


def _model(arch="llama"):
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None  # generate every asked token
    return model


def _ids(n=40, seed=0, batch=1):
    return torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _layer(cache):
    return cache.layers[cache.rdkv_layers[0]]


@torch.no_grad()
def _steps(model, cache, ids, tokens):
    """The prompt (None: none), then `tokens` one decode step each; the last logits."""
    logits = None if ids is None else model(ids, **cache_kwargs(cache)).logits
    for t in tokens:
        logits = model(torch.tensor([[t]]), **cache_kwargs(cache)).logits
    return logits[0, -1]


def test_tokens_wait_in_full_precision_until_the_observed_decode_steps():
    model = _model()
    ids = _ids()
    with rdkv_hf.patched(model, budget=2.5, observe=3):
        cache = RDKVCache(model)
        _steps(model, cache, ids, [])
        layer = _layer(cache)
        assert (layer.observe_n, len(layer.segments), layer.keys.shape[2]) == (40, 0, 40)
        full_bytes = cache.nbytes
        assert cache.summary().waiting_tokens == 40 and "40 tokens wait in full precision" in str(cache.summary())
        _steps(model, cache, None, [5, 6])
        assert (layer.observe_n, len(layer.segments)) == (40, 0)  # two of three decode steps
        _steps(model, cache, None, [7])
        assert (layer.observe_n, len(layer.segments), layer.keys.shape[2]) == (0, 1, 3)
        assert int(layer.segments[0].real_tokens.max()) == 40
        assert cache.nbytes < full_bytes / 3
        assert layer.observe_mass is None
        assert cache.summary().waiting_tokens == 0 and "wait" not in str(cache.summary())


def test_the_observed_queries_weigh_the_prompt_as_one_forward_with_the_wider_window_does():
    """The prompt's last `window` queries plus `observe` decoded ones give the widths that one forward
    over the prompt and those tokens gives with a window of ``window + observe`` (the decoded tokens kept
    in the tail as its residual): the sums add up to the same attention. Pooling is off (it reads the
    tokens after the prompt in the one-forward run)."""
    model = _model()
    ids, extra = _ids(48), [9, 17, 33, 2]
    knobs = dict(budget=2.0, pool_kernel=1, carry=0.0)
    with rdkv_hf.patched(model, observe=4, window=8, **knobs):
        waited = RDKVCache(model)
        _steps(model, waited, ids, extra)
    with rdkv_hf.patched(model, window=12, residual=4, **knobs):
        at_once = RDKVCache(model)
        _steps(model, at_once, torch.cat([ids, torch.tensor([extra])], 1), [])
    for i in waited.rdkv_layers:
        a, b = waited.layers[i].segments[0], at_once.layers[i].segments[0]
        for ha, hb in zip(a.heads, b.heads):
            assert ha.v_widths() == hb.v_widths() and ha.k_widths() == hb.k_widths()
            assert torch.equal(ha.channel_order(), hb.channel_order())
    with rdkv_hf.patched(model, budget=2.0, window=8):  # and they differ from the prompt's window alone
        alone = RDKVCache(model)
        _steps(model, alone, ids, [])
    assert any(ha.v_widths() != hb.v_widths() for i in alone.rdkv_layers
               for ha, hb in zip(alone.layers[i].segments[0].heads, waited.layers[i].segments[0].heads))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_budget_16_with_observe_is_token_for_token_exact(arch):
    model = _model(arch)
    ids = _ids(40, seed=1)
    ref = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0)
    with rdkv_hf.patched(model, observe=5, **EXACT):
        out = model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert len(_layer(output_cache(out)).segments) == 1  # the prompt was packed on the way


def test_beam_search_and_padded_batches_wait_and_stay_exact():
    model = _model()
    ids = _ids(36, seed=2)
    beams = dict(num_beams=3, do_sample=False, max_new_tokens=10, pad_token_id=0)
    ref = model.generate(ids, **beams)
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), _ids(30, seed=3)], 1), ids], 0)
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    greedy = dict(attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    ref_batch = model.generate(batch, **greedy)
    with rdkv_hf.patched(model, observe=4, **EXACT):
        assert torch.equal(model.generate(ids, **beams), ref)
        assert torch.equal(model.generate(batch, **greedy), ref_batch)


def test_a_follow_up_packs_the_waiting_tokens_after_adding_its_queries_then_waits_itself():
    model = _model()
    ids = _ids(40)
    with rdkv_hf.patched(model, budget=2.5, observe=4):
        cache = RDKVCache(model)
        _steps(model, cache, ids, [3])
        with torch.no_grad():
            model(_ids(9, seed=4), **cache_kwargs(cache))
        layer = _layer(cache)
        assert len(layer.segments) == 1 and int(layer.segments[0].real_tokens.max()) == 40
        assert (layer.observe_n, layer.keys.shape[2]) == (10, 10)  # the decoded token and the follow-up wait
    with rdkv_hf.patched(model, budget=2.5, observe=4, compress_followups=False):
        cache = RDKVCache(model)
        _steps(model, cache, ids, [3])
        with torch.no_grad():
            model(_ids(9, seed=4), **cache_kwargs(cache))
        layer = _layer(cache)
        assert (len(layer.segments), layer.observe_n, layer.keys.shape[2]) == (1, 0, 10)  # kept whole, not waiting


def test_a_follow_up_attends_to_the_waiting_tokens_as_the_full_cache_does():
    model = _model()
    ids, follow = _ids(40), _ids(7, seed=5)
    with torch.no_grad():
        ref = model(torch.cat([ids, follow], 1)).logits[0, -7:]
    with rdkv_hf.patched(model, budget=2.5, observe=4):
        cache = RDKVCache(model)
        with torch.no_grad():
            model(ids, **cache_kwargs(cache))
            got = model(follow, **cache_kwargs(cache)).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_flush_and_save_pack_the_waiting_tokens(tmp_path):
    model = _model()
    ids = _ids(40)
    with rdkv_hf.patched(model, budget=2.5, observe=8):
        cache = RDKVCache(model)
        _steps(model, cache, ids, [1])
        assert cache.flush() == 40 and cache.flush() == 0
        assert _layer(cache).observe_n == 0 and len(_layer(cache).segments) == 1
        again = RDKVCache(model)
        _steps(model, again, ids, [])
        again.save_pretrained(tmp_path / "ctx", input_ids=ids)
        assert _layer(again).observe_n == 0
        loaded = RDKVCache.from_pretrained(tmp_path / "ctx", model)
        assert len(_layer(loaded).segments) == 1


def test_forks_share_the_waiting_tokens_packed_once():
    model = _model()
    with rdkv_hf.patched(model, budget=2.5, observe=8):
        cache = RDKVCache(model)
        _steps(model, cache, _ids(40), [])
        forks = [cache.fork(), cache.fork(2)]
        assert _layer(cache).observe_n == 0
        for f in forks:
            shared = _layer(f).segments[0].buffers.words.untyped_storage().data_ptr()
            assert _layer(f).observe_n == 0 and shared == _layer(cache).segments[0].buffers.words.untyped_storage().data_ptr()


def test_a_prompt_past_observe_max_is_packed_at_once():
    model = _model()
    with rdkv_hf.patched(model, budget=2.5, observe=4, observe_max=32):
        cache = RDKVCache(model)
        _steps(model, cache, _ids(40), [])
        assert _layer(cache).observe_n == 0 and len(_layer(cache).segments) == 1
        short = RDKVCache(model)
        _steps(model, short, _ids(30), [])
        assert _layer(short).observe_n == 30


def test_observe_with_decode_blocks_packs_the_prompt_then_the_blocks():
    model = _model()
    ids = _ids(40, seed=6)
    ref = model.generate(ids, do_sample=False, max_new_tokens=50, pad_token_id=0)
    with rdkv_hf.patched(model, observe=6, decode_block=16, **EXACT):
        out = model.generate(ids, do_sample=False, max_new_tokens=50, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    segments = _layer(output_cache(out)).segments
    assert [s.decoded for s in segments][:1] == [False] and sum(s.decoded for s in segments) >= 1


def test_waiting_state_made_under_inference_mode_goes_on_under_no_grad():
    model = _model()
    with rdkv_hf.patched(model, budget=2.5, observe=2):
        cache = RDKVCache(model)
        with torch.inference_mode():
            model(_ids(40), **cache_kwargs(cache))
        _steps(model, cache, None, [4, 5])
        assert len(_layer(cache).segments) == 1


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_observe_must_be_a_count_of_tokens(bad):
    with pytest.raises(ValueError, match="`observe`"):
        RDKVConfig(budget=2.5, observe=bad)
    with pytest.raises(ValueError, match="`observe_max`"):
        RDKVConfig(budget=2.5, observe_max=bad)


def test_observe_is_refused_under_a_byte_cap():
    with pytest.raises(ValueError, match="`max_cache_bytes` forbids between forwards; leave observe=None"):
        RDKVConfig(budget=2.5, observe=8, decode_block=64, max_cache_bytes=10**6)


@pytest.mark.library_defaults
def test_the_default_waits_for_16_decoded_queries_but_not_under_a_cap():
    cfg = RDKVConfig()
    assert (cfg.observe, cfg.waits_for, cfg.observe_max) == (None, 16, 2048)
    assert cfg.observes(2048) and not cfg.observes(2049)  # longer prompts pack at their forward
    assert RDKVConfig.from_dict(cfg.to_dict()).observe is None  # a saved config keeps the default, not 16
    assert RDKVConfig(observe=0).waits_for == 0 and RDKVConfig(observe=3).waits_for == 3
    assert RDKVConfig(decode_block=64, max_cache_bytes=10**6).waits_for == 0


@pytest.mark.library_defaults
def test_generate_with_the_defaults_packs_the_prompt_after_16_tokens():
    """patch() with no settings: a 600-token prompt is packed after 16 decode steps (the 17th new token), not before."""
    model = tiny_model("llama", max_position_embeddings=2048)
    model.generation_config.eos_token_id = None
    ids = _ids(600)
    with rdkv_hf.patched(model):
        short = output_cache(model.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True))
        assert _layer(short).observe_n == 600 and "600 tokens wait in full precision" in str(short.summary())
        done = output_cache(model.generate(ids, max_new_tokens=18, do_sample=False, return_dict_in_generate=True))
    assert _layer(done).observe_n == 0 and len(_layer(done).segments) == 1
    assert done.summary().prompt_bits_per_element <= 2.5


def test_the_evaluation_teacher_forces_over_the_packed_prompt():
    """``eval.runner.teacher_forced`` packs waiting tokens first: a teacher-forced continuation is one
    multi-token forward, which would otherwise read the prompt in full precision and measure nothing."""
    from rdkv_hf.eval.runner import teacher_forced

    model = _model()
    ids, cont = _ids(40), _ids(8, seed=7)
    nll = {}
    for observe in (0, 6):
        with rdkv_hf.patched(model, budget=1.0, observe=observe):
            cache = RDKVCache(model)
            _steps(model, cache, ids, [])
            nll[observe] = teacher_forced(model, cache, cont[:, :-1], cont[:, 1:])[0]
            assert int(_layer(cache).segments[0].real_tokens.max()) == 40  # the prompt, packed before it
    full = teacher_forced(model, None, torch.cat([ids, cont[:, :-1]], 1), torch.cat([ids[:, 1:], cont], 1))[0]
    assert nll[6] == pytest.approx(nll[0], rel=1e-6) and nll[6] != pytest.approx(full, rel=1e-3)


def test_a_context_for_many_questions_is_packed_by_prefill():
    """`prefill` (compress once, ask many) has no one answer to wait for: it packs at once."""
    model = _model()
    with rdkv_hf.patched(model, budget=2.5, observe=4):
        cache = prefill(model, _ids(40))
    assert _layer(cache).observe_n == 0 and len(_layer(cache).segments) == 1
