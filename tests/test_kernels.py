"""Kernels against their torch references: the C++ CPU decode partials, and the Triton quantize+pack
and decode partials (run by Triton's CPU interpreter, so sizes stay tiny); soft-capped logits,
attention sinks and K/V of different widths in every decode path against plain eager attention."""

import importlib.util
import os

import pytest
import torch
from conftest import TOL, run_triton_tests_in_interpreter, tiny_model

import rdkv_hf
from rdkv_hf import quant
from rdkv_hf.attention import attend, head_partials_reference
from rdkv_hf.cache import Segment
from rdkv_hf.storage import G_BITS, pack_segment

WIDTH_MIXES = {
    "rdkv": [0, 2, 4, 8, 16],  # RDKV's default widths
    "any": [0, 1, 2, 3, 4, 5, 6, 7, 8, 16],  # RateQuant-style widths and raw tokens
    "uniform3": [3],  # one odd width everywhere, nothing evicted
}
KEEP = {"rdkv": torch.float16, "any": torch.bfloat16, "uniform3": torch.float32}


def _segment(R, T, D, mix, seed, Dv=None):
    """R ragged heads of up to T tokens (K of D channels, V of Dv): random widths from `mix`, head 1
    keeps fewer tokens."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(R, T, D, generator=g) * torch.rand(D, generator=g) * 3
    v = torch.randn(R, T, Dv or D, generator=g)
    widths = torch.tensor(WIDTH_MIXES[mix])
    v_bits = widths[torch.randint(0, len(widths), (R, T), generator=g)]
    k_bits = widths[torch.randint(0, len(widths), (R, D), generator=g)]
    if R > 1 and T > 1:
        v_bits[1, T // 2 :] = 0  # ragged: fewer kept tokens
    return pack_segment(k, v, v_bits, k_bits, KEEP[mix])


def _assert_partials_close(got, ref, heads):
    """Compare (max, sum, acc) as the normalized output and the log-sum-exp (partials are only
    defined up to a common rescale); empty heads must be exactly (-inf, 0, 0)."""
    m, l, acc = got
    for r, head in enumerate(heads):
        rm, rl, racc = ref[r]
        if head.n == 0:
            assert torch.isinf(m[r]).all() and (m[r] < 0).all() and (l[r] == 0).all() and (acc[r] == 0).all()
            continue
        assert torch.isfinite(acc[r]).all() and torch.isfinite(l[r]).all()
        torch.testing.assert_close(acc[r] / l[r][:, None], racc / rl[:, None], **TOL[torch.float32])
        torch.testing.assert_close(m[r] + l[r].log(), rm + rl.log(), **TOL[torch.float32])


def _poisoned(R, G, D):
    return torch.full((R, G), float("nan")), torch.full((R, G), float("nan")), torch.full((R, G, D), float("nan"))


# -- the C++ CPU kernel ---------------------------------------------------------------------------

cpu_decode = pytest.importorskip("rdkv_hf.kernels.cpu_decode")
needs_cpu_kernel = pytest.mark.skipif(not cpu_decode.available(), reason=f"C++ kernel unavailable: {cpu_decode.unavailable_reason()}")


@needs_cpu_kernel
@pytest.mark.parametrize("T", [1, 63, 127, 1000])
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("group,q_len", [(1, 1), (3, 3)])
@pytest.mark.parametrize("mix", list(WIDTH_MIXES))
def test_cpu_partials_match_reference(T, D, group, q_len, mix):
    R, G = 3, group * q_len
    heads, buffers = _segment(R, T, D, mix, seed=T * 7 + D + G)
    q = torch.randn(R, G, D, generator=torch.Generator().manual_seed(T + D)) * D**-0.5
    out = _poisoned(R, G, D)
    # chunk 480: T = 1000 spans three split-K tasks per head, merged inside the kernel
    got = cpu_decode.segment_partials(buffers, q, chunk=480, out=out)
    assert all(a is b for a, b in zip(got, out))
    _assert_partials_close(got, [head_partials_reference(h, q[r]) for r, h in enumerate(heads)], heads)


@needs_cpu_kernel
def test_cpu_partials_after_beam_select_share_buffers():
    heads, buffers = _segment(4, 63, 16, "rdkv", seed=5)
    seg = Segment(heads, 2, 2, torch.tensor([63, 63]), buffers)
    sel = seg.select(torch.tensor([1, 1, 0]))
    assert sel.buffers.words is buffers.words and sel.heads[0] is heads[2]
    q = torch.randn(6, 3, 16)
    got = cpu_decode.segment_partials(sel.buffers, q, out=_poisoned(6, 3, 16))
    _assert_partials_close(got, [head_partials_reference(h, q[r]) for r, h in enumerate(sel.heads)], sel.heads)


def _stack_case(G: int, select=None):
    """Four segments of batch 2 x 2 KV heads stacked, and queries: a member with two split-K tasks
    per head at chunk 480, a member that keeps nothing, and a row (batch 1, head 0) no member keeps a
    token of. `select`: the stack's rows after ``select(select)`` (beam search). Returns ``(stack,
    members, q, the merged reference partials per row, each row's head in the first member)``."""
    from rdkv_hf.kernels import merge_chunk_partials
    from rdkv_hf.stacked import stack_segments

    B, H, D = 2, 2, 16
    segments = []
    for j, T in enumerate((10, 700, 1, 4)):
        g = torch.Generator().manual_seed(40 + j)
        v_bits = torch.tensor([0, 2, 4, 8, 16])[torch.randint(1, 5, (B * H, T), generator=g)]
        v_bits[2] = 0
        if j == 3:
            v_bits[:] = 0
        k_bits = torch.tensor([2, 4, 8, 16])[torch.randint(0, 4, (B * H, D), generator=g)]
        heads, buffers = pack_segment(torch.randn(B * H, T, D, generator=g), torch.randn(B * H, T, D, generator=g), v_bits,
                                      k_bits, torch.float16)
        segments.append(Segment(heads, B, H, torch.tensor([T, T]), buffers, decoded=True))
    stack = stack_segments(segments)
    if select is not None:
        index = torch.tensor(select)
        stack, segments = stack.select(index), [s.select(index) for s in segments]
    R = len(segments[0].heads)
    q = torch.randn(R, G, D, generator=torch.Generator().manual_seed(3)) * D**-0.5
    ref = [[head_partials_reference(s.heads[r], q[r]) for s in segments] for r in range(R)]
    merged = merge_chunk_partials(*(torch.stack([torch.stack([p[i] for p in row]) for row in ref]) for i in range(3)))
    heads = [segments[0].heads[r] for r in range(R)]
    assert any(h.n == 0 for h in heads) and any(h.n > 0 for h in heads)
    return stack, q, list(zip(*merged)), heads


STACK_CASES = [(2, None), (5, None), (3, [1, 1, 0])]


@needs_cpu_kernel
@pytest.mark.parametrize("G,select", STACK_CASES)
def test_cpu_kernel_merges_the_members_of_a_stack(G, select):
    """A stack of segments in one call: head rows ``r, r + R, ...`` read query row ``r`` and their
    partials merge into output row ``r``, also after a beam-search select; a row no member keeps a
    token of is (-inf, 0, 0). The row count must be the members' times the queries'."""
    stack, q, ref, heads = _stack_case(G, select)
    got = cpu_decode.segment_partials(stack.buffers, q, chunk=480, out=_poisoned(*q.shape), members=4)
    _assert_partials_close(got, ref, heads)
    with pytest.raises(ValueError, match="4 members"):
        cpu_decode.segment_partials(stack.buffers, q[:2].contiguous(), members=4)
    with pytest.raises(ValueError, match="heads"):
        cpu_decode.segment_partials(stack.buffers, q)  # a stack read as one segment


@needs_cpu_kernel
def test_cpu_kernel_from_several_python_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    heads, buffers = _segment(3, 1000, 64, "rdkv", seed=9)
    q = torch.randn(3, 3, 64)
    ref = cpu_decode.segment_partials(buffers, q, chunk=480, threads=1)
    with ThreadPoolExecutor(3) as ex:
        outs = list(ex.map(lambda _: cpu_decode.segment_partials(buffers, q, chunk=480, threads=2), range(12)))
    for out in outs:
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


@needs_cpu_kernel
@pytest.mark.parametrize("q_len", [1, 3])
def test_attend_cpu_backend_matches_torch(q_len):
    B, Hkv, g, D = 2, 2, 3, 64
    heads, buffers = _segment(B * Hkv, 127, D, "any", seed=11)
    seg = Segment(heads, B, Hkv, torch.tensor([127, 127]), buffers)
    tail_k, tail_v = torch.randn(B, Hkv, 5, D), torch.randn(B, Hkv, 5, D)
    query = torch.randn(B, Hkv * g, q_len, D)
    ref = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend="torch")
    got = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend="cpu")
    torch.testing.assert_close(got[0], ref[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], ref[1], **TOL[torch.float32])


@needs_cpu_kernel
def test_cpu_launcher_validates_inputs():
    heads, buffers = _segment(3, 10, 16, "rdkv", seed=1)
    with pytest.raises(ValueError, match="float32"):
        cpu_decode.segment_partials(buffers, torch.randn(3, 1, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="3 heads"):
        cpu_decode.segment_partials(buffers, torch.randn(2, 1, 16))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_decode.segment_partials(buffers, torch.randn(3, 16, 2).transpose(1, 2))
    with pytest.raises(ValueError, match="multiple of 480"):
        cpu_decode.segment_partials(buffers, torch.randn(3, 1, 16), chunk=500)
    with pytest.raises(ValueError, match="`out`'s sum must be a contiguous float32 \\[3, 1\\] tensor on cpu"):
        cpu_decode.segment_partials(buffers, torch.randn(3, 1, 16), out=(torch.empty(3, 1), torch.empty(3, 2), torch.empty(3, 1, 16)))


def test_cpu_kernel_first_build_and_failure_are_announced(monkeypatch, tmp_path, caplog):
    """The one-time build says so before it runs; a failed build says that decoding falls back to the
    torch path (a slower path, never a silent one)."""
    monkeypatch.setenv("RDKV_HF_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "c++")
    monkeypatch.setattr(cpu_decode, "_lib", None)
    monkeypatch.setattr(cpu_decode, "_error", None)
    built = []

    def failing_build(source, out, compiler):
        built.append(out)
        raise RuntimeError("c++ failed: no such header")

    monkeypatch.setattr(cpu_decode, "_build", failing_build)
    with caplog.at_level("WARNING", logger=cpu_decode.__name__):
        assert not cpu_decode.available()
    assert built and built[0].parent == tmp_path / "kernels"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("building the C++ decode kernel" in m and str(built[0]) in m for m in warnings)
    assert any("unavailable (RuntimeError: c++ failed: no such header)" in m and "torch path" in m for m in warnings)
    assert "no such header" in cpu_decode.unavailable_reason()


def test_patch_builds_the_cpu_kernel_before_the_first_decode(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_decode, "load", lambda: calls.append(1))
    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=2.5)
    try:
        assert calls, "patch(backend='auto') on a CPU model should build (or load) the C++ kernel"
    finally:
        rdkv_hf.unpatch(model)
    calls.clear()
    rdkv_hf.patch(model, budget=2.5, backend="torch")
    rdkv_hf.unpatch(model)
    assert not calls  # the torch path needs no kernel


def test_segment_words_equal_quant_pack_exactly():
    """Every packed group of a segment is quant.pack of quant.quantize of its rows."""
    g = torch.Generator().manual_seed(3)
    T, D = 127, 64
    k, v = torch.randn(2, T, D, generator=g), torch.randn(2, T, D, generator=g)
    widths = torch.tensor(WIDTH_MIXES["any"])
    v_bits = widths[torch.randint(0, 10, (2, T), generator=g)]
    k_bits = widths[torch.randint(0, 10, (2, D), generator=g)]
    heads, buffers = pack_segment(k, v, v_bits, k_bits, torch.float16)
    for r, head in enumerate(heads):
        kept = torch.cat([(v_bits[r] == b).nonzero().squeeze(1) for b in sorted(set(v_bits[r].tolist()) - {0}, reverse=True)])
        assert head.n == len(kept)
        for grp, rows in zip(head.v_groups, torch.split(v[r, kept], [x.count for x in head.v_groups])):
            if grp.bits < 16:
                codes, scale, minimum = quant.quantize(rows, grp.bits, -1)
                assert torch.equal(grp.data, quant.pack(codes, grp.bits))
                assert torch.equal(grp.scale, scale.reshape(-1)) and torch.equal(grp.minimum, minimum.reshape(-1))
        chans = head.channel_order()
        c0 = 0
        for grp in head.k_groups:
            rows = k[r, kept][:, chans[c0 : c0 + grp.count]].T
            c0 += grp.count
            if grp.bits < 16:
                codes, scale, minimum = quant.quantize(rows, grp.bits, -1)
                assert torch.equal(grp.data, quant.pack(codes, grp.bits))
    assert sum(h.nbytes for h in heads) == buffers.nbytes
    assert set(buffers.groups[:, G_BITS].tolist()) <= set(WIDTH_MIXES["any"])


# -- soft-capping, sinks, K and V of different widths ---------------------------------------------

SOFTCAP_DV = [(None, 16, 40), (1.5, 24, 16), (0.5, 72, 64)]  # (softcap, D, Dv): caps that bend the logits


def _dense_reference(query, heads, tail_k, tail_v, scaling, softcap, sinks):
    """Eager attention of ``query [B, Hq, q, D]`` over each head's dequantized segment and its tail
    (causal within the new tokens), soft-capped, with one sink column per query head:
    ``(out [B, Hq, q, Dv], lse [B, Hq, q])``."""
    B, Hq, q, _ = query.shape
    Hkv, n_tail = tail_k.shape[1], tail_k.shape[2]
    g = Hq // Hkv
    out, lse = torch.zeros(B, Hq, q, tail_v.shape[-1]), torch.zeros(B, Hq, q)
    sees = torch.arange(n_tail)[None, :] <= torch.arange(q)[:, None] + n_tail - q
    for b in range(B):
        for h in range(Hq):
            k_seg, v_seg = heads[b * Hkv + h // g].dequantize()
            k, v = torch.cat([k_seg, tail_k[b, h // g]]), torch.cat([v_seg, tail_v[b, h // g]])
            logits = (query[b, h] * scaling) @ k.T
            logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
            logits[:, k_seg.shape[0] :] = logits[:, k_seg.shape[0] :].masked_fill(~sees, -torch.inf)
            if sinks is not None:
                logits = torch.cat([logits, sinks[h].expand(q, 1)], -1)
            lse[b, h] = torch.logsumexp(logits, -1)
            out[b, h] = torch.softmax(logits, -1)[:, : k.shape[0]] @ v
    return out, lse


def _attend_case(D, Dv, q_len, seed=13):
    B, Hkv, g = 2, 2, 3
    heads, buffers = _segment(B * Hkv, 63, D, "any", seed=seed, Dv=Dv)
    gen = torch.Generator().manual_seed(seed)
    seg = Segment(heads, B, Hkv, torch.tensor([63, 63]), buffers)
    tail_k, tail_v = torch.randn(B, Hkv, 5, D, generator=gen), torch.randn(B, Hkv, 5, Dv, generator=gen)
    query = torch.randn(B, Hkv * g, q_len, D, generator=gen)
    sinks = torch.randn(Hkv * g, generator=gen) + 2  # each worth several tokens' mass
    return seg, tail_k, tail_v, query, sinks


@needs_cpu_kernel
@pytest.mark.parametrize("T", [1, 63, 1000])
@pytest.mark.parametrize("softcap,D,Dv", SOFTCAP_DV)
def test_cpu_partials_with_softcap_and_other_v_width(T, softcap, D, Dv):
    R, G = 3, 4
    heads, buffers = _segment(R, T, D, "any", seed=T + D + Dv, Dv=Dv)
    assert buffers.v_dim == Dv and all(h.v_dim == Dv for h in heads)
    q = torch.randn(R, G, D, generator=torch.Generator().manual_seed(T)) * 3 * D**-0.5
    got = cpu_decode.segment_partials(buffers, q, chunk=480, out=_poisoned(R, G, Dv), softcap=softcap)
    _assert_partials_close(got, [head_partials_reference(h, q[r], softcap) for r, h in enumerate(heads)], heads)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("softcap,D,Dv", SOFTCAP_DV)
def test_attend_with_softcap_sinks_and_other_v_width_is_eager_attention(backend, q_len, softcap, D, Dv):
    seg, tail_k, tail_v, query, sinks = _attend_case(D, Dv, q_len)
    ref_out, ref_lse = _dense_reference(query, seg.heads, tail_k, tail_v, D**-0.5, softcap, sinks)
    out, lse = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend=backend, softcap=softcap, sinks=sinks)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])
    # the sinks and the cap matter here: leaving either out moves the output
    without = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend=backend, softcap=softcap)[0]
    assert (without - ref_out).abs().max() > 1e-2
    if softcap is not None:
        uncapped = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend=backend, sinks=sinks)[0]
        assert (uncapped - ref_out).abs().max() > 1e-2


@pytest.mark.parametrize("padded", [False, True])
def test_dense_attention_in_chunks_of_queries_is_one_attention(monkeypatch, padded):
    """Where sdpa cannot serve (softcap, sinks), a long prompt attends DENSE_CHUNK queries at a time."""
    from rdkv_hf import attention

    g = torch.Generator().manual_seed(3)
    B, Hkv, grp, q, D, Dv = 2, 2, 3, 11, 24, 16
    query, key, value = torch.randn(B, Hkv * grp, q, D, generator=g), torch.randn(B, Hkv, q, D, generator=g), torch.randn(B, Hkv, q, Dv, generator=g)
    mask = None
    if padded:  # row 1 left-padded by 3, as Transformers' sdpa mask lays it out
        mask = torch.ones(q, q, dtype=torch.bool).tril().expand(B, 1, q, q).clone()
        mask[1, :, :, :3] = False
    kw = dict(softcap=1.5, sinks=torch.randn(Hkv * grp, generator=g))
    whole = attend(query, [], key, value, mask, D**-0.5, **kw)
    monkeypatch.setattr(attention, "DENSE_CHUNK", 4)
    chunked = attention.dense_attention(query, key, value, mask, D**-0.5, **kw)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@needs_cpu_kernel
def test_cpu_launcher_validates_softcap():
    heads, buffers = _segment(3, 10, 16, "rdkv", seed=1)
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="`softcap` must be None or a positive number"):
            cpu_decode.segment_partials(buffers, torch.randn(3, 1, 16), softcap=bad)


# -- Triton (CPU interpreter) ---------------------------------------------------------------------
#
# Triton picks interpreter or compiler when it is imported, and conftest's transformers import
# already imports it. So without CUDA the Triton tests run in a child pytest started with
# TRITON_INTERPRET=1 (test_interpreter_child_runs_the_triton_tests), and are skipped in this process.

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRETED or torch.cuda.is_available()),
    reason="triton is not installed" if not HAS_TRITON else "runs in the TRITON_INTERPRET=1 child process",
)


@pytest.fixture
def interpret():
    """The device Triton runs on here: CUDA, or the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the Triton tests run in this process")
def test_interpreter_child_runs_the_triton_tests():
    run_triton_tests_in_interpreter(__file__)


@needs_triton
@pytest.mark.parametrize("T,D,bits,dim", [(5, 16, 2, -1), (7, 24, 3, -1), (9, 16, 8, 0), (33, 8, 1, 0), (6, 20, 5, 0)])
def test_triton_quantize_pack_is_exact(interpret, T, D, bits, dim):
    from rdkv_hf.kernels.quantize_pack import quantize_pack

    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T * D)) * 4 + 1
    x[1] = 0.75  # a constant row (scale falls back to 1)
    words, scale, minimum = quantize_pack(x.to(interpret), bits, dim)
    codes, ref_scale, ref_min = quant.quantize(x, bits, dim)
    assert torch.equal(words.cpu(), quant.pack(codes if dim == -1 else codes.T, bits))
    assert torch.equal(scale.cpu(), ref_scale.reshape(-1)) and torch.equal(minimum.cpu(), ref_min.reshape(-1))


@needs_triton
def test_triton_quantize_pack_validates(interpret):
    from rdkv_hf.kernels.quantize_pack import quantize_pack

    with pytest.raises(ValueError, match="bits"):
        quantize_pack(torch.randn(4, 8, device=interpret), 9)
    with pytest.raises(ValueError, match="contiguous"):
        quantize_pack(torch.randn(8, 4, device=interpret).T, 4)
    with pytest.raises(TypeError, match="float32"):
        quantize_pack(torch.ones(4, 8, dtype=torch.int32, device=interpret), 4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    from rdkv_hf.kernels.quantize_pack import quantize_pack

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        quantize_pack(torch.randn(4, 8), 4)


@needs_triton
@pytest.mark.parametrize("T,D,group,q_len,mix", [(1, 16, 1, 1, "rdkv"), (63, 16, 3, 1, "any"), (40, 32, 1, 3, "uniform3")])
def test_triton_decode_partials_match_reference(interpret, T, D, group, q_len, mix):
    from rdkv_hf.kernels.decode_partials import segment_partials

    R, G = 3, group * q_len
    heads, buffers = _segment(R, T, D, mix, seed=T + D)
    q = torch.randn(R, G, D, generator=torch.Generator().manual_seed(T)) * D**-0.5
    out = _poisoned(R, G, D)
    got = segment_partials(buffers, q, block_t=32, out=out)
    assert all(a is b for a, b in zip(got, out))
    _assert_partials_close(got, [head_partials_reference(h, q[r]) for r, h in enumerate(heads)], heads)


@needs_triton
@pytest.mark.parametrize("G,select", STACK_CASES + [(16, None)])  # 16 rows: the explicit IEEE dot
def test_triton_kernel_merges_the_members_of_a_stack(interpret, G, select):
    """As the C++ kernel: a stack's head rows ``r, r + R, ...`` share query row ``r`` and merge."""
    from rdkv_hf.kernels.decode_partials import segment_partials

    stack, q, ref, heads = _stack_case(G, select)
    got = segment_partials(stack.buffers, q, block_t=32, out=_poisoned(*q.shape), members=4)
    _assert_partials_close(got, ref, heads)


@needs_triton
@pytest.mark.parametrize("members", [1, 3])
def test_triton_merge_of_chunks_is_the_torch_merge(interpret, members):
    """The one-launch merge equals :func:`merge_chunk_partials`, with chunks and whole rows that
    hold no token (max -inf), G and Dv not powers of two, and a stack's members."""
    from rdkv_hf.kernels import merge_chunk_partials
    from rdkv_hf.kernels.decode_partials import merge_chunks

    R, C, G, Dv = 4, 3, 5, 12
    g = torch.Generator().manual_seed(members)
    cm = torch.randn(members * R, C, G, generator=g) * 4
    cl = torch.rand(members * R, C, G, generator=g) + 0.5
    cacc = torch.randn(members * R, C, G, Dv, generator=g)
    cm[0, 1] = -torch.inf  # an empty chunk
    cm[torch.arange(members) * R + 2] = -torch.inf  # row 2 holds no token in any member
    cl[torch.arange(members) * R + 2], cacc[torch.arange(members) * R + 2] = 0, 0
    ref = merge_chunk_partials(cm, cl, cacc, members=members)
    got = merge_chunks(cm, cl, cacc, out=_poisoned(R, G, Dv), members=members)
    assert torch.equal(got[0][2], torch.full((G,), -torch.inf)) and not got[1][2].any() and not got[2][2].any()
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
    with pytest.raises(ValueError, match="`out`'s acc must be a contiguous float32"):
        merge_chunks(cm, cl, cacc, out=_poisoned(R, G, Dv + 1), members=members)


@needs_triton
@pytest.mark.parametrize("T", [1, 63])
@pytest.mark.parametrize("softcap,D,Dv", SOFTCAP_DV)
def test_triton_partials_with_softcap_and_other_v_width(interpret, T, softcap, D, Dv):
    from rdkv_hf.kernels.decode_partials import segment_partials

    R, G = 3, 4
    heads, buffers = _segment(R, T, D, "any", seed=T + D + Dv, Dv=Dv)
    q = torch.randn(R, G, D, generator=torch.Generator().manual_seed(T)) * 3 * D**-0.5
    got = segment_partials(buffers, q, block_t=32, out=_poisoned(R, G, Dv), softcap=softcap)
    _assert_partials_close(got, [head_partials_reference(h, q[r], softcap) for r, h in enumerate(heads)], heads)


@needs_triton
@pytest.mark.parametrize("softcap,D,Dv", SOFTCAP_DV[:2])
def test_triton_attend_with_softcap_sinks_and_other_v_width_is_eager_attention(interpret, softcap, D, Dv):
    seg, tail_k, tail_v, query, sinks = _attend_case(D, Dv, q_len=3)
    ref_out, ref_lse = _dense_reference(query, seg.heads, tail_k, tail_v, D**-0.5, softcap, sinks)
    out, lse = attend(query, [seg], tail_k, tail_v, None, D**-0.5, backend="triton", softcap=softcap, sinks=sinks)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_decode_partials_at_1000_tokens():
    from rdkv_hf.kernels.decode_partials import segment_partials
    from rdkv_hf.storage import SegmentBuffers

    heads, buffers = _segment(3, 1000, 64, "rdkv", seed=2)
    cuda = SegmentBuffers(*(t.cuda() for t in (buffers.words, buffers.meta, buffers.raw, buffers.perm, buffers.heads, buffers.groups)), buffers.head_dim)
    q = torch.randn(3, 3, 64) * 0.125
    got = segment_partials(cuda, q.cuda())
    _assert_partials_close([t.cpu() for t in got], [head_partials_reference(h, q[r]) for r, h in enumerate(heads)], heads)


def test_import_rdkv_hf_does_not_import_triton_or_build_kernels():
    import subprocess
    import sys

    code = "import sys, rdkv_hf; print('triton' in sys.modules, 'rdkv_hf.kernels.cpu_decode' in sys.modules)"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]


# -- prefill: the fast Lagrangian allocation ------------------------------------------------------


def _dense_lagrangian(w, costs, eps, budget, steps=48):
    """The plain bisection (every unit, every option, every step), which allocate.py speeds up."""
    w, costs, eps, budget = w.double(), costs.double(), eps.double(), budget.double()

    def choose(lam):
        opt = (w[:, :, None] * eps + lam[:, None, None] * costs[:, None, :]).argmin(-1)
        opt = torch.where(w > 0, opt, torch.zeros_like(opt))
        return opt, torch.gather(costs, 1, opt).sum(1)

    gain = (eps[0] - eps)[None, :] / costs.clamp(min=1e-12)
    hi = (w.amax(1, keepdim=True) * gain[:, 1:]).amax(1) * 1.01 + 1e-30
    lo = torch.zeros_like(hi)
    opt0, spent0 = choose(lo)
    done = spent0 <= budget
    best = torch.where(done[:, None], opt0, torch.zeros_like(opt0))
    for _ in range(steps):
        mid = (lo + hi) / 2
        opt, spent = choose(mid)
        ok = spent <= budget
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        best = torch.where((ok & ~done)[:, None], opt, best)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_fast_lagrangian_matches_dense_bisection(seed):
    from rdkv_hf.allocate import lagrangian_widths, unit_costs

    g = torch.Generator().manual_seed(seed)
    widths = torch.tensor(WIDTH_MIXES["any"] if seed % 2 else WIDTH_MIXES["rdkv"])
    eps = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.014, 0.004, 0.001, 3e-4, 5e-5, 0.0]) if seed % 2 else torch.tensor([1.0, 0.312, 0.0138, 4.8e-5, 0.0])
    R, U = 3, 1000 + 97 * seed
    w = torch.rand(R, U, generator=g) ** (1 + seed)
    w[:, ::7] = 0  # padding / unused units
    costs = unit_costs(widths, torch.tensor([64, 17, 0]))  # a row with nothing to spend on
    budget = torch.rand(R, generator=g).double() * 5 * U * 64
    assert torch.equal(lagrangian_widths(w, costs, eps, budget), _dense_lagrangian(w, costs, eps, budget))


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_finds_the_lowest_feasible_lam(seed):
    """Weights across many orders of magnitude, where a 48-step bisection stops short of the
    smallest feasible lam (and spends less than it may): the allocation is the one a bisection run
    to convergence finds, within the budget."""
    from rdkv_hf.allocate import lagrangian_widths, unit_costs

    g = torch.Generator().manual_seed(seed)
    widths = torch.tensor(WIDTH_MIXES["rdkv"])
    eps = torch.tensor([1.0, 0.312, 0.0138, 4.8e-5, 0.0])
    R, U = 4, 300
    w = torch.exp(torch.randn(R, U, generator=g) * 5)
    costs = unit_costs(widths, torch.tensor([64, 64, 128, 5]))
    budget = torch.rand(R, generator=g).double() * costs.amax(1) * U
    opt = lagrangian_widths(w, costs, eps, budget)
    assert bool((torch.gather(costs.double(), 1, opt).sum(1) <= budget).all())
    assert torch.equal(opt, _dense_lagrangian(w, costs, eps, budget, steps=400))
