"""Compressed decoding (RDKVConfig.decode_block) and the byte cap (max_cache_bytes)."""

import importlib.util
import os

import pytest
import torch
from conftest import run_triton_tests_in_interpreter, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rdkv_hf
from rdkv_hf import RDKVCache, cache_cap
from rdkv_hf.attention import attend
from rdkv_hf.compat import cache_kwargs, output_cache
from rdkv_hf.config import DEFAULT_NOVELTY, RDKVConfig
from rdkv_hf.decode_blocks import attended, keep_tokens

EXACT = dict(budget=16, high_precision_dtype="float32")


def _model(arch="llama", **kw):
    model = tiny_model(arch, **kw)
    model.generation_config.eos_token_id = None  # generate every asked token
    return model


def _layer(cache):
    return cache.layers[cache.rdkv_layers[0]]


def _decoded(cache):
    return [s for s in _layer(cache).segments if s.decoded]


def _gen(model, ids, n=60, **kw):
    return model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)


@pytest.mark.parametrize("q", [1, 6])
def test_window_sums_without_a_mask_equal_those_with_the_causal_mask(q):
    """The causal fast path of the window sums (no mask: every window query sees its whole block)
    gives the state the masked path gives with the causal mask written out."""
    import types

    from rdkv_hf import decode_blocks

    cfg = RDKVConfig(budget=2.5, decode_block=16, decode_window=4)
    g = torch.Generator().manual_seed(q)
    keys, query = torch.randn(2, 3, 35, 8, generator=g), torch.randn(2, 6, q, 8, generator=g)
    lse = torch.randn(2, 6, q, generator=g) + 4
    pos = torch.arange(35 - q, 35)[:, None]
    causal = (torch.arange(35)[None, :] <= pos).expand(2, 1, q, 35)
    states = []
    for mask in (None, causal):
        layer = types.SimpleNamespace(config=cfg, keys=keys)
        decode_blocks._reset(layer)
        decode_blocks._accumulate(layer, query, mask, 0.3, lse, None)
        states.append([getattr(layer, name) for name in decode_blocks.STATE])
    assert states[0][0].abs().sum() > 0  # some window query was summed
    for a, b in zip(*states):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("residual,window", [(0, None), (5, 3)])
def test_budget_16_with_decode_blocks_is_token_for_token(one_thread, arch, residual, window):
    model = _model(arch)
    ids = torch.randint(1, 128, (1, 29), generator=torch.Generator().manual_seed(1))
    ref = _gen(model, ids)
    rdkv_hf.patch(model, **EXACT, decode_block=8, residual=residual, decode_window=window)
    out = _gen(model, ids, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = output_cache(out)
    keep = keep_tokens(cache.rdkv_config)
    assert len(_decoded(cache)) >= 5  # several decoded segments, attended as one stack
    assert keep <= _layer(cache).keys.shape[-2] < keep + 8  # the tail: the newest tokens only


def test_budget_16_beam_search_and_padded_batch_with_decode_blocks(one_thread, arch):
    model = _model(arch)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (2, 29), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # left padding
    beam_ids = ids[:1, 5:]
    ref_pad, ref_beam = _gen(model, ids, 40, attention_mask=mask), _gen(model, beam_ids, 40, num_beams=3)
    rdkv_hf.patch(model, **EXACT, decode_block=6, residual=3)
    assert torch.equal(_gen(model, ids, 40, attention_mask=mask), ref_pad)
    out = _gen(model, beam_ids, 40, num_beams=3, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_beam)
    assert len(_decoded(output_cache(out))) >= 5


def test_compressed_decoding_runs_every_decoding_mode_within_the_budget(one_thread):
    model = _model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    rdkv_hf.patch(model, budget=2.5, decode_block=32)
    torch.manual_seed(0)
    for kw in (dict(), dict(do_sample=True, top_k=10), dict(num_beams=2), dict(attention_mask=mask)):
        out = model.generate(ids, max_new_tokens=100, pad_token_id=0, return_dict_in_generate=True, **kw)
        cache = output_cache(out)
        decoded = _decoded(cache)
        assert out.sequences.shape == (2, 140) and len(decoded) == 2, kw
        for seg in decoded:  # each block within the budget, scales and channel orders counted
            bits = 8 * sum(h.nbytes for h in seg.heads) / (2 * int(seg.real_tokens.sum()) * 2 * 64)
            assert 0 < bits <= 2.5, kw


def test_decode_block_settings_are_checked():
    with pytest.raises(ValueError, match="`decode_block` must be an int >= 2"):
        RDKVConfig(decode_block=1)
    with pytest.raises(ValueError, match="give `budget`, not `tokens`"):
        RDKVConfig(tokens=64, decode_block=32)
    with pytest.raises(ValueError, match="set `decode_block` too"):
        RDKVConfig(max_cache_bytes=10**6)
    with pytest.raises(ValueError, match="exceeds `decode_block`"):
        RDKVConfig(decode_block=16, decode_window=32)
    with pytest.raises(ValueError, match="cannot hold `max_cache_bytes`"):
        RDKVConfig(mode="uniform", decode_block=16, max_cache_bytes=10**6)
    with pytest.raises(ValueError, match="set `decode_block` too"):
        RDKVConfig(decode_novelty=2.0)
    with pytest.raises(ValueError, match="`decode_novelty` must be a number >= 0"):
        RDKVConfig(decode_block=16, decode_novelty=-1)
    with pytest.raises(ValueError, match="mode='snapkv' weighs decoded tokens its own way"):
        RDKVConfig(mode="snapkv", decode_block=16, decode_novelty=2.0)
    assert RDKVConfig(mode="snapkv", decode_block=16, decode_novelty=0).novelty == 0.0
    assert RDKVConfig(decode_block=16).novelty == DEFAULT_NOVELTY


def test_a_key_that_points_away_from_its_block_gains_weight():
    """add_novelty: under even attention, the one key unlike the others weighs most; padding gains
    nothing; strength 0 changes nothing; the eviction modes' blocks keep their attention weights."""
    from rdkv_hf.allocate import add_novelty
    from rdkv_hf.planners import planner_class

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 12, 8, generator=g) * 0.1 + torch.ones(8)  # every key near one direction
    keys[0, :, 5] = -torch.ones(8)  # but one
    real = torch.ones(1, 12, dtype=torch.bool)
    real[0, 11] = False
    w = torch.full((1, 2, 12), 0.1) * real
    out = add_novelty(w, keys, real, 4.0)
    assert (out.argmax(-1) == 5).all() and (out[0, :, 5] > 4 * 0.1).all()  # z > 1: gains more than 4 mean weights
    assert (out >= w).all() and (out[0, :, 11] == 0).all()
    assert add_novelty(w, keys, real, 0.0) is w
    rdkv = planner_class("rdkv")(RDKVConfig(decode_block=16))
    snap = planner_class("snapkv")(RDKVConfig(mode="snapkv", budget=4.0, decode_block=16))
    assert torch.equal(rdkv.block_weights(w, keys, real), out)
    assert snap.block_weights(w, keys, real) is w


# -- the cap --------------------------------------------------------------------------------------


def test_the_cap_weighs_a_token_against_its_own_segment():
    """RDKV keeps a segment's weights for the cap over their mean (per row and KV head): a block its
    queries barely looked back at ranks its tokens as one they looked at a lot; the order within a
    row stays, padding stays 0. The eviction peers keep their own scores."""
    from rdkv_hf.allocate import relative_weights, shared_across_heads
    from rdkv_hf.planners import planner_class
    from rdkv_hf.planners.rdkv import CAP_HEAD_SHARE

    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 3, 10, generator=g) * torch.tensor([1e-4, 1.0, 1e3])[None, :, None]
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, :3] = False
    w = w * real[:, None]
    rel = relative_weights(w, real)
    for b in range(2):
        torch.testing.assert_close(rel[b][:, real[b]].mean(-1), torch.ones(3))
        assert torch.equal(rel[b][:, real[b]].argsort(-1), w[b][:, real[b]].argsort(-1))
    assert (rel[1][:, ~real[1]] == 0).all() and (~real[1]).any()  # padding stays 0
    assert (relative_weights(torch.zeros(1, 1, 4), torch.ones(1, 4, dtype=torch.bool)) == 0).all()
    positions = torch.arange(10)
    rdkv = planner_class("rdkv")(RDKVConfig(decode_block=16))
    assert torch.equal(rdkv.cap_weights(w, real, positions), shared_across_heads(rel, CAP_HEAD_SHARE))
    assert planner_class("rdkv+profile").cap_weights is planner_class("rdkv").cap_weights
    snap = planner_class("snapkv")(RDKVConfig(mode="snapkv", budget=4.0, decode_block=16))
    assert snap.cap_weights(w, real, positions) is w


def test_a_token_one_kv_head_keeps_is_kept_by_the_others():
    """RDKV's cap weights follow the most any KV head of the layer gives a token (by
    CAP_HEAD_SHARE): a token only head 0 weighs high outranks, in heads 1 and 2, tokens they weigh
    somewhat higher than it; padding stays 0 in every head."""
    from rdkv_hf.allocate import shared_across_heads
    from rdkv_hf.planners import planner_class
    from rdkv_hf.planners.rdkv import CAP_HEAD_SHARE

    assert 0 < CAP_HEAD_SHARE <= 1
    w = torch.ones(1, 3, 8)
    w[0, 0, 2] = 20.0  # only head 0 reads token 2
    w[0, 1:, 5] = 1.5  # heads 1 and 2 read token 5 a little more than the rest
    real = torch.ones(1, 8, dtype=torch.bool)
    real[0, 0] = False  # padding
    w = w * real[:, None]
    out = planner_class("rdkv")(RDKVConfig(decode_block=16)).cap_weights(w, real, torch.arange(8))
    for h in (1, 2):
        assert out[0, h, 2] > out[0, h, 5] > out[0, h, 3]
    assert out[0, 0, 2] == out[0, :, 2].max()  # the head that read it most keeps it highest
    assert (out[0, :, 0] == 0).all()
    assert torch.equal(shared_across_heads(w, 0.0), w)
    torch.testing.assert_close(shared_across_heads(w, 1.0)[0, 1], w[0].amax(0))


def test_a_token_one_layer_keeps_is_kept_by_the_others():
    """share_across_layers mixes into each head's cap weights the mean over layers of the most any
    KV head of the layer gave the token; a layer that evicted a token in every head gives it 0. Each
    head's weights stay in its own token order, a head shared by two rows (beams) is mixed once, and
    the positions are dropped."""
    import types

    from rdkv_hf.cache_cap import WEIGHT_DTYPE, share_across_layers

    def head(pos, w):
        return types.SimpleNamespace(n=len(pos), w_pos=torch.tensor(pos, dtype=torch.int32),
                                     w_tok=torch.tensor(w, dtype=WEIGHT_DTYPE))

    # layer 0, two KV heads (tokens in pack order): token 12 read by head 0 only
    a0, a1 = head([12, 10, 11, 13], [8.0, 1.0, 1.0, 1.0]), head([10, 11, 12, 13], [1.0, 2.0, 1.0, 1.0])
    # layer 1 evicted token 12 in both heads; one head object serves two batch rows (beams)
    b0 = head([10, 11, 13], [1.0, 1.0, 2.0])
    layers = [types.SimpleNamespace(segments=[types.SimpleNamespace(heads=[a0, a1], kv_heads=2, batch=1)]),
              types.SimpleNamespace(segments=[types.SimpleNamespace(heads=[b0, b0], kv_heads=1, batch=2)])]
    share = 0.5
    share_across_layers(layers, share)
    # the mean over the two layers of each layer's most: token 10 (1+1)/2, 11 (2+1)/2, 12 (8+0)/2, 13 (1+2)/2
    vote = {10: 1.0, 11: 1.5, 12: 4.0, 13: 1.5}
    for h, own, pos in ((a0, [8.0, 1.0, 1.0, 1.0], [12, 10, 11, 13]), (a1, [1.0, 2.0, 1.0, 1.0], [10, 11, 12, 13]),
                        (b0, [1.0, 1.0, 2.0], [10, 11, 13])):
        expected = torch.tensor([(1 - share) * w + share * vote[p] for w, p in zip(own, pos)]).to(WEIGHT_DTYPE)
        assert torch.equal(h.w_tok, expected), (pos, h.w_tok, expected)
        assert h.w_pos is None
    assert a1.w_tok[2] > a1.w_tok[0]  # head 1 of layer 0 now ranks token 12 above token 10
    share_across_layers(layers, share)  # nothing pending: nothing changes
    assert torch.equal(b0.w_tok, torch.tensor([1.0, 1.25, 1.75]).to(WEIGHT_DTYPE))


def test_the_layers_share_the_caps_weights_once_every_layer_has_packed(one_thread, monkeypatch):
    """With RDKVPlanner.cap_layer_share set, a packed block's heads keep their positions only until
    the next forward (every layer has packed it by then); the positions are counted in nbytes and
    the cap holds. With the share at 0, no head keeps positions."""
    from rdkv_hf.planners.rdkv import RDKVPlanner

    model = _model("llama", num_hidden_layers=3)
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    cfg = dict(budget=3.0, decode_block=8)
    cap = int(_minimum(model, ids, **cfg) * 1.3)
    for share in (0.5, 0.0):
        monkeypatch.setattr(RDKVPlanner, "cap_layer_share", share)
        rdkv_hf.patch(model, **cfg, max_cache_bytes=cap)
        cache = RDKVCache(model)
        out = model(ids, **cache_kwargs(cache))
        pending_seen = 0
        for _ in range(120):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
            assert cache.nbytes <= cap
            for i in cache.rdkv_layers:
                segments = cache.layers[i].segments
                pending = [s for s in segments if any(h.w_pos is not None for h in s.heads)]
                assert len(pending) <= 1 and (not pending or pending[0] is segments[-1])
                pending_seen += len(pending)
        assert (pending_seen > 0) == bool(share)


def _minimum(model, ids, **cfg):
    """The smallest cap for `cfg` at the batch of `ids`."""
    rdkv_hf.patch(model, **cfg, max_cache_bytes=10**9)
    cache = RDKVCache(model)
    model(ids, **cache_kwargs(cache))
    return cache_cap.minimum_bytes(_layer(cache))


def _run_capped(model, ids, steps, cap, **cfg):
    """Decode `steps` greedy tokens under `cap`; the largest nbytes seen after any forward."""
    rdkv_hf.patch(model, **cfg, max_cache_bytes=cap)
    cache = RDKVCache(model)
    out = model(ids, **cache_kwargs(cache))
    most = cache.nbytes
    for _ in range(steps):
        tok = out.logits[:, -1:].argmax(-1)
        out = model(tok, **cache_kwargs(cache))
        most = max(most, cache.nbytes)
    return most, cache


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["rdkv", "snapkv", "streamingllm", "random"]), prompt=st.integers(1, 70),
       steps=st.integers(1, 90), block=st.integers(2, 12), budget=st.floats(0.5, 16), slack=st.floats(0, 2),
       residual=st.integers(0, 6), batch=st.integers(1, 2))
def test_cache_bytes_never_exceed_the_cap(one_thread, mode, prompt, steps, block, budget, slack, residual, batch):
    model = _model("llama", num_hidden_layers=1)
    ids = torch.randint(1, 128, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    cfg = dict(budget=budget, mode=mode, decode_block=block, residual=residual)
    cap = int(_minimum(model, ids, **cfg) * (1 + slack))
    most, cache = _run_capped(model, ids, steps, cap, **cfg)
    assert most <= cap
    assert cache.get_seq_length() == prompt + steps


def test_a_segment_that_kept_nothing_is_dropped_by_the_cap(one_thread):
    """Found by the property test above: SnapKV at budget 8 evicts a one-token prompt whole, and at a
    cap of exactly the minimum the empty segment's tables alone passed the share."""
    model = _model("llama", num_hidden_layers=1)
    ids = torch.randint(1, 128, (1, 2), generator=torch.Generator().manual_seed(2))
    cfg = dict(budget=8.0, mode="snapkv", decode_block=2, residual=1)
    cap = int(_minimum(model, ids, **cfg))
    most, cache = _run_capped(model, ids, 3, cap, **cfg)
    assert most <= cap and all(any(h.n for h in s.heads) for s in _layer(cache).segments)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_cap_holds_over_thousands_of_steps(one_thread, arch):
    model = _model(arch, num_hidden_layers=1) if arch == "llama" else _model(arch)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    cfg = dict(budget=3.0, decode_block=16)
    cap = int(_minimum(model, ids, **cfg) * 1.5)
    steps = 2000 if arch == "llama" else 300
    most, cache = _run_capped(model, ids, steps, cap, **cfg)
    assert most <= cap and cache.get_seq_length() == 40 + steps
    if arch == "llama":  # bound by the cap long ago: the prompt, the merged history, the blocks since (not 125)
        assert len(_layer(cache).segments) <= 8


@pytest.mark.parametrize("prompt,slack,gives_way", [(60, 0.5, False), (300, 0.2, True)])
def test_the_decoded_blocks_give_way_before_the_prompt(one_thread, prompt, slack, gives_way):
    """Under the cap the older decoded blocks are re-allocated first: the prompt's segment stays as it
    was packed while they can make room, and is re-allocated too when they cannot."""
    model = _model("llama", num_hidden_layers=1)
    ids = torch.randint(1, 128, (1, prompt), generator=torch.Generator().manual_seed(0))
    cfg = dict(budget=4.0, decode_block=16, min_tokens=0)
    cap = int(_minimum(model, ids, **cfg) * (1 + slack))
    rdkv_hf.patch(model, **cfg, max_cache_bytes=cap)
    cache = RDKVCache(model)
    out = model(ids, **cache_kwargs(cache))
    packed_prompt = _layer(cache).segments[0]
    for _ in range(300):
        out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
        assert cache.nbytes <= cap
    segments = _layer(cache).segments
    assert len(_decoded(cache)) < 300 // 16  # the cap merged older blocks
    assert any(s is packed_prompt for s in segments) != gives_way


def test_a_cap_below_the_protected_part_names_the_minimum(one_thread):
    model = _model("llama")
    ids = torch.randint(1, 128, (1, 30))
    cfg = dict(budget=2.5, decode_block=8)
    minimum = _minimum(model, ids, **cfg)
    rdkv_hf.patch(model, **cfg, max_cache_bytes=minimum - 1)
    with pytest.raises(ValueError, match=f"raise `max_cache_bytes` to at least {minimum}"):
        model(ids, **cache_kwargs(RDKVCache(model)))
    most, _ = _run_capped(model, ids, 40, minimum, **cfg)  # the minimum itself serves
    assert most <= minimum


@torch.no_grad()
def test_repacking_at_unchanged_widths_gives_back_the_same_values(one_thread):
    """Re-packing reads packed data back: a unit that keeps its width and its tokens comes back bit
    for bit (its values lie on the grid its minimum and scale span)."""
    model = _model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(1, 128, (2, 50), generator=torch.Generator().manual_seed(3))
    rdkv_hf.patch(model, budget=3.0, decode_block=16, max_cache_bytes=10**9)
    cache = RDKVCache(model)
    out = model(ids, **cache_kwargs(cache))
    for _ in range(40):
        out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
    layer = _layer(cache)
    rows = list(range(4))
    for seg in layer.segments:  # the prompt and each block
        part = cache_cap._Part([seg], rows)
        again = cache_cap._repack(part, part.vw, part.kw, rows, 2, 2, torch.float16, "cpu")
        for old, new in zip(seg.heads, again.heads):
            assert old.v_widths() == new.v_widths() and old.k_widths() == new.k_widths()
            for a, b in zip(old.dequantize(), new.dequantize()):
                assert torch.equal(a, b)
            assert torch.equal(old.w_tok, new.w_tok)


def test_decode_paths_agree_on_many_decoded_segments(one_thread):
    model = _model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(1, 128, (2, 33), generator=torch.Generator().manual_seed(5))
    rdkv_hf.patch(model, budget=2.5, decode_block=4, backend="torch")
    out = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    layer = _layer(output_cache(out))
    segments = attended(layer)
    assert sum(1 for s in layer.segments if s.decoded) >= 12 and len(segments) == 2  # prompt + one stack
    q = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(6))
    ref, ref_lse = attend(q, layer.segments, layer.keys, layer.values, None, 0.125, backend="torch")  # one by one
    for backend in ("torch", "cpu"):
        got, lse = attend(q, segments, layer.keys, layer.values, None, 0.125, backend=backend)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


# Triton runs in a child pytest under TRITON_INTERPRET=1 without CUDA (see tests/test_kernels.py).
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the Triton tests run in this process")
def test_interpreter_child_runs_the_triton_tests():
    run_triton_tests_in_interpreter(__file__)


@pytest.mark.skipif(not HAS_TRITON or not (INTERPRETED or torch.cuda.is_available()),
                    reason="triton is not installed" if not HAS_TRITON else "runs in the TRITON_INTERPRET=1 child process")
def test_triton_decode_agrees_on_many_decoded_segments():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to(device)
    ids = torch.randint(1, 128, (2, 33), generator=torch.Generator().manual_seed(5)).to(device)
    rdkv_hf.patch(model, budget=2.5, decode_block=4, backend="torch")
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    layer = _layer(output_cache(out))
    q = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(6)).to(device)
    ref, ref_lse = attend(q, layer.segments, layer.keys, layer.values, None, 0.125, backend="torch")
    got, lse = attend(q, attended(layer), layer.keys, layer.values, None, 0.125, backend="triton")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss"])
def test_decode_blocks_on_soft_capped_and_sink_models_are_token_for_token(one_thread, model_type):
    """Gemma 2 caps its logits and GPT-OSS adds sink logits: a block's weights see both."""
    import warnings

    from tiny_models import tiny_arch

    from rdkv_hf import compat

    if not compat.has_model_type(model_type):
        pytest.skip(f"no {model_type}")
    model = tiny_arch(model_type)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 100, (1, 29), generator=torch.Generator().manual_seed(1))
    ref = _gen(model, ids, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sliding-window layers left to Transformers
        rdkv_hf.patch(model, **EXACT, decode_block=8)
    out = _gen(model, ids, 40, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert len(_decoded(output_cache(out))) >= 3
    rdkv_hf.unpatch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdkv_hf.patch(model, budget=2.5, decode_block=8)
    out = _gen(model, ids, 40, return_dict_in_generate=True)
    assert len(_decoded(output_cache(out))) >= 3 and out.sequences.shape == (1, 69)


def test_decode_blocks_on_a_latent_cache_are_refused_with_the_reason():
    from tiny_models import tiny_arch

    from rdkv_hf.model_patches import latent_attention

    model = tiny_arch("deepseek_v3")
    if latent_attention(model.config) is None:
        pytest.skip("this Transformers caches DeepSeek-V3's keys per head (the generic path)")
    with pytest.raises(ValueError, match=r"`decode_block` \(8\) is not supported on deepseek_v3's latent"):
        rdkv_hf.patch(model, budget=2.5, decode_block=8)
    assert not rdkv_hf.is_patched(model)


def test_a_prompt_left_whole_by_min_tokens_is_packed_in_decode_blocks(one_thread):
    """A prompt under `min_tokens` stays in the tail; with `decode_block` its tokens are packed as
    decoded blocks, weighed by the queries after them (the prompt's own included)."""
    model = _model("llama")
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    ref = _gen(model, ids, 30)
    rdkv_hf.patch(model, **EXACT, decode_block=8, min_tokens=100)
    out = _gen(model, ids, 30, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = output_cache(out)
    assert _layer(cache).segments and all(s.decoded for s in _layer(cache).segments)
    assert keep_tokens(cache.rdkv_config) <= _layer(cache).keys.shape[-2] < keep_tokens(cache.rdkv_config) + 8


def test_decode_blocks_go_on_outside_the_inference_mode_they_began_in(one_thread):
    """A prompt and some steps under ``torch.inference_mode``, then steps under ``no_grad`` (as
    ``generate()`` runs): the window sums made in inference mode still grow, and the tokens are
    those of a run under ``no_grad`` alone."""
    model = _model("llama")
    rdkv_hf.patch(model, budget=2.5, min_tokens=16, decode_block=16)
    ids = torch.randint(3, 99, (1, 40), generator=torch.Generator().manual_seed(3))

    def run(first_steps_in_inference_mode: bool) -> list[int]:
        cache, tok, out = RDKVCache(model), ids, []
        for step in range(60):
            mode = torch.inference_mode() if first_steps_in_inference_mode and step <= 20 else torch.no_grad()
            with mode:
                tok = model(tok, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            out.append(int(tok))
        assert _decoded(cache), "no decode block was packed"
        return out

    assert run(True) == run(False)
