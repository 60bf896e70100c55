"""The Triton decode kernel against the torch reference, on packed segments built on the device.

Segments come from ``storage.pack_segment`` on the device: random K (per-channel spreads) and V,
random per-token V widths and per-channel K widths from RDKV's {0, 2, 4, 8, 16}, one head ragged
(half its tokens evicted), one with a single K width (no channel order stored) and one that kept
nothing. ``attention.segment_partials(seg, q, "triton")`` must match ``"torch"`` for odd token
counts, GQA ratios 1-8, head dims 64-256 and bf16 / fp16 16-bit zones; ``attention.attend`` over
several segments and a tail must match both its torch backend and a dense softmax over the
dequantized K/V; soft-capped logits, attention sinks and V narrower or wider than K (DeepSeek's
MLA: 192/128 per head, 576/512 absorbed) must match the torch backend too. Partials are compared as
the normalized output and the log-sum-exp (``_assert_partials_close`` of tests/test_kernels.py), in
float32 with the suite's tolerance table.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from test_kernels import _assert_partials_close, _poisoned

from rdkv_hf.attention import attend, head_partials_reference, resolve_backend, segment_partials
from rdkv_hf.cache import Segment
from rdkv_hf.storage import H_PERM, pack_segment

from .conftest import DRY_RUN, TOL, needs_triton

pytestmark = needs_triton

WIDTHS = torch.tensor([0, 2, 4, 8, 16])  # RDKV's widths
B, HKV = 2, 2  # four heads per segment: row 1 ragged, row 2 one K width, row 3 empty


def make_segment(T, D, keep, device, seed, batch=B, kv_heads=HKV, Dv=None):
    """A segment of ``batch * kv_heads`` heads over `T` tokens of dim `D` (V: `Dv`), packed on `device`."""
    g = torch.Generator().manual_seed(seed)
    R = batch * kv_heads
    k = torch.randn(R, T, D, generator=g) * (torch.rand(D, generator=g) * 3 + 0.1)  # outlier channels
    v = torch.randn(R, T, Dv or D, generator=g)
    v_bits = WIDTHS[torch.randint(0, len(WIDTHS), (R, T), generator=g)]
    k_bits = WIDTHS[torch.randint(0, len(WIDTHS), (R, D), generator=g)]
    if T > 1:
        v_bits[1, T // 2 :] = 0  # ragged: this head keeps fewer tokens
    v_bits[2, 0], k_bits[2] = 16, 4  # keeps a token; one width for all channels: identity order
    v_bits[3] = 0  # kept nothing
    to = lambda t: t.to(device)  # noqa: E731
    heads, buffers = pack_segment(to(k.to(keep)), to(v.to(keep)), to(v_bits), to(k_bits), keep)
    assert buffers.raw.dtype == keep and buffers.words.device == torch.empty(0, device=device).device
    assert heads[3].n == 0 and heads[2].n > 0 and int(buffers.heads[2, H_PERM]) == -1
    return Segment(heads, batch, kv_heads, torch.full((batch,), T), buffers)


def _rows(parts, R, G, D):
    """``(m, l, acc)`` of shape ``[B, H, G(, D)]`` as ``[R, G(, D)]`` tensors."""
    m, l, acc = parts
    return m.reshape(R, G), l.reshape(R, G), acc.reshape(R, G, D)


def _query(shape, seed, device, dtype=torch.float32):
    """Queries already scaled by ``D**-0.5``, rows from flat to peaked (temperatures 0.5 to 2: the
    logits stay within about +-15, where two float32 summation orders agree to the table's 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    temp = torch.linspace(0.5, 2.0, shape[-2])[:, None]
    return (torch.randn(shape, generator=g) * temp * D**-0.5).to(device, dtype).contiguous()


def _check_partials(seg, qf):
    """Triton against torch partials of ``qf [B, H, G, D]`` over `seg` (a stack: its members merged
    per row), both through attention."""
    Bq, H, G, D = qf.shape
    R = Bq * H
    ref = _rows(segment_partials(seg, qf, "torch"), R, G, D)
    got = _rows(segment_partials(seg, qf, "triton"), R, G, D)
    assert all(t.device == qf.device for t in got)
    kept = [SimpleNamespace(n=sum(seg.heads[j * R + r].n for j in range(len(seg.heads) // R))) for r in range(R)]
    _assert_partials_close(got, list(zip(*ref)), kept)


def _interpreter_size(T, D):
    return pytest.mark.skipif(DRY_RUN and (T > 127 or D > 128), reason="too big for the CPU dry run (Triton interpreter); runs on CUDA")


SHAPES = [pytest.param(T, D, marks=_interpreter_size(T, D)) for T in (1, 63, 127, 1000) for D in (64, 128, 256)]


@pytest.mark.parametrize("keep", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("T,D", SHAPES)
def test_triton_segment_partials_match_torch(device, T, D, group, keep):
    seg = make_segment(T, D, keep, device, seed=T * 31 + D + group)
    _check_partials(seg, _query((B, HKV, group, D), T + group, device))


@pytest.mark.parametrize("group,q_len", [(2, 3), (8, 3), (4, 5)])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_partials_of_several_queries_per_head(device, group, q_len, D):
    """A multi-token forward after compression: ``group * q_len`` query rows per KV head."""
    T = 127 if DRY_RUN else 1000
    seg = make_segment(T, D, torch.bfloat16, device, seed=group * q_len + D)
    _check_partials(seg, _query((B, HKV, group * q_len, D), q_len, device))


@pytest.mark.parametrize("block_t", [16, 64, 128])
def test_triton_launcher_writes_out_at_every_block_size(device, block_t):
    from rdkv_hf.kernels.decode_partials import segment_partials as triton_partials

    T, D, G = (127, 64, 4) if DRY_RUN else (1000, 128, 4)
    seg = make_segment(T, D, torch.float16, device, seed=block_t)
    q = _query((B * HKV, G, D), block_t, device)
    out = tuple(t.to(device) for t in _poisoned(B * HKV, G, D))
    got = triton_partials(seg.buffers, q, block_t=block_t, out=out)
    assert all(a is b for a, b in zip(got, out))
    _assert_partials_close(got, [head_partials_reference(h, q[r]) for r, h in enumerate(seg.heads)], seg.heads)


@pytest.mark.parametrize("G", [4, 16])  # 16: rows where Triton <= 3.6 would make the sums a TF32 dot
@pytest.mark.parametrize("keep", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page_words", [256, 2048])
def test_triton_paged_partials_match_the_flat_segment(device, keep, page_words, G):
    """The serving-engine prototype: the segment laid out in pages (on the device) decodes by the
    paged Triton op to the flat segment's torch partials."""
    from rdkv_hf.kernels.paged_decode import paged_partials
    from rdkv_hf.paged import page_segment

    T, D = (63, 64) if DRY_RUN else (1000, 128)
    seg = make_segment(T, D, keep, device, seed=page_words + D)
    paged = page_segment(seg.buffers, page_words=page_words)
    assert paged.pages.device == seg.buffers.words.device
    q = _query((B * HKV, G, D), page_words, device)
    out = tuple(t.to(device) for t in _poisoned(B * HKV, G, D))
    got = paged_partials(paged, q, out=out)
    assert all(a is b for a, b in zip(got, out))
    _assert_partials_close(got, [head_partials_reference(h, q[r]) for r, h in enumerate(seg.heads)], seg.heads)


def test_triton_partials_after_beam_select(device):
    """Beams share heads: the selected segment's head table repeats rows of the same buffers."""
    seg = make_segment(63, 64, torch.bfloat16, device, seed=7)
    sel = seg.select(torch.tensor([1, 1, 0]))
    assert sel.buffers.words is seg.buffers.words and sel.buffers.heads.device == seg.buffers.words.device
    _check_partials(sel, _query((3, HKV, 2, 64), 8, device))


@pytest.mark.parametrize("group", [4, 16])  # 16 query rows per KV head: the explicit IEEE dot
def test_triton_partials_of_a_stack_of_segments(device, group):
    """Decoded segments stacked and decoded in one launch (head rows ``r, r + R, ...`` share query
    row ``r``), also after a beam select, against the torch reference (queries repeated, merged)."""
    from rdkv_hf.stacked import stack_segments

    segs = [make_segment(T, 64, torch.bfloat16, device, seed=T + group) for T in ((1, 63, 127) if DRY_RUN else (1, 300, 1000))]
    stack = stack_segments(segs)
    assert stack.stacked == 3
    _check_partials(stack, _query((B, HKV, group, 64), group, device))
    _check_partials(stack.select(torch.tensor([1, 1, 0])), _query((3, HKV, group, 64), group + 1, device))


# -- attend: several segments and a tail ----------------------------------------------------------


def _visibility(q_len, n_tail, padded, device):
    """``[B, q, n_tail]`` bool: causal over the tail aligned to its end; row 1 left-padded by 2."""
    qi = torch.arange(q_len, device=device)[:, None] + (n_tail - q_len)
    vis = (torch.arange(n_tail, device=device)[None, :] <= qi).expand(B, q_len, n_tail).clone()
    if padded:
        vis[1, :, :2] = False
    return vis


def _dense_attention(query, segments, tail_k, tail_v, vis, scaling):
    """Plain softmax attention over every segment's dequantized K/V (visible to all queries) and
    the tail (visible per `vis`): ``[B, Hq, q, D]`` float32."""
    Bq, Hq, q, D = query.shape
    H = tail_k.shape[1]
    g = Hq // H
    out = torch.empty(Bq, Hq, q, D, device=query.device)
    for b in range(Bq):
        for h in range(H):
            kv = [s.heads[b * H + h].dequantize() for s in segments]
            k = torch.cat([x[0] for x in kv] + [tail_k[b, h].float()])
            v = torch.cat([x[1] for x in kv] + [tail_v[b, h].float()])
            n_seg = k.shape[0] - tail_k.shape[2]
            mask = torch.cat([vis.new_ones(q, n_seg), vis[b]], 1)  # [q, N]
            logits = (query[b, h * g : (h + 1) * g].float() * scaling) @ k.T  # [g, q, N]
            p = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
            out[b, h * g : (h + 1) * g] = p @ v
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attend_triton_matches_torch_and_dense(device, dtype, q_len, padded):
    D, g, lengths = (64, 2, (127, 63, 1)) if DRY_RUN else (128, 4, (1000, 127, 63, 1))
    segments = [make_segment(T, D, torch.bfloat16, device, seed=T + q_len) for T in lengths]
    n_tail = 5 + q_len  # decoded tokens, then the new ones
    gen = torch.Generator().manual_seed(q_len)
    tail_k, tail_v = (torch.randn(B, HKV, n_tail, D, generator=gen).to(device, dtype) for _ in range(2))
    query = torch.randn(B, HKV * g, q_len, D, generator=gen).to(device, dtype)
    vis = _visibility(q_len, n_tail, padded, device)
    mask = vis[:, None] if padded else None  # None: causal within the new tokens
    ref = attend(query, segments, tail_k, tail_v, mask, D**-0.5, backend="torch")
    got = attend(query, segments, tail_k, tail_v, mask, D**-0.5, backend="triton")
    assert got[0].dtype == dtype and got[0].device == query.device
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
    torch.testing.assert_close(got[1], ref[1], **TOL[torch.float32])
    dense = _dense_attention(query, segments, tail_k, tail_v, vis, D**-0.5)
    torch.testing.assert_close(got[0], dense.to(dtype), **TOL[dtype])


@pytest.mark.skipif(DRY_RUN, reason="'auto' picks the C++ kernel on the CPU")
def test_auto_backend_is_triton_on_cuda(device):
    assert resolve_backend("auto", device) == "triton"


@pytest.mark.parametrize("softcap,D,Dv,group", [(None, 192, 128, 4), (1.5, 64, 96, 3), (30.0, 576, 512, 2)])
def test_attend_triton_with_softcap_sinks_and_other_v_width_matches_torch(device, softcap, D, Dv, group):
    if DRY_RUN and D > 128:
        pytest.skip("too big for the CPU dry run (Triton interpreter); runs on CUDA")
    T = 127 if DRY_RUN else 1000
    seg = make_segment(T, D, torch.bfloat16, device, seed=D + Dv, Dv=Dv)
    gen = torch.Generator().manual_seed(D)
    tail_k, tail_v = torch.randn(B, HKV, 6, D, generator=gen).to(device), torch.randn(B, HKV, 6, Dv, generator=gen).to(device)
    query = (torch.randn(B, HKV * group, 2, D, generator=gen) * 2).to(device)
    sinks = (torch.randn(HKV * group, generator=gen) + 2).to(device)
    ref = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend="torch", softcap=softcap, sinks=sinks)
    got = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend="triton", softcap=softcap, sinks=sinks)
    assert got[0].shape == (B, HKV * group, 2, Dv)
    torch.testing.assert_close(got[0], ref[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], ref[1], **TOL[torch.float32])
