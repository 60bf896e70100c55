import pytest
import torch
from conftest import TOL, tiny_model

import rdkv_hf
from rdkv_hf.attention import attend, head_partials_reference
from rdkv_hf.cache import RDKVCache, RDKVLayer, Segment, pack_head
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.config import RDKVConfig


def _rand_head(T=50, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    v_bits = torch.tensor([0, 2, 4, 8, 16])[torch.randint(0, 5, (T,), generator=g)]
    k_bits = torch.tensor([0, 2, 4, 8, 16])[torch.randint(0, 5, (D,), generator=g)]
    return k, v, v_bits, k_bits


def test_evicted_token_is_gone_from_k_and_v():
    k, v, v_bits, k_bits = _rand_head()
    k[7], v[7], v_bits[7] = 1e3, -1e3, 0  # a marked token, evicted
    head = pack_head(k, v, v_bits, k_bits, torch.float32)
    kd, vd = head.dequantize()
    assert head.n == int((v_bits > 0).sum())
    assert kd.abs().max() < 100 and vd.abs().max() < 100


def test_packed_head_dequantizes_within_bounds():
    k, v, v_bits, k_bits = _rand_head(T=127, D=64, seed=3)
    head = pack_head(k, v, v_bits, k_bits, torch.float32)
    kept = (v_bits > 0).nonzero().squeeze(1)
    order = torch.cat([kept[v_bits[kept] == b] for b in (16, 8, 4, 2)])
    kd, vd = head.dequantize()
    assert torch.allclose(vd[v_bits[order] == 16], v[order][v_bits[order] == 16])
    for b in (2, 4, 8):
        rows = v_bits[order] == b
        rng = v[order][rows].amax(1) - v[order][rows].amin(1)
        assert ((vd[rows] - v[order][rows]).abs().amax(1) <= rng / ((1 << b) - 1) / 2 * 1.01 + 1e-3).all()
    assert (kd[:, k_bits == 0] == 0).all()
    assert torch.allclose(kd[:, k_bits == 16], k[order][:, k_bits == 16])


@pytest.mark.parametrize("G,D,T", [(1, 16, 1), (3, 64, 63), (6, 32, 1000)])
def test_packed_partials_match_dense_attention_over_dequantized(G, D, T):
    k, v, v_bits, k_bits = _rand_head(T, D, seed=G + T)
    head = pack_head(k, v, v_bits, k_bits, torch.float32)
    q = torch.randn(G, D)
    m, l, acc = head_partials_reference(head, q)
    kd, vd = head.dequantize()
    if head.n == 0:
        assert torch.isinf(m).all() and (l == 0).all()
        return
    ref = torch.softmax(q @ kd.T, -1) @ vd
    torch.testing.assert_close(acc / l[:, None], ref, **TOL[torch.float32])


@pytest.mark.parametrize("q_len", [1, 5])
def test_attend_over_segment_and_tail_is_one_softmax(q_len):
    B, Hkv, g, D = 2, 2, 3, 16
    heads, dense = [], []
    for r in range(B * Hkv):
        k, v, vb, kb = _rand_head(40, D, seed=r)
        h = pack_head(k, v, vb, kb, torch.float32)
        heads.append(h)
        dense.append(h.dequantize())
    seg = Segment(heads, B, Hkv, torch.tensor([40, 40]))
    tail_k, tail_v = torch.randn(B, Hkv, 9, D), torch.randn(B, Hkv, 9, D)
    query = torch.randn(B, Hkv * g, q_len, D)
    out, lse = attend(query, [seg], tail_k, tail_v, None, 0.25)
    alone, none = attend(query, [seg], tail_k, tail_v, None, 0.25, with_lse=False)  # a plain decode step's call
    assert none is None and torch.equal(alone, out)
    for b in range(B):
        for h in range(Hkv):
            kd, vd = dense[b * Hkv + h]
            K = torch.cat([kd, tail_k[b, h]])
            V = torch.cat([vd, tail_v[b, h]])
            q = query[b, h * g : (h + 1) * g]  # [g, q, D]
            logits = 0.25 * q @ K.T
            causal = torch.arange(K.shape[0])[None, :] <= (kd.shape[0] + 9 - q_len + torch.arange(q_len))[:, None]
            logits = logits.masked_fill(~causal, -torch.inf)
            torch.testing.assert_close(out[b, h * g : (h + 1) * g], torch.softmax(logits, -1) @ V, **TOL[torch.float32])
            torch.testing.assert_close(lse[b, h * g : (h + 1) * g], torch.logsumexp(logits, -1), **TOL[torch.float32])


def test_a_query_that_sees_nothing_attends_to_nothing():
    """A batch row whose queries see no token (every tail token masked, no segment): output 0 and a
    finite log-sum-exp, not NaN (the merge must never take -inf - -inf); the other row as sdpa."""
    B, H, q, n, D = 2, 2, 3, 5, 8
    g = torch.Generator().manual_seed(0)
    query, tail_k, tail_v = (torch.randn(B, H, x, D, generator=g) for x in (q, n, n))
    mask = torch.ones(B, 1, q, n, dtype=torch.bool)
    mask[0] = False
    out, lse = attend(query, [], tail_k, tail_v, mask, 0.3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(lse).all()
    ref = torch.nn.functional.scaled_dot_product_attention(query[1:], tail_k[1:], tail_v[1:], scale=0.3)
    torch.testing.assert_close(out[1:], ref, **TOL[torch.float32])  # attend lays out [B, Hq, q, Dv] as sdpa


def test_layer_contract_and_nbytes():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=3.0)
    cache = RDKVCache(model)
    assert isinstance(cache.layers[0], RDKVLayer) and cache.get_seq_length() == 0
    ids = torch.randint(0, 128, (1, 60))
    model(ids, **cache_kwargs(cache))
    layer = cache.layers[0]
    assert cache.get_seq_length() == 60 and layer.keys.shape[-2] == 0  # all 60 prompt tokens packed
    assert layer.get_mask_sizes(1) == (1, 60)
    model(torch.randint(0, 128, (1, 1)), **cache_kwargs(cache))
    assert cache.get_seq_length() == 61 and layer.keys.shape[-2] == 1
    assert layer.get_mask_sizes(1) == (2, 60)
    held = sum(h.nbytes for l in cache.layers for s in l.segments for h in s.heads)
    tables = sum(s.buffers.heads.numel() * 8 + s.buffers.groups.numel() * 8 for l in cache.layers for s in l.segments)
    tail = sum(l.keys.numel() * 4 * 2 for l in cache.layers)
    assert cache.nbytes == held + tables + tail  # codes, scales, orders; the head and group tables; the tail
    assert 0 < cache.summary().prompt_bits_per_element <= 3.0
    with pytest.raises(NotImplementedError, match="unpatch"):
        cache.crop(-1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


def test_reorder_shares_packed_heads():
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.0)
    cache = RDKVCache(model)
    model(torch.randint(0, 128, (2, 30)), **cache_kwargs(cache))
    before = cache.nbytes
    cache.reorder_cache(torch.tensor([1, 1]))
    seg = cache.layers[0].segments[0]
    assert seg.heads[0] is seg.heads[2] and cache.nbytes < before


def test_rdkv_cache_on_an_unpatched_model_is_an_error():
    model = tiny_model("llama")
    cache = RDKVCache(model.config, RDKVConfig(budget=2.5))
    model(torch.randint(0, 128, (1, 10)), **cache_kwargs(cache))
    with pytest.raises(RuntimeError, match="rdkv_hf.patch"):
        model(torch.randint(0, 128, (1, 1)), **cache_kwargs(cache))


def test_compressed_cache_read_by_an_unpatched_attention_is_an_error():
    """A cache filled while patched, then decoded by plain sdpa, would see only its tail: refused."""
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    cache = RDKVCache(model)
    model(torch.randint(0, 128, (1, 10)), **cache_kwargs(cache))
    assert cache.layers[0].segments
    rdkv_hf.unpatch(model)
    with pytest.raises(RuntimeError, match="only RDKV attention reads.*'sdpa'"):
        model(torch.randint(0, 128, (1, 1)), **cache_kwargs(cache))


def test_token_budget_matches_bits():
    cfg = RDKVConfig(tokens=64)
    assert cfg.budget is None and cfg.budget_bits(1024) == 1.0 and cfg.budget_bits(32) == 16.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_additive_float_masks_of_any_dtype_hide_their_masked_tokens(dtype):
    from rdkv_hf.attention import _tail_visibility

    allowed = torch.tensor([[True, False, True], [True, True, False]])[None, None]  # [1, 1, q=2, kv=3]
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    assert torch.equal(_tail_visibility(additive, 1, 2, 3, "cpu"), allowed[:, 0])
