"""The paged layout (rdkv_hf/paged.py): packed tokens of mixed widths in fixed-size pages read back
exactly, its torch decode equal to the flat segment's, and the Triton op over the pages against that
reference (under Triton's CPU interpreter in a child process, as in tests/test_kernels.py)."""

import importlib.util
import os

import pytest
import torch
from conftest import TOL, run_triton_tests_in_interpreter, tiny_model
from test_kernels import WIDTH_MIXES, _assert_partials_close, _poisoned

import rdkv_hf
from rdkv_hf.attention import head_partials_reference, segment_partials
from rdkv_hf.paged import HEADER_WORDS, head_kv, page_segment, paged_partials_reference
from rdkv_hf.storage import pack_segment

KEEP = {"rdkv": torch.float16, "any": torch.bfloat16}


def _segment(R, T, D, mix, seed):
    """R heads of T tokens: random widths from `mix`; head 1 keeps half its tokens, the last none."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(R, T, D, generator=g) * (torch.rand(D, generator=g) * 3 + 0.1)
    v = torch.randn(R, T, D, generator=g)
    widths = torch.tensor(WIDTH_MIXES[mix])
    v_bits = widths[torch.randint(0, len(widths), (R, T), generator=g)]
    k_bits = widths[torch.randint(0, len(widths), (R, D), generator=g)]
    if T > 1:
        v_bits[1, T // 2 :] = 0
    v_bits[-1] = 0
    return pack_segment(k, v, v_bits, k_bits, KEEP[mix])


@pytest.mark.parametrize("T", [1, 63, 127])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("mix", ["rdkv", "any"])
@pytest.mark.parametrize("page_words", [96, 512])
def test_pages_hold_exactly_the_packed_tokens(T, D, mix, page_words):
    heads, buffers = _segment(4, T, D, mix, seed=T + D)
    paged = page_segment(buffers, page_words=page_words)
    for r, head in enumerate(heads):
        k, v = head_kv(paged, r)
        rk, rv = head.dequantize()
        assert torch.equal(k, rk) and torch.equal(v, rv), f"head {r}"
        n_pages = int(paged.rows[r, 0])
        assert (paged.block_table[r, n_pages:] == -1).all() and (paged.block_table[r, :n_pages] >= 0).all()
    assert paged.pages.shape[1] == page_words and int(paged.rows[-1, 0]) == 0
    used = paged.block_table[paged.block_table >= 0]
    assert sorted(used.tolist()) == list(range(paged.pages.shape[0]))  # every page belongs to one head row


def test_page_size_and_keep_dtype_are_checked():
    _, buffers = _segment(2, 9, 64, "rdkv", seed=1)
    with pytest.raises(ValueError, match="`page_words`=40 cannot hold one 16-bit token"):
        page_segment(buffers, page_words=40)
    _, f32 = pack_segment(torch.randn(1, 4, 16), torch.randn(1, 4, 16), torch.full((1, 4), 16), torch.full((1, 16), 16), torch.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16, got a segment kept in torch.float32"):
        page_segment(f32)
    assert HEADER_WORDS < 96


def test_paged_decode_reference_equals_the_flat_segment_of_a_real_cache(one_thread):
    """A tiny model's compressed prompt (RDKV at 2.5 bits): the pages of each layer's segment give
    the partials the flat segment gives."""
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    ids = torch.randint(1, 128, (2, 50), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = rdkv_hf.compat.output_cache(out)
    for i in cache.rdkv_layers:
        seg = cache.layers[i].segments[0]
        q = torch.randn(2, 2, 2, 16, generator=torch.Generator().manual_seed(i)) * 0.25  # [B, Hkv, G, D]
        m, l, acc = segment_partials(seg, q, "torch")
        pm, pl, pacc = paged_partials_reference(page_segment(seg.buffers, page_words=64), q.reshape(4, 2, 16))
        torch.testing.assert_close(pacc / pl[..., None], (acc / l[..., None]).reshape(4, 2, 16), **TOL[torch.float32])
        torch.testing.assert_close(pm + pl.log(), (m + l.log()).reshape(4, 2), **TOL[torch.float32])


# -- the Triton op ---------------------------------------------------------------------------------

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRETED or torch.cuda.is_available()),
    reason="triton is not installed" if not HAS_TRITON else "runs in the TRITON_INTERPRET=1 child process",
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the Triton tests run in this process")
def test_interpreter_child_runs_the_paged_triton_tests():
    run_triton_tests_in_interpreter(__file__)


@needs_triton
@pytest.mark.parametrize("T,D,G,mix,page_words", [(1, 16, 1, "rdkv", 96), (63, 16, 3, "any", 96), (40, 32, 2, "rdkv", 512)])
def test_triton_paged_partials_match_reference(T, D, G, mix, page_words):
    from rdkv_hf.kernels.paged_decode import paged_partials

    device = "cuda" if torch.cuda.is_available() else "cpu"
    heads, buffers = _segment(3, T, D, mix, seed=T * 3 + D)
    paged = page_segment(buffers, page_words=page_words)
    q = torch.randn(3, G, D, generator=torch.Generator().manual_seed(T)) * D**-0.5
    ref = paged_partials_reference(paged, q)
    out = tuple(t.to(device) for t in _poisoned(3, G, D))
    got = paged_partials(paged.to(device), q.to(device), out=out)
    assert all(a is b for a, b in zip(got, out))
    got = tuple(t.cpu() for t in got)
    _assert_partials_close(got, [(ref[0][r], ref[1][r], ref[2][r]) for r in range(3)], heads)
    flat = [head_partials_reference(h, q[r]) for r, h in enumerate(heads)]  # and the flat segment's
    _assert_partials_close(got, flat, heads)


@needs_triton
def test_triton_paged_partials_validate():
    from rdkv_hf.kernels.paged_decode import paged_partials

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, buffers = _segment(2, 8, 16, "rdkv", seed=0)
    paged = page_segment(buffers, page_words=96).to(device)
    with pytest.raises(ValueError, match="paged segment has 2 heads of dim 16"):
        paged_partials(paged, torch.zeros(3, 1, 16, device=device))
    with pytest.raises(ValueError, match="contiguous float32"):
        paged_partials(paged, torch.zeros(2, 1, 16, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="block_t"):
        paged_partials(paged, torch.zeros(2, 1, 16, device=device), block_t=24)
