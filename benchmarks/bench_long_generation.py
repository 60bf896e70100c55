"""Long generation in bounded memory: quality through the decode path, and bytes and ms/token
against generated length.

    python benchmarks/bench_long_generation.py quality   # streaming PPL + recall, every method (resumable)
    python benchmarks/bench_long_generation.py quality --decode-block 64 --methods full rdkv rdkv-cap --samples 1 \
        --out benchmarks/results/long_generation/block64                       # the block-size sweep
    python benchmarks/bench_long_generation.py speed     # bytes and ms/token vs generated length
    python benchmarks/bench_long_generation.py ratio     # the cap at 16K against RDKV at 4K, interleaved
    python benchmarks/bench_long_generation.py plot      # the plot from both result files
    python benchmarks/bench_long_generation.py repack    # what merging decoded blocks costs (K error)
    python benchmarks/bench_long_generation.py recall-trace --cap-share 0.2   # where the capped recall goes
    python benchmarks/bench_long_generation.py recall-ablation   # what the capped recall needs (novelty, prompt kept)

Model: SmolLM2-135M-Instruct. Results go to ``--out`` (default ``benchmarks/results/long_generation``).

**quality** runs :func:`rdkv_hf.eval.stream.evaluate_stream` (the model in bfloat16, so that the
full cache and every full-precision tail are bf16, the unit the cap is given in): a 64-token prompt,
6,144 tokens through the decode path (text with a five-digit code at 10%, the question at the end),
perplexity of the last 1,024 text tokens, recall of the code; ``decode_block`` 128, ``budget`` 2.5,
a cap of 10% of the full cache's bf16 bytes at the end of the stream for the capped methods.

**speed**: the state after L generated tokens is built from synthetic K/V statistics (a real 4K
prefill's K/V and last queries tiled to L tokens, as ``bench_decode.py`` does for prompts) fed
through each layer's cache and decode-block machinery (packing and the cap's re-allocations run as
in decoding), then the model decodes ``--steps`` tokens: the mean ms/token over them includes the
packing and re-allocation of the blocks they complete (two blocks at the default 256 steps). The
model's positions are raised past its 8K window for 16K (speed only). ``other`` is the CPU cores
other processes used meanwhile (``bench_decode.OtherLoad``): on a shared machine ratios, not times.
Methods: ``dynamic`` (DynamicCache, everything full precision), ``rdkv-prompt`` (today's RDKV: the
whole context compressed as a prompt at 2.5 bits, decoded tokens full precision: the 4K row is the
target's reference), ``rdkv-tail`` (a 64-token prompt compressed, the generated tokens in the
full-precision tail: what decoding with RDKV did before ``decode_block``), ``rdkv-blocks``
(``decode_block=128``), ``rdkv-cap`` (plus ``max_cache_bytes`` = 10% of a bf16 full cache at 6K).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import OtherLoad, build_seed, loadavg, machine, tile  # noqa: E402

from rdkv_hf.compat import cache_kwargs  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "long_generation"
SPEED_METHODS = ("dynamic", "rdkv-prompt", "rdkv-tail", "rdkv-blocks", "rdkv-cap")
PROMPT = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("quality", "speed", "ratio", "plot", "repack", "recall-trace", "recall-ablation"))
    p.add_argument("--rounds", type=int, default=8, help="ratio: rounds of each method, alternated")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--stream-tokens", type=int, default=6144)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--steps", type=int, default=256, help="decode steps timed per point (decode-block methods)")
    p.add_argument("--plain-steps", type=int, default=32, help="steps timed for methods without periodic work")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=2.5)
    p.add_argument("--decode-block", type=int, default=128, help="quality: the decode block of every RDKV method")
    p.add_argument("--cap-share", type=float, default=0.10, help="quality: the cap, a share of the full cache's bf16 bytes at the end")
    p.add_argument("--runs", nargs="+", default=None, help="recall-ablation: the rows to run (default: all of ABLATIONS)")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "rdkv_hf" / "bench")
    return p.parse_args(argv)


def quality(args) -> None:
    from rdkv_hf.eval.models import load_model, shipped_profile
    from rdkv_hf.eval.stream import STREAM_METHODS, StreamSettings, evaluate_stream

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    model = model.to(torch.bfloat16)
    settings = StreamSettings("smollm2-135m", methods=tuple(args.methods or STREAM_METHODS), budget=args.budget,
                              stream_tokens=args.stream_tokens, samples=args.samples, decode_block=args.decode_block,
                              cap_share=args.cap_share)
    print(f"machine: {machine()}; threads {args.threads}; loadavg {loadavg()}")
    evaluate_stream(model, tok, settings, args.out, profile=shipped_profile("smollm2-135m"))
    print((args.out / "stream_table.md").read_text())


# -- speed ------------------------------------------------------------------------------------


def _cap(model) -> int:
    """10% of a bf16 full cache at 64 + 6,144 tokens (the quality run's cap)."""
    tc = model.config
    return int(0.10 * (PROMPT + 6144) * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * 2 * 2)


@torch.no_grad()
def load_seed(args) -> dict:
    """The K/V/Q statistics of a real SmolLM2 prefill that the speed states tile (built once, cached
    under ``--workdir``)."""
    return torch.load(build_seed(argparse.Namespace(workdir=args.workdir, text_file=ROOT / "rdkv_hf" / "data" / "kjv_eval.txt")))


def build_state(method: str, model, seed: dict, length: int, budget: float):
    """The cache of `method` after a 64-token prompt and `length` generated tokens (synthetic K/V)."""
    from transformers import DynamicCache

    import rdkv_hf
    from rdkv_hf import decode_blocks
    from rdkv_hf.attention import compress_layer

    gen = torch.Generator().manual_seed(0)
    total = PROMPT + length
    if method == "dynamic":
        cache = DynamicCache(config=model.config)
        for i in range(len(seed["k"])):
            cache.update(tile(seed["k"][i], total, gen), tile(seed["v"][i], total, gen), i)
        return cache
    opts = dict(budget=budget, backend="cpu", min_tokens=0, observe=0)  # the 64-token prompt packed at once, as a long one is
    if method in ("rdkv-blocks", "rdkv-cap"):
        opts.update(decode_block=128, compress_followups=False)
    if method == "rdkv-cap":
        opts["max_cache_bytes"] = _cap(model)
    rdkv_hf.patch(model, **opts)
    cache = rdkv_hf.RDKVCache(model)
    prompt = total if method == "rdkv-prompt" else PROMPT
    for i, layer in enumerate(cache.layers):
        k, v, q = tile(seed["k"][i], total, gen), tile(seed["v"][i], total, gen), seed["q"][i]
        layer.update(k[:, :, :prompt], v[:, :, :prompt])
        compress_layer(layer, q, None, q.shape[-1] ** -0.5)
        if method == "rdkv-blocks" or method == "rdkv-cap":
            decode_blocks.after_forward(layer, q, None, q.shape[-1] ** -0.5, None, compressed=True)
            for start in range(prompt, total, 128):  # a block at a time, weighed by tiled queries
                end = min(total, start + 128)
                layer.update(k[:, :, start:end], v[:, :, start:end])
                qs = tile(q, end - start, gen)
                decode_blocks.after_forward(layer, qs, None, q.shape[-1] ** -0.5, None, compressed=False)
                layer.pending, layer.unread = 0, False
        elif prompt < total:
            layer.update(k[:, :, prompt:], v[:, :, prompt:])
            layer.pending, layer.unread = 0, False
    return cache


@contextlib.contextmanager
def counting_reallocations():
    """Count the cap's re-allocations (layer calls of ``cache_cap.reallocate``) and the seconds they
    take while the block runs: yields ``[calls, seconds]``, filled as it goes."""
    from rdkv_hf import cache_cap

    seen, reallocate = [0, 0.0], cache_cap.reallocate

    def counted(layer, target, *args):
        t0 = time.perf_counter()
        try:
            return reallocate(layer, target, *args)
        finally:
            seen[0] += 1
            seen[1] += time.perf_counter() - t0

    cache_cap.reallocate = counted
    try:
        yield seen
    finally:
        cache_cap.reallocate = reallocate


@torch.no_grad()
def time_decode(model, cache, steps: int, warmup: int = 4):
    tok = torch.tensor([[42]])
    times, load = [], OtherLoad()
    for i in range(warmup + steps):
        if i == warmup:
            load.start()
        t0 = time.perf_counter()
        out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return 1e3 * sum(timed) / len(timed), 1e3 * statistics.median(timed), 1e3 * max(timed), load.stop()


def speed(args) -> None:
    from rdkv_hf.cache import layer_nbytes
    from rdkv_hf.eval.models import load_model

    torch.set_num_threads(args.threads)
    args.csv = args.out / "speed.csv"
    seed = load_seed(args)
    model, _ = load_model("smollm2-135m")
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, PROMPT + max(args.lengths) + 1024)
    print(f"machine: {machine()}; threads {args.threads}; loadavg {loadavg()}; model float32")
    path = args.out / "speed.jsonl"
    done = {json.dumps([r["method"], r["length"]]) for r in _read(path)}
    header = (f"{'method':>12} {'generated':>9} {'MiB':>8} {'bytes/token':>11} {'ms/token':>8} {'median':>7} {'max':>7} {'other':>5}"
              f" {'re-allocs':>9} {'realloc ms/token':>16}")
    print(header)
    for method in args.methods or SPEED_METHODS:
        for length in args.lengths:
            if json.dumps([method, length]) in done:
                continue
            t0 = time.perf_counter()
            cache = build_state(method, model, seed, length, args.budget)
            build_s = time.perf_counter() - t0
            steps = args.steps if method in ("rdkv-blocks", "rdkv-cap") else args.plain_steps
            with counting_reallocations() as reallocations:
                mean, median, most, other = time_decode(model, cache, steps)
            nbytes = sum(layer_nbytes(cache))
            rec = dict(method=method, length=length, nbytes=nbytes, bytes_token=nbytes / (PROMPT + length + steps + 4), ms_token=mean,
                       median_ms=median, max_ms=most, other=other, steps=steps, build_s=build_s, loadavg=loadavg(), machine=machine(),
                       reallocations=reallocations[0], realloc_s=reallocations[1])
            with path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{method:>12} {length:>9} {nbytes / 2**20:>8.2f} {rec['bytes_token']:>11.0f} {mean:>8.1f} {median:>7.1f} "
                  f"{most:>7.0f} {other:>5.2f} {reallocations[0]:>9} {1e3 * reallocations[1] / (steps + 4):>16.1f}", flush=True)
            import rdkv_hf

            rdkv_hf.unpatch(model)
            del cache


def ratio(args) -> None:
    """Issue 15's speed target as one ratio: ``rdkv-cap`` after 16K generated tokens against
    ``rdkv-prompt`` at 4K, two models in one process, alternating rounds of ``--steps / --rounds``
    steps so that the machine's drift falls on both. The capped rounds together cover ``--steps``
    decode steps (their packing and re-allocations included); the prompt's tail grows by as many."""
    from rdkv_hf.eval.models import load_model

    torch.set_num_threads(args.threads)
    seed = load_seed(args)
    cap_len, ref_len = max(args.lengths), 4096
    states = {}
    for method, length in (("rdkv-prompt", ref_len), ("rdkv-cap", cap_len)):
        model, _ = load_model("smollm2-135m")
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, PROMPT + cap_len + args.steps + 1024)
        states[method] = (model, build_state(method, model, seed, length, args.budget))
        time_decode(model, states[method][1], 4, warmup=0)  # warm up
    print(f"machine: {machine()}; threads {args.threads}; loadavg {loadavg()}; model float32")
    per_round = max(1, args.steps // args.rounds)
    times: dict = {m: [] for m in states}
    for r in range(args.rounds):
        for method, (model, cache) in states.items():
            mean, median, _, other = time_decode(model, cache, per_round, warmup=0)
            times[method].append(mean)
            print(f"round {r}: {method:>11} {mean:7.1f} ms/token (median {median:6.1f}, other {other:.2f})", flush=True)
    ref, cap = statistics.mean(times["rdkv-prompt"]), statistics.mean(times["rdkv-cap"])
    print(f"rdkv-cap at {cap_len} generated: {cap:.1f} ms/token; rdkv-prompt at {ref_len}: {ref:.1f}; ratio {cap / ref:.2f} "
          f"(median of the rounds' ratios {statistics.median(c / p for c, p in zip(times['rdkv-cap'], times['rdkv-prompt'])):.2f})")


@torch.no_grad()
def repack(args) -> None:
    """Merge 8 decoded blocks (real K/V of a 4K prefill, 2.5 bits) into one segment at unchanged widths,
    as the cap's re-allocation does, and print the relative error it adds to K and V."""
    import rdkv_hf
    from rdkv_hf import cache_cap, decode_blocks
    from rdkv_hf.attention import compress_layer
    from rdkv_hf.eval.models import load_model
    from rdkv_hf.storage import pack_order

    torch.set_num_threads(args.threads)
    seed = load_seed(args)
    model, _ = load_model("smollm2-135m")
    rdkv_hf.patch(model, budget=args.budget, decode_block=128, max_cache_bytes=10**12)
    cache = rdkv_hf.RDKVCache(model)
    rows = []
    for li in (2, 10, 20):
        layer = cache.layers[li]
        k, v, q = seed["k"][li], seed["v"][li], seed["q"][li]
        layer.update(k[:, :, :PROMPT], v[:, :, :PROMPT])
        compress_layer(layer, q, None, q.shape[-1] ** -0.5)
        decode_blocks.after_forward(layer, q, None, q.shape[-1] ** -0.5, None, compressed=True)
        for s in range(PROMPT, PROMPT + 8 * 128 + 32, 32):  # the window's 32 queries at a time
            layer.update(k[:, :, s : s + 32], v[:, :, s : s + 32])
            decode_blocks.after_forward(layer, q, None, q.shape[-1] ** -0.5, None, compressed=False)
            layer.pending, layer.unread = 0, False
        blocks = [s for s in layer.segments if s.decoded]
        heads = list(range(blocks[0].kv_heads))
        part = cache_cap._Part(blocks, heads)
        merged = cache_cap._repack(part, part.vw, part.kw, heads, 1, len(heads), torch.float16, "cpu")
        for r in heads:
            k0 = torch.cat([b.heads[r].dequantize()[0] for b in blocks])
            v0 = torch.cat([b.heads[r].dequantize()[1] for b in blocks])
            order = pack_order(part.vw[r])  # the merged segment's token order
            k1, v1 = merged.heads[r].dequantize()
            rows.append((li, r, float((k1 - k0[order]).norm() / k0.norm()), float((v1 - v0[order]).norm() / v0.norm())))
            print(f"layer {li:2d} head {r}: K {100 * rows[-1][2]:5.1f}%  V {100 * rows[-1][3]:.1f}% (relative error added by the merge)")
    print(f"mean: K {100 * sum(r[2] for r in rows) / len(rows):.1f}%, V {100 * sum(r[3] for r in rows) / len(rows):.1f}%")


def _code_start(tok, ids: torch.Tensor, code: str) -> tuple[list[int], int]:
    """``(digits, first)``: the code's token ids and where they start in the sample `ids` ``[1, T]``."""
    seq, digits = ids[0].tolist(), tok(code, add_special_tokens=False).input_ids
    return digits, next(i for i in range(len(seq)) if seq[i : i + len(digits)] == digits)


def _packed_positions(layer, n_new: int, keep_last: int) -> torch.Tensor:
    """The sequence positions of the tokens ``RDKVLayer.compress_tail(n_new, ..., keep_last)`` packs."""
    n_tail = layer.keys.shape[-2]
    return torch.arange(n_tail - n_new, n_tail - keep_last) + (layer.seen - n_tail)


@torch.no_grad()
def recall_trace(args) -> None:
    """The capped stream of sample 0 twice: as the library runs it, and with re-allocation merging the
    old part at unchanged widths (the cap then not kept: isolates the merge's re-quantization from the
    widths it takes). For the library run, each re-allocation's effect on the code's tokens (its digits
    and the two tokens before them) in every KV head, and on all V bits. Writes ``recall_trace.md``."""
    from rdkv_hf import cache_cap
    from rdkv_hf.cache import RDKVLayer
    from rdkv_hf.eval.models import load_model
    from rdkv_hf.eval.stream import StreamSettings, run_cell, stream_sample
    from rdkv_hf.storage import pack_order

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    model = model.to(torch.bfloat16)
    settings = StreamSettings("smollm2-135m", methods=("rdkv-cap",), samples=1, cap_share=args.cap_share,
                              decode_block=args.decode_block, budget=args.budget, stream_tokens=args.stream_tokens)
    ids, code, text_end = stream_sample(tok, settings, settings.seed)
    seq = ids[0].tolist()
    digits, first = _code_start(tok, ids, code)
    code_pos = torch.arange(first - 2, first + len(digits))
    pos: dict[int, torch.Tensor] = {}  # id(head.w_tok) -> the head's token positions, in its token order
    stats = dict(rows=0, lowered=0, evicted=0, v_before=0, v_after=0, reallocations=0)

    compress_tail, v_widths, part_init, repack_fn = RDKVLayer.compress_tail, cache_cap._v_widths, cache_cap._Part.__init__, cache_cap._repack

    def traced_compress_tail(layer, n_new, w_tok, w_ch, real, keep_last=0, decoded=False):
        positions = _packed_positions(layer, n_new, keep_last)
        widths = layer.planner.widths
        got = []
        layer.planner.widths = lambda *a, **k: got.append(widths(*a, **k)) or got[-1]
        try:
            compress_tail(layer, n_new, w_tok, w_ch, real, keep_last=keep_last, decoded=decoded)
        finally:
            del layer.planner.widths
        v_bits = got[0][0].reshape(-1, len(positions)).cpu()
        for r, h in enumerate(layer.segments[-1].heads):
            pos[id(h.w_tok)] = positions[pack_order(v_bits[r])][: h.n]

    def traced_part_init(part, members, rows):
        part_init(part, members, rows)
        part.pos = [torch.cat([pos.get(id(s.heads[r].w_tok), torch.full((s.heads[r].n,), -1)) for s in members]) for r in rows]

    def traced_v_widths(planner, layer_idx, parts, *rest):
        out = v_widths(planner, layer_idx, parts, *rest)
        stats["reallocations"] += 1
        for p, new in zip(parts, out):
            for u, (old, nw) in enumerate(zip(p.vw, new)):
                stats["v_before"] += int(old.sum())
                stats["v_after"] += int(nw.sum())
                at = torch.isin(p.pos[u], code_pos)
                if at.any():
                    stats["rows"] += 1
                    stats["lowered"] += int(bool((nw[at] < old[at]).any()))
                    stats["evicted"] += int(bool(((nw[at] == 0) & (old[at] > 0)).any()))
        return out

    def traced_repack(part, vw, kw, row_of, *rest):
        seg = repack_fn(part, vw, kw, row_of, *rest)
        for r, h in enumerate(seg.heads):
            pos[id(h.w_tok)] = part.pos[row_of[r]][pack_order(vw[row_of[r]])][: h.n]
        return seg

    RDKVLayer.compress_tail, cache_cap._v_widths = traced_compress_tail, traced_v_widths
    cache_cap._Part.__init__, cache_cap._repack = traced_part_init, traced_repack
    try:
        traced = run_cell(model, ids, code, text_end, "rdkv-cap", settings, None, tok)
    finally:
        RDKVLayer.compress_tail, cache_cap._v_widths = compress_tail, v_widths
        cache_cap._Part.__init__, cache_cap._repack = part_init, repack_fn
    enforce = cache_cap.enforce

    def merge_only(layer):  # merge the old part at the widths it has whenever the library would re-allocate
        share, fixed = cache_cap.limits(layer)
        if cache_cap._held(layer.segments) + fixed > share:
            cache_cap.reallocate(layer, 0)

    cache_cap.enforce = merge_only
    cache_cap._v_widths = lambda planner, layer_idx, parts, *rest: [list(p.vw) for p in parts]
    k_widths, cache_cap._k_widths = cache_cap._k_widths, lambda planner, layer_idx, part, vw, budget: list(part.kw)
    try:
        merged = run_cell(model, ids, code, text_end, "rdkv-cap", settings, None, tok)
    finally:
        cache_cap.enforce, cache_cap._v_widths, cache_cap._k_widths = enforce, v_widths, k_widths
    pieces = [tok.decode([t]) for t in seq[first - 2 : first + len(digits)]]
    lines = [
        f"# Where the recall goes under a {100 * args.cap_share:.0f}% cap", "",
        f"`python benchmarks/bench_long_generation.py recall-trace --cap-share {args.cap_share} --threads {args.threads}` "
        f"({machine()}; quality figures do not depend on load). SmolLM2-135M-Instruct in bf16, the stream of "
        f"`quality` (sample 0: code {code}, its tokens {pieces} at position {first - 2}), decode_block "
        f"{args.decode_block}, budget {args.budget}.", "",
        "| run | % of bf16 bytes (end) | most bytes / cap | PPL | answer |", "|---|---|---|---|---|",
    ]
    for name, r in (("library (re-allocation takes widths, merges the decoded blocks)", traced),
                    ("merge only (old part merged at unchanged widths; cap not kept)", merged)):
        lines.append(f"| {name} | {r['pct_bf16']:.1f}% | {r['max_nbytes'] / r['cap']:.3f} | {r['ppl']:.2f} | {r['answer'].strip()!r} |")
    lines += ["", f"Library run: {stats['reallocations']} re-allocations (layers x times) took "
              f"{100 * (1 - stats['v_after'] / max(stats['v_before'], 1)):.1f}% of the old part's V bits; of the "
              f"{stats['rows']} (layer, KV head) rows holding the code's tokens, {stats['lowered']} lost bits on at least "
              f"one of them and {stats['evicted']} evicted at least one."]
    text = "\n".join(lines) + "\n"
    (args.out / "recall_trace.md").write_text(text)
    print(text)


# name -> (decode_novelty, the prompt re-allocated with the blocks (the cap before 2026-12), the code's tokens given
# the top weight, the cap's weights relative to their segment's mean, the share of them taken from the layer's KV
# heads' max (None: the library's CAP_HEAD_SHARE; both RDKVPlanner.cap_weights, 2026-12-01), the share taken from the
# mean over layers (None: the library's CAP_LAYER_SHARE; RDKVPlanner.cap_layer_share, 2026-12-02)); None: the full cache
ABLATIONS = {
    "full cache": None,
    "attention only, prompt re-allocated": (0.0, True, False, False, False, 0.0),
    "attention only, prompt kept": (0.0, False, False, False, False, 0.0),
    "novelty 4, prompt re-allocated": (4.0, True, False, False, False, 0.0),
    "novelty 4, prompt kept": (4.0, False, False, False, False, 0.0),
    "oracle weights, prompt re-allocated": (0.0, True, True, False, False, 0.0),
    "oracle weights, prompt kept": (0.0, False, True, False, False, 0.0),
    "novelty 4, prompt kept, relative weights": (4.0, False, False, True, 0.0, 0.0),
    "novelty 4, prompt kept, relative weights half shared across KV heads": (4.0, False, False, True, None, 0.0),
    "novelty 4, prompt kept, relative weights fully shared across KV heads": (4.0, False, False, True, 1.0, 0.0),
    "novelty 4, prompt kept, relative weights half shared across KV heads, half across layers (library)": (4.0, False, False, True, None, None),
    "novelty 4, prompt kept, relative weights half shared across KV heads, a quarter across layers": (4.0, False, False, True, None, 0.25),
}


def recall_ablation(args) -> None:
    """What the capped stream's recall needs: RDKV under the cap with and without the key-novelty
    prior (``decode_novelty``), with the prompt re-allocated with the decoded blocks or kept, with the
    cap's token weights raw, relative to their segment's mean, or relative and shared across the
    layer's KV heads (``RDKVPlanner.cap_weights``), and an
    oracle that gives the code's sentence end (" of the blue door is" and its digits) the block's top
    weight x10 when packed; the full cache beside them (``--runs`` picks rows). Besides the greedy
    answer, the code's digits are scored teacher forced after the question ("The secret code of the
    blue door is <code>"): their mean NLL and how many are the argmax. Writes ``recall.md`` (rows in
    ``recall.jsonl``, resumable)."""

    from rdkv_hf import cache_cap
    from rdkv_hf.allocate import relative_weights, shared_across_heads
    from rdkv_hf.cache import RDKVLayer
    from rdkv_hf.eval import stream
    from rdkv_hf.eval.models import load_model
    from rdkv_hf.planners.base import Planner
    from rdkv_hf.planners.rdkv import RDKVPlanner

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    model = model.to(torch.bfloat16)
    path = args.out / "recall.jsonl"
    done = {(r["run"], r["seed"]) for r in _read(path)}
    compress_tail, reallocate = RDKVLayer.compress_tail, cache_cap.reallocate
    cap_weights, cap_layer_share = RDKVPlanner.cap_weights, RDKVPlanner.cap_layer_share
    marked: dict = {}

    def oracle(layer, n_new, w_tok, w_ch, real, keep_last=0, decoded=False):
        hit = torch.isin(_packed_positions(layer, n_new, keep_last), marked["positions"])
        if hit.any():
            w_tok = w_tok.clone()
            w_tok[..., hit] = w_tok.amax(-1, keepdim=True) * 10
        return compress_tail(layer, n_new, w_tok, w_ch, real, keep_last=keep_last, decoded=decoded)

    unknown = set(args.runs or ()) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"unknown --runs {sorted(unknown)}; valid: {list(ABLATIONS)}")
    for run, spec in ABLATIONS.items():
        if args.runs and run not in args.runs:
            continue
        method = "full" if spec is None else "rdkv-cap"
        novelty, with_prompt, boost, relative, share, layer_share = spec or (None, False, False, True, None, None)
        settings = stream.StreamSettings("smollm2-135m", methods=("rdkv-cap",), samples=1, cap_share=args.cap_share,
                                         decode_block=args.decode_block, budget=args.budget,
                                         stream_tokens=args.stream_tokens, extra=dict(decode_novelty=novelty))
        for seed in range(args.samples):
            if (run, seed) in done:
                continue
            ids, code, text_end = stream.stream_sample(tok, settings, seed)
            digits, first = _code_start(tok, ids, code)
            marked.update(code=code, digits=digits, positions=torch.arange(first - 6, first + len(digits)))
            if boost:
                RDKVLayer.compress_tail = oracle
            if with_prompt:
                cache_cap.reallocate = lambda layer, target, forward=True: reallocate(layer, target, True)
            if not relative:
                RDKVPlanner.cap_weights = Planner.cap_weights
            elif share is not None:
                RDKVPlanner.cap_weights = lambda self, w_tok, real, positions, share=share: shared_across_heads(relative_weights(w_tok, real), share)
            if layer_share is not None:
                RDKVPlanner.cap_layer_share = layer_share
            try:
                r = stream.run_cell(model, ids, code, text_end, method, settings, None, tok)
            finally:
                RDKVLayer.compress_tail, cache_cap.reallocate = compress_tail, reallocate
                RDKVPlanner.cap_weights, RDKVPlanner.cap_layer_share = cap_weights, cap_layer_share
            # "recall" / "answer": generated right after the question (rows before 2026-12-01: after an extra
            # newline, stream.ANSWER_VERSION); "recall_given": after the answer's first words
            rec = dict(run=run, seed=seed, code=code, ppl=r["ppl"], recall=r["recall_plain"], answer=r["answer_plain"],
                       recall_given=r["recall"], answer_given=r["answer"], digit_nll=r["digit_nll"],
                       digits_right=r["digits_right"], digits=r["digits"], pct_bf16=r["pct_bf16"],
                       max_over_cap=r["max_nbytes"] / r["cap"] if r["cap"] else None,
                       cpu=machine().split(",")[0])
            print(json.dumps(rec), flush=True)
            with path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    rows = _read(path)
    lines = [
        "# What the capped stream's recall needs", "",
        f"`python benchmarks/bench_long_generation.py {' '.join(sys.argv[1:])}` "
        f"(this run: {machine()}; each row's CPU beside it). SmolLM2-135M-Instruct in bf16, the stream of `quality` (64-token prompt, {args.stream_tokens} "
        f"streamed tokens, the code at 10%), `rdkv-cap`: decode_block {args.decode_block}, budget {args.budget}, cap "
        f"{100 * args.cap_share:.0f}% of the full cache's bf16 bytes. Digits: the code scored teacher forced after the "
        "question (mean NLL; digits that are the argmax). Recall: the answer generated after the question; given: after "
        "the answer's first words (rows of 2026-12-01 on).", "",
        "| run | samples | recall | recall, given | digit NLL | digits right | PPL | % of bf16 (end) | answers | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in ABLATIONS:
        rs = [r for r in rows if r["run"] == run]
        if rs:
            mean = lambda k, rs=rs: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            answers = "; ".join(repr(r["answer"].strip()[-24:]) for r in rs)
            given = f"{100 * mean('recall_given'):.0f}%" if all("recall_given" in r for r in rs) else "—"
            lines.append(f"| {run} | {len(rs)} | {100 * mean('recall'):.0f}% | {given} | {mean('digit_nll'):.2f} | "
                         f"{sum(r['digits_right'] for r in rs)}/{sum(r['digits'] for r in rs)} | {mean('ppl'):.2f} | "
                         f"{mean('pct_bf16'):.1f}% | {answers} | {', '.join(sorted({r['cpu'] for r in rs}))} |")
    text = "\n".join(lines) + "\n"
    (args.out / "recall.md").write_text(text)
    print(text)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(args.out / "speed.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in SPEED_METHODS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["length"])
        if rs:
            axes[0].plot([r["length"] for r in rs], [r["nbytes"] / 2**20 for r in rs], "o-", label=method)
            axes[1].plot([r["length"] for r in rs], [r["ms_token"] for r in rs], "o-", label=method)
    axes[0].set(xlabel="generated tokens", ylabel="cache MiB (float32 model)", title="bytes vs generated length", xscale="log")
    axes[1].set(xlabel="generated tokens", ylabel="ms/token (mean, packing included)", title="decode time vs generated length",
                xscale="log")
    stream = _read(args.out / "stream.jsonl")
    by: dict = {}
    for r in stream:
        by.setdefault(r["label"], []).append(r)
    for label, rs in by.items():
        axes[2].scatter([sum(r["pct_bf16"] for r in rs) / len(rs)], [sum(r["ppl"] for r in rs) / len(rs)], label=label)
    axes[2].set(xlabel="% of bf16 bytes at the end of the stream", ylabel="PPL of the last 1,024 streamed tokens",
                title="6K-token stream (SmolLM2)", xscale="log", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "long_generation.png", dpi=110)
    print(f"wrote {args.out / 'long_generation.png'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"quality": quality, "speed": speed, "ratio": ratio, "plot": plot, "repack": repack, "recall-trace": recall_trace,
     "recall-ablation": recall_ablation}[args.what](args)


if __name__ == "__main__":
    main()
