"""bf16 or float32 for SmolLM2-135M on this CPU: prefill and decode time, full cache and RDKV.

    python benchmarks/bench_dtype.py                      # 2K prompt, 2 threads, 2 rounds
    python benchmarks/bench_dtype.py --tokens 4096 --rounds 3

One process loads the model in both dtypes and alternates them (float32, bf16, float32, bf16, ...)
so that a drift of the machine's speed hits both alike. Each round times one prefill of real KJV
text (``logits_to_keep=1``) and ``--steps`` greedy decode steps after it, with a DynamicCache and
with RDKV at 2.5 bits (C++ kernel). ``other`` is the CPU cores other processes used meanwhile
(/proc/stat); rounds above ~0.1 are noisy. The table gives the median over rounds and the bf16 /
float32 ratio; it is written to ``benchmarks/results/dtype.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import DEFAULT_TEXT, OtherLoad, machine, text_ids, write_report  # noqa: E402

import rdkv_hf  # noqa: E402
from rdkv_hf.compat import cache_kwargs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def run_once(model, ids: torch.Tensor, method: str, steps: int) -> dict:
    from transformers import DynamicCache

    if method == "rdkv":
        rdkv_hf.patch(model, budget=2.5, backend="cpu")
        cache = rdkv_hf.RDKVCache(model)
    else:
        rdkv_hf.unpatch(model)
        cache = DynamicCache(config=model.config)
    load = OtherLoad()
    load.start()
    t0 = time.perf_counter()
    out = model(ids, **cache_kwargs(cache), logits_to_keep=1)
    if method == "rdkv":
        cache.flush()  # packed now, not after 16 timed decode steps (the default `observe`)
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=tok, **cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    rdkv_hf.unpatch(model)
    return dict(prefill_s=prefill, ms_token=statistics.median(times[2:]) * 1e3, other=load.stop())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dtype.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rdkv_hf.eval.models import load_model

    models = {name: load_model("smollm2-135m", dtype=dt) for name, dt in DTYPES.items()}
    ids = text_ids(models["float32"][1], DEFAULT_TEXT, args.tokens)
    results = {(d, m): [] for d in DTYPES for m in ("dynamic", "rdkv")}
    for r in range(args.rounds):
        for method in ("dynamic", "rdkv"):
            for name in DTYPES:
                res = run_once(models[name][0], ids, method, args.steps)
                results[(name, method)].append(res)
                print(f"round {r} {name:>8} {method:>7}: prefill {res['prefill_s']:.2f} s, {res['ms_token']:.1f} ms/token, "
                      f"other {res['other']:.2f}", flush=True)
    lines = [
        f"# bf16 vs float32, SmolLM2-135M-Instruct, {args.tokens}-token prompt, {args.threads} threads",
        "",
        f"Machine: {machine()}, transformers {__import__('transformers').__version__}.",
        f"Command: `python benchmarks/bench_dtype.py --tokens {args.tokens} --rounds {args.rounds} --threads {args.threads}`; "
        "medians over rounds (float32 and bf16 alternated).",
        "",
        "| cache | dtype | prefill s | decode ms/token | other (max) |",
        "|---|---|---|---|---|",
    ]
    med = {}
    for method in ("dynamic", "rdkv"):
        for name in DTYPES:
            rs = results[(name, method)]
            med[(name, method)] = (statistics.median(r["prefill_s"] for r in rs), statistics.median(r["ms_token"] for r in rs))
            label = "DynamicCache" if method == "dynamic" else "RDKV 2.5 bits, C++ kernel"
            lines.append(f"| {label} | {name} | {med[(name, method)][0]:.2f} | {med[(name, method)][1]:.1f} | {max(r['other'] for r in rs):.2f} |")
    lines += ["", "bf16 / float32 time ratio (below 1: bf16 is faster):", ""]
    for method in ("dynamic", "rdkv"):
        (p32, d32), (p16, d16) = med[("float32", method)], med[("bfloat16", method)]
        lines.append(f"- {method}: prefill {p16 / p32:.2f}, decode {d16 / d32:.2f}")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
